"""Checkpoint contents and policies, mesh-change restore, eval-only mode, mismatch and I/O errors,
init_from, the non-finite guard and z-loss."""
import json
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _ckpt_util as u
from conftest import ROOT, run_cli
from llmjax import checkpoint as ckpt


def _one_line_error(result, status=2, tolerate=None):
  assert result.returncode == status, result.stderr[-3000:]
  stderr = result.stderr
  if tolerate:  # noise printed by a library's C++ threads, not an error report of ours
    stderr = "\n".join(l for l in stderr.splitlines() if not any(t in l for t in tolerate))
  assert "Traceback" not in stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("llmjax: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6 (shared by read-only tests)."""
  w = tmp_path_factory.mktemp("trained") / "run"
  u.train(w, "--config.train.steps=6", "--config.train.checkpoint_every=3")
  return w


# -- contents and policies ------------------------------------------------------------------------

def test_checkpoint_holds_state_data_position_and_resolved_config(trained):
  c = ckpt.Checkpointer(str(trained), read_only=True)
  items = c.read_json(3)
  c.close()
  assert items["data"]["step"] == 3 and items["data"]["seed"] == 0
  assert items["meta"]["step"] == 3 and items["meta"]["tokenizer"]["kind"] == "char"
  assert items["meta"]["model"]["embed_dim"] == 32
  assert items["config"] == json.loads((trained / "config.json").read_text())
  state = u.read_state(trained, 3)
  assert int(state["step"]) == 3 and int(state["nonfinite_skipped"]) == 0
  assert set(state) == {"step", "params", "opt_state", "nonfinite_skipped", "nonfinite_streak"}


def test_keep_last_k_plus_every_mth_and_async_save(tmp_path):
  c = ckpt.Checkpointer(str(tmp_path), keep=2, keep_period=5, async_save=True)
  state = {"w": jnp.arange(4.0)}
  for step in range(1, 13):
    c.save(step, {"w": state["w"] + step}, {"step": step}, {"step": step}, {})
  c.close()
  assert c.all_steps() == [5, 10, 11, 12]
  np.testing.assert_array_equal(u.read_state(tmp_path, 11)["w"], np.arange(4.0) + 11)


def test_partial_tmp_checkpoint_is_ignored_and_cleaned(tmp_path):
  c = ckpt.Checkpointer(str(tmp_path), async_save=False)
  c.save(1, {"w": jnp.ones(3)}, {"step": 1}, {"step": 1}, {})
  c.close()
  partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"  # what SIGKILL mid-save leaves
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 10)
  reader = ckpt.Checkpointer(str(tmp_path), read_only=True)
  assert reader.latest_step() == 1 and partial.exists()  # readers never touch a live writer's files
  writer = ckpt.Checkpointer(str(tmp_path))
  assert writer.latest_step() == 1
  writer.close()  # Orbax deletes partial directories in the background when a writer opens
  assert not partial.exists()


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, fields", [
    (["--config.model.embed_dim=64", "--config.model.num_layers=3", "--config.data.tokenizer=byte"],
     ["model.embed_dim (checkpoint 32, config 64)", "model.num_layers (checkpoint 2, config 3)",
      "data.tokenizer (checkpoint 'char', config 'byte')"]),
    (["--config.model.vocab_size=256"], ["model.vocab_size (checkpoint 128, config 256)"]),
])
def test_resume_with_different_config_lists_differing_fields(trained, override, fields):
  before = (trained / "config.json").read_text()
  line = _one_line_error(u.train(trained, "--config.train.steps=8", *override, check=False))
  assert "cannot resume" in line and "init_from" in line
  for field in fields:
    assert field in line
  assert (trained / "config.json").read_text() == before  # the run is untouched
  assert u.complete_steps(trained) == [3, 6]


def test_runtime_only_model_changes_still_resume(trained):
  r = u.train(trained, "--config.train.steps=6", "--config.model.remat_policy=full",
              "--config.model.scan_layers=False")
  assert "resumed from step 6" in r.stdout
  assert u.complete_steps(trained) == [3, 6]


