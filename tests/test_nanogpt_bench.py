"""benchmarks/nanogpt_train.py (nanoGPT's own train.py as the reference process) and the
speedrun recipe. Runs of nanoGPT itself need ../shared and are skipped without it."""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import nanogpt_train as ng  # noqa: E402

LOG = """step 0: train loss 4.2874, val loss 4.2823
iter 0: loss 4.2658, time 4512.17ms, mfu -100.00%
iter 1: loss 4.1, time 40.00ms, mfu -100.00%
iter 2: loss 4.0, time 30.00ms, mfu -100.00%
iter 3: loss 3.9, time 50.00ms, mfu -100.00%
iter 4: loss 3.8, time 20.00ms, mfu -100.00%
step 2000: train loss 1.7612, val loss 1.9190
"""


def test_log_parsing_and_intervals_drop_the_start():
  iters = [(int(i), float(l), float(t)) for i, l, t in ng.ITER.findall(LOG)]
  assert iters[0] == (0, 4.2658, 4512.17) and len(iters) == 5
  assert ng.interval_ms(iters, 2, skip=1) == [35.0, 35.0]
  assert [float(v) for _, _, v in ng.EVAL.findall(LOG)] == [4.2823, 1.919]


def test_command_is_nanogpts_cpu_recipe():
  cmd = ng.command("cpu_6l384", 20)
  assert cmd[1:3] == ["train.py", "config/train_shakespeare_char.py"]
  for flag in ("--n_layer=6", "--n_embd=384", "--block_size=256", "--batch_size=8",
               "--device=cpu", "--compile=False", "--dropout=0.0", "--max_iters=20"):
    assert flag in cmd


def test_missing_reference_is_explained_not_raised(monkeypatch, tmp_path):
  monkeypatch.setattr(ng, "NANOGPT", tmp_path / "absent")
  assert "nanoGPT's train.py not found" in ng.available()


@pytest.mark.slow
def test_nanogpt_runs_from_a_temporary_copy(tmp_path):
  why = ng.available()
  if why:
    pytest.skip(why)
  ref = ng.prepare(tmp_path)
  result = ng.run(ref, ng.command("shakespeare_char", 6))
  assert [i for i, _, _ in result["iters"]] == list(range(7))
  assert result["evals"][0][0] == 0 and not (ng.NANOGPT / "data" / "shakespeare_char" / "train.bin").exists()


def test_speedrun_recipe_is_a_valid_config():
  from llmjax import config as cfglib
  from llmjax.experiment import load_config
  config = load_config("shakespeare_speedrun")
  cfglib.validate(config)
  assert config.optim.optimizer == "muon" and config.model.matmul_dtype == "bfloat16"
  assert config.train.eval_batches * config.data.batch_size == 200 * 12  # nanoGPT's eval windows
