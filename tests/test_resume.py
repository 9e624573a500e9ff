"""Exact resumption, SIGKILL crash safety and preemption signals, on real training subprocesses.

Each test trains the tiny model of _ckpt_util in subprocesses; `LLMJAX_TEST_STEP_DELAY_S` slows
steps down so that kills and signals land in the middle of a run (and of its async saves).
"""
import random
import signal
import time

import numpy as np
import pytest

import _ckpt_util as u

STEPS = ["--config.train.steps=40", "--config.train.checkpoint_every=5"]


def _kill_after_step_20_and_resume(tmp_path, *overrides, devices=None, seed=0):
  """Run A: 40 steps straight. Run B: SIGKILL at a random moment after step 20's checkpoint,
  then restarted to 40. Final state bitwise equal, metrics of steps 21-40 identical."""
  a, b = tmp_path / "a", tmp_path / "b"
  u.train(a, *STEPS, *overrides, devices=devices)
  proc = u.start(b, *STEPS, *overrides, devices=devices,
                 extra_env={"LLMJAX_TEST_STEP_DELAY_S": "0.04"})
  u.wait_for(lambda: 20 in u.complete_steps(b), proc)
  time.sleep(random.Random(seed).uniform(0.0, 0.6))
  u.kill(proc)
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  killed_at = u.complete_steps(b)
  assert 20 in killed_at and max(killed_at) < 40
  resumed = u.train(b, *STEPS, *overrides, devices=devices)
  assert f"resumed from step {max(killed_at)}" in resumed.stdout
  u.assert_trees_equal(u.read_state(a, 40), u.read_state(b, 40))
  ma, mb = u.train_metrics(a), u.train_metrics(b)
  assert [ma[s] for s in range(21, 41)] == [mb[s] for s in range(21, 41)]
  assert sorted(mb) == list(range(1, 41))  # records past the restored step were not duplicated


def test_sigkill_after_step_20_resumes_bit_for_bit_with_grad_accumulation(tmp_path):
  # dropout on, so the RNG stream (derived from the step) must also resume exactly
  _kill_after_step_20_and_resume(tmp_path, "--config.train.grad_accum_steps=2",
                                 "--config.model.dropout=0.1", seed=1)


@pytest.mark.slow
def test_sigkill_after_step_20_resumes_bit_for_bit(tmp_path):
  _kill_after_step_20_and_resume(tmp_path, seed=7)


@pytest.mark.slow
def test_sigkill_resume_exact_on_8_devices_with_grad_accumulation(tmp_path):
  # fsdp x data mesh, micro-batches of 4 rows split over 4 batch shards, dropout on (RNG path)
  _kill_after_step_20_and_resume(
      tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.data.batch_size=16",
      "--config.train.grad_accum_steps=2",
      "--config.model.dropout=0.1", devices=8, seed=2)


@pytest.mark.slow
def test_sigkill_resume_exact_on_8_device_fsdp_tensor_mesh(tmp_path):
  _kill_after_step_20_and_resume(tmp_path, "--config.mesh.data=1", "--config.mesh.fsdp=4",
                                 "--config.mesh.tensor=2", devices=8, seed=3)


@pytest.mark.slow
def test_sigkill_resume_exact_with_grad_accumulation(tmp_path):
  _kill_after_step_20_and_resume(tmp_path, "--config.train.grad_accum_steps=4",
                                 "--config.model.dropout=0.1", seed=4)


def _sigkill_during_async_saves(tmp_path, kills: int, seed: int):
  """Checkpoint every step (so a save, and old-checkpoint deletion, is nearly always in flight),
  SIGKILL at random moments; after each kill every finished checkpoint is readable and the
  restart resumes from the latest one."""
  rng = random.Random(seed)
  w = tmp_path / "run"
  overrides = ["--config.train.steps=400", "--config.train.checkpoint_every=1",
               "--config.train.keep_checkpoints=2"]
  last = 0
  for _ in range(kills):
    proc = u.start(w, *overrides, extra_env={"LLMJAX_TEST_STEP_DELAY_S": "0.01"})
    u.wait_for(lambda: any(s > last for s in u.complete_steps(w)), proc)
    time.sleep(rng.uniform(0.0, 0.4))
    u.kill(proc)
    assert proc.returncode == -signal.SIGKILL
    steps = u.complete_steps(w)
    assert steps and max(steps) > last
    latest = max(steps)
    state = u.read_state(w, latest)  # the newest complete checkpoint is whole and finite
    assert int(state["step"]) == latest
    assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree.leaves(state["params"]))
    last = latest
  # a final restart resumes from the latest complete step and cleans Orbax's partial directories
  final = u.train(w, "--config.train.steps=" + str(last + 2), "--config.train.checkpoint_every=1",
                  "--config.train.keep_checkpoints=2")
  assert f"resumed from step {last}" in final.stdout
  assert not [p for p in (w / "checkpoints").iterdir() if "tmp" in p.name]


def test_sigkill_during_async_saves(tmp_path):
  _sigkill_during_async_saves(tmp_path, kills=1, seed=5)


@pytest.mark.slow
def test_ten_sigkills_during_async_saves(tmp_path):
  _sigkill_during_async_saves(tmp_path, kills=10, seed=6)


def _stop_with(w, sig, steps_before: int, *overrides):
  proc = u.start(w, "--config.train.steps=1000", "--config.train.checkpoint_every=0", *overrides,
                 extra_env={"LLMJAX_TEST_STEP_DELAY_S": "0.05"})
  u.wait_for(lambda: (w / "metrics.jsonl").exists() and len(u.train_metrics(w)) >= steps_before,
             proc)
  sent = time.time()
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=60)
  elapsed = time.time() - sent
  assert proc.returncode == 0, err[-2000:]
  stop = max(u.complete_steps(w))
  assert f"{sig.name}: stopped at step {stop}" in out and "rerun the same command" in out
  assert f"{sig.name} received: finishing the current step" in err
  assert stop == max(u.train_metrics(w))  # the checkpoint is at the step where it stopped
  assert elapsed < 15, f"took {elapsed:.1f}s to stop"  # one step + one save (on busy cores)
  return stop, out


def test_sigterm_and_sigint_finish_the_step_checkpoint_and_exit_0(tmp_path):
  w = tmp_path / "run"
  first, _ = _stop_with(w, signal.SIGTERM, 3)
  assert u.complete_steps(w) == [first]
  second, out = _stop_with(w, signal.SIGINT, first + 3)  # the restart resumes, then Ctrl-C
  assert f"resumed from step {first}" in out and second > first


def test_second_sigint_aborts_immediately_without_corrupting_checkpoints(tmp_path):
  w = tmp_path / "run"
  # long per-step sleeps: both signals arrive while the first stop request is still pending
  proc = u.start(w, "--config.train.steps=1000", "--config.train.checkpoint_every=1",
                 extra_env={"LLMJAX_TEST_STEP_DELAY_S": "0.5"})
  u.wait_for(lambda: len(u.complete_steps(w)) >= 1, proc)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGINT  # killed by the second signal, no clean exit
  latest = max(u.complete_steps(w))
  assert int(u.read_state(w, latest)["step"]) == latest
  resumed = u.train(w, f"--config.train.steps={latest + 1}")
  assert f"resumed from step {latest}" in resumed.stdout