def test_unwritable_checkpoint_directory_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  line = _one_line_error(u.train(blocker / "run", "--config.train.steps=2", check=False))
  assert "not writable" in line or "cannot" in line
  w = tmp_path / "run"
  w.mkdir()
  (w / ".llmjax-run").write_text("")  # an llmjax run (a stranger's directory is refused earlier)
  (w / "checkpoints").write_text("a file where the checkpoint directory should be")
  line = _one_line_error(u.train(w, "--config.train.steps=2", check=False))
  assert f"checkpoint directory {w / 'checkpoints'} is not writable" in line
  assert (w / "checkpoints").read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_checkpoint_directory_keeps_earlier_checkpoints(trained, tmp_path):
  import shutil
  w = tmp_path / "ro"
  shutil.copytree(trained, w)
  os.chmod(w / "checkpoints", 0o555)
  try:
    line = _one_line_error(u.train(w, "--config.train.steps=9", check=False))
    assert "not writable" in line
  finally:
    os.chmod(w / "checkpoints", 0o755)
  assert u.complete_steps(w) == [3, 6]


def test_full_disk_during_async_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path):
  """RLIMIT_FSIZE makes every write past 100 kB fail as on a full disk (EFBIG instead of ENOSPC);
  the checkpoint's array file is larger, so the background save of step 9 fails."""
  w = tmp_path / "run"
  u.train(w, "--config.train.steps=6", "--config.train.checkpoint_every=3",
          "--config.train.keep_checkpoints=2")
  before = {s: u.read_state(w, s) for s in (3, 6)}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the limit would truncate cache entries
  limit = 100_000
  r = subprocess.run(
      [sys.executable, *u.args(w, "--config.train.steps=12", "--config.train.checkpoint_every=3",
                               "--config.train.keep_checkpoints=2")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
  # TensorStore's write callbacks race Orbax's closed event loop after the failure; their
  # "RuntimeError: Event loop is closed" tracebacks are filtered: the error is all that is printed
  line = _one_line_error(r)
  assert r.stderr.strip().splitlines() == [line]
  assert "saving the checkpoint of step 9" in line and "File too large" in line
  assert "earlier checkpoints are intact (steps: 3, 6)" in line
  assert u.complete_steps(w) == [3, 6]
  for s in (3, 6):
    u.assert_trees_equal(u.read_state(w, s), before[s])


# -- init_from ------------------------------------------------------------------------------------

def test_init_from_starts_a_new_run_from_another_runs_weights(trained, tmp_path):
  # warmup starts at lr 0, so after one step the new run's weights are exactly the source's
  w = tmp_path / "finetune"
  r = u.train(w, f"--config.train.init_from={trained}:3", "--config.train.steps=1",
              "--config.train.checkpoint_every=0")
  assert f"initialized from {trained} step 3" in r.stdout
  new, source = u.read_state(w, 1), u.read_state(trained, 3)
  u.assert_trees_equal(new["params"], source["params"])
  assert int(new["step"]) == 1
  c = ckpt.Checkpointer(str(w), read_only=True)
  assert c.read_meta(1)["init_from"] == f"{trained}:3"
  line = _one_line_error(u.train(tmp_path / "bad", f"--config.train.init_from={trained}",
                                 "--config.model.embed_dim=64", check=False))
  assert "cannot initialize from" in line and "model.embed_dim (checkpoint 32, config 64)" in line
  line = _one_line_error(u.train(tmp_path / "bad2", f"--config.train.init_from={trained}:4",
                                 check=False))
  assert "no checkpoint for step 4" in line and "3, 6" in line


# -- eval-only and mesh change --------------------------------------------------------------------

def _eval(workdir, *extra, devices=None):
  r = run_cli(["-m", "llmjax.main", "--mode=eval", f"--workdir={workdir}", *extra],
              env_extra=u.env(), devices=devices)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_mesh_change_restore_gives_the_same_eval_loss(tmp_path):
  """Saved on (fsdp=8); restored with target shardings on (fsdp=4, tensor=2) and on 1 device."""
  w = tmp_path / "run"
  u.train(w, "--config.train.steps=4", "--config.mesh.data=1", "--config.mesh.fsdp=8", devices=8)
  mesh_args = ["--config=experiments/shakespeare_char.py", "--config.train.eval_batches=2"]
  fsdp8 = _eval(w, *mesh_args, "--config.mesh.data=1", "--config.mesh.fsdp=8", devices=8)
  tp = _eval(w, *mesh_args, "--config.mesh.data=1", "--config.mesh.fsdp=4",
             "--config.mesh.tensor=2", devices=8)
  single = _eval(w, "--step=4")
  assert fsdp8["step"] == tp["step"] == single["step"] == 4
  assert abs(fsdp8["loss"] - tp["loss"]) < 1e-6 and abs(fsdp8["loss"] - single["loss"]) < 1e-6
  assert json.loads((w / "eval" / "step_4.json").read_text())["loss"] == single["loss"]


def test_eval_mode_reports_loss_perplexity_bpc_for_latest_or_given_step(trained):
  latest = _eval(trained)
  at3 = _eval(trained, "--step=3")
  assert latest["step"] == 6 and at3["step"] == 3 and latest["loss"] != at3["loss"]
  assert abs(latest["perplexity"] - np.exp(latest["loss"])) < 1e-6 * latest["perplexity"]
  assert abs(latest["bpc"] - latest["loss"] / np.log(2)) < 1e-9
  r = run_cli(["-m", "llmjax.main", "--mode=eval", f"--workdir={trained}", "--step=5"],
              env_extra=u.env())
  assert "no checkpoint for step 5" in _one_line_error(r) and "3, 6" in r.stderr


# -- non-finite guard -----------------------------------------------------------------------------

def test_nan_gradients_are_skipped_and_counted(tmp_path):
  """(Also trains end to end with z-loss on.)"""
  w = tmp_path / "run"
  u.train(w, "--config.train.steps=6", "--config.train.checkpoint_every=1",
          "--config.train.keep_checkpoints=0", "--config.train.nonfinite_policy=skip",
          "--config.train.inject_nan_grads=3,4", "--config.train.z_loss=1e-4")
  m = u.train_metrics(w)
  assert [m[s]["nonfinite_skipped"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
  assert np.isnan(m[3]["grad_norm"]) and np.isfinite(m[5]["grad_norm"])
  s2, s4 = u.read_state(w, 2), u.read_state(w, 4)
  u.assert_trees_equal(s2["params"], s4["params"])  # the poisoned updates were not applied
  u.assert_trees_equal(s2["opt_state"], s4["opt_state"])
  for step in range(1, 7):
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u.read_state(w, step)["params"]))


def test_nan_gradients_halt_after_n_consecutive_steps(tmp_path):
  w = tmp_path / "run"
  r = u.train(w, "--config.train.steps=20", "--config.train.checkpoint_every=1",
              "--config.train.keep_checkpoints=0", "--config.train.nonfinite_policy=halt",
              "--config.train.nonfinite_halt_after=2", "--config.train.inject_nan_grads=3,5,6",
              check=False)
  line = _one_line_error(r, status=1)
  assert "non-finite loss or gradients at steps 5..6" in line  # the first bad step of the streak
  assert "latest checkpoint: step 5 (" in line
  assert "nonfinite_policy=skip" in line
  steps = u.complete_steps(w)
  assert max(steps) == 5  # nothing saved after the halt
  for step in steps:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u.read_state(w, step)["params"]))
  assert int(u.read_state(w, 5)["nonfinite_skipped"]) == 2  # step 3 and step 5


# -- z-loss ---------------------------------------------------------------------------------------

def test_z_loss_adds_log_z_squared_but_reports_plain_cross_entropy():
  from llmjax import train as trainlib
  from llmjax.model import Transformer, TransformerConfig
  model = Transformer(TransformerConfig(vocab_size=32, num_layers=1, num_heads=2, embed_dim=16,
                                        max_seq_len=8))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
  plain = trainlib.make_loss_fn(model)
  with_z = trainlib.make_loss_fn(model, z_loss=1e-2)
  total0, (ce0, _) = jax.jit(plain, static_argnums=3)(params, batch, jax.random.key(2), True)
  total1, (ce1, _) = jax.jit(with_z, static_argnums=3)(params, batch, jax.random.key(2), True)
  logits = jax.jit(lambda p: model.apply({"params": p}, tokens, deterministic=True))(params)
  expected = 1e-2 * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  assert total0 == ce0
  np.testing.assert_allclose(ce1, ce0, rtol=1e-6)  # reported loss: cross-entropy only
  np.testing.assert_allclose(total1 - total0, expected, rtol=1e-5)

