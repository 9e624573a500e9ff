"""Helpers for the checkpoint/resumption tests: a tiny model whose runs take seconds, launched in
subprocesses that share one persistent JAX compilation cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import JAX_CACHE_ENV, ROOT, run_cli

TINY = [
    "--config=experiments/shakespeare_char.py",
    "--config.model.num_layers=2", "--config.model.embed_dim=32", "--config.model.num_heads=2",
    "--config.model.max_seq_len=32", "--config.model.vocab_size=128", "--config.data.seq_len=32",
    "--config.data.batch_size=8", "--config.train.grad_accum_steps=1",
    "--config.optim.warmup_steps=5",
    "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=2",
    "--config.train.sample_tokens=0", "--config.train.progress=False",
    "--config.train.tensorboard=False", "--config.train.peak_flops=1e12",
]
# Values that must match bit for bit between an interrupted and an uninterrupted run.
EXACT_METRICS = ("loss", "grad_norm", "lr", "nonfinite_skipped", "nonfinite_streak")


def env(extra=None) -> dict:
  out = dict(JAX_CACHE_ENV)  # conftest sets these for the whole run; kept explicit for the resume tests
  out.update(extra or {})
  return out


def args(workdir, *overrides):
  return ["-m", "llmjax.main", *TINY, f"--workdir={workdir}", *overrides]


def train(workdir, *overrides, devices=None, extra_env=None, check=True, timeout=300):
  result = run_cli(args(workdir, *overrides), env_extra=env(extra_env), devices=devices,
                   timeout=timeout)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def start(workdir, *overrides, devices=None, extra_env=None) -> subprocess.Popen:
  """Starts a training subprocess (for signals and SIGKILL)."""
  e = dict(os.environ)
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
  if devices:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e.update(env(extra_env))
  return subprocess.Popen([sys.executable, *args(workdir, *overrides)], cwd=ROOT, env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete_steps(workdir) -> list[int]:
  """Finished checkpoints as Orbax sees them (tmp directories have non-numeric names)."""
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 120.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"process ended early ({proc.returncode}): {err[-2000:]}")
    time.sleep(0.01)
  raise AssertionError("timed out waiting")


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
  if proc.poll() is None:
    proc.send_signal(sig)
  proc.communicate(timeout=120)


def read_state(workdir, step=None):
  """The saved train state as numpy arrays (works for checkpoints from any mesh)."""
  from llmjax.checkpoint import Checkpointer
  c = Checkpointer(str(workdir), read_only=True, async_save=False)
  try:
    return c.restore_numpy(step)
  finally:
    c.close()


def assert_trees_equal(a, b) -> None:
  import jax
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y), "arrays differ"  # bitwise (NaN-free by the guard)


def train_metrics(workdir) -> dict[int, dict]:
  """step -> exact metrics of that step's train record (the last one if logged twice)."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["split"] == "train":
      out[r["step"]] = {k: r[k] for k in EXACT_METRICS if k in r}
  return out
