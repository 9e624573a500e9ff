"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (so it can never rot)."""
import json
import os
import sys

import pytest

from tests.conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  # A kernel spec for *this* interpreter, so the notebook sees the same packages as the tests.
  spec_dir = tmp_path / "jupyter" / "kernels" / "llmjax-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "llmjax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="llmjax-test", timeout=300,
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
  assert "loss " in outputs and "greedy:" in outputs and "of fp32" in outputs
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the loss plot should be in the outputs"
