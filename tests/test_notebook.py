"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (so it can never rot)."""
from tests.conftest import execute_notebook, notebook_images


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nb, outputs = execute_notebook("quickstart.ipynb", tmp_path, monkeypatch, timeout=300)
  assert "loss " in outputs and "greedy:" in outputs and "of fp32" in outputs
  assert notebook_images(nb), "the loss plot should be in the outputs"
