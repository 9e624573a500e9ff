"""notebooks/finetune.ipynb runs top to bottom in a real Jupyter kernel: it pretrains a tiny
model, scores it on held-out three-digit sums, fine-tunes it and scores it again. Several minutes
of CPU (pretraining plus fine-tuning), hence slow."""
import re

import pytest

from tests.conftest import execute_notebook, notebook_images


@pytest.mark.slow
def test_finetune_notebook_executes_and_fine_tuning_lifts_the_score(tmp_path, monkeypatch):
  nb, outputs = execute_notebook("finetune.ipynb", tmp_path, monkeypatch, timeout=1800)
  found = re.search(r"exact match before ([\d.]+) -> after ([\d.]+)", outputs)
  assert found, outputs[-3000:]
  before, after = map(float, found.groups())
  assert before <= 0.05 and after >= before + 0.3, (before, after)
  assert notebook_images(nb), "the before/after chart should be in the outputs"
