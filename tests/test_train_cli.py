"""End to end through the command line: the embedded default trains offline and leaves every
artefact; rerunning resumes; gpt_small starts and reports its size and ETA."""
import json
import re
import textwrap

import pytest

from conftest import run_cli
from llmjax import config as cfglib
from llmjax import loop

TINY = ["--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.num_heads=4",
        "--config.data.seq_len=32", "--config.model.max_seq_len=32", "--config.data.batch_size=8",
        "--config.train.grad_accum_steps=1",
        "--config.optim.warmup_steps=5", "--config.train.log_every=5", "--config.train.eval_every=20",
        "--config.train.eval_batches=2", "--config.train.checkpoint_every=20",
        "--config.train.sample_tokens=20", "--config.train.progress=False"]


def no_network_env(tmp_path):
  """A sitecustomize that makes any socket connection fail, as on a machine with no network."""
  site = tmp_path / "nonet"
  site.mkdir()
  (site / "sitecustomize.py").write_text(textwrap.dedent("""
      import socket
      def _refuse(*args, **kwargs):
          raise OSError("network disabled by the llmjax test suite")
      socket.socket.connect = _refuse
      socket.create_connection = _refuse
  """))
  return {"PYTHONPATH": str(site)}


def records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_embedded_default_trains_offline_leaves_artefacts_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  env = no_network_env(tmp_path)
  args = ["-m", "llmjax.main", "--config=experiments/shakespeare_char.py", f"--workdir={workdir}",
          *TINY]
  proc = run_cli(args + ["--config.train.steps=40"], env_extra=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "parameters" in proc.stdout and "val loss" in proc.stdout

  recs = records(workdir)
  train = [r for r in recs if r["split"] == "train"]
  val = [r for r in recs if r["split"] == "val"]
  assert train[-1]["loss"] < train[0]["loss"] - 0.5, train
  for field in ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time_ms", "mfu"):
    assert field in train[-1]
  assert 0 < train[-1]["mfu"] < 1
  assert {"loss", "perplexity", "bpc"} <= set(val[-1])
  assert (workdir / "checkpoints" / "40").is_dir() and (workdir / "checkpoints" / "20").is_dir()
  saved = cfglib.from_json((workdir / "config.json").read_text())
  assert saved.model.num_layers == 2
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len((workdir / "sample.txt").read_text()) > 10

  # Same workdir, more steps: resumes from step 40 instead of starting over.
  proc = run_cli(args + ["--config.train.steps=50"], env_extra=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 40" in proc.stdout
  steps = [r["step"] for r in records(workdir) if r["split"] == "train"]
  assert steps[-2:] == [45, 50] and steps.count(40) == 1


def test_gpt_small_starts_and_reports_parameters_and_eta(tmp_path):
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/gpt_small.py:tiny",
                  f"--workdir={tmp_path / 'gpt'}", "--config.train.steps=6",
                  "--config.train.log_every=3", "--config.train.sample_tokens=0",
                  "--config.data.sp_vocab_size=400"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "parameters" in proc.stdout
  assert re.search(r"\d+/6 \[\d\d:\d\d<\d\d:\d\d", proc.stderr), proc.stderr[-2000:]  # tqdm: elapsed<ETA


def test_full_gpt_small_config_is_gpt2_small():
  from experiments import gpt_small
  from llmjax.model import num_params
  c = gpt_small.get_config()
  c.model.vocab_size = 50257
  assert num_params(cfglib.model_config(c)) == pytest.approx(124.4e6, rel=0.01)


def test_masked_lm_objective_trains_a_bidirectional_encoder(tmp_path):
  c = cfglib.default_config()
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, max_seq_len=32, causal=False)
  c.data.update(seq_len=32, batch_size=8, special_tokens="[CLS],[SEP],[MASK]")
  c.optim.update(warmup_steps=2, lr=3e-3)
  c.train.update(steps=30, objective="masked_lm", log_every=5, eval_every=0, eval_batches=2,
                 checkpoint_every=0, progress=False, tensorboard=False)
  cfglib.validate(c, 1)
  result = loop.train(c, str(tmp_path / "mlm"))
  train = [r for r in records(tmp_path / "mlm") if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
  assert result["loss"] < 4.0
