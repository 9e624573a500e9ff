"""notebooks/finetune.ipynb runs top to bottom in a real Jupyter kernel: it pretrains a tiny
model, scores it on held-out three-digit sums, fine-tunes it and scores it again. Several minutes
of CPU (pretraining plus fine-tuning), hence slow."""
import json
import os
import re
import sys

import pytest

from tests.conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


@pytest.mark.slow
def test_finetune_notebook_executes_and_fine_tuning_lifts_the_score(tmp_path, monkeypatch):
  spec_dir = tmp_path / "jupyter" / "kernels" / "llmjax-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "llmjax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(ROOT / "notebooks" / "finetune.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="llmjax-test", timeout=1800,
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
  found = re.search(r"exact match before ([\d.]+) -> after ([\d.]+)", outputs)
  assert found, outputs[-3000:]
  before, after = map(float, found.groups())
  assert before <= 0.05 and after >= before + 0.3, (before, after)
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the before/after chart should be in the outputs"
