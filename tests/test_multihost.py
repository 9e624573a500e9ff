"""Multi-host: two local processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives)
train exactly like one process with 8 devices; only process 0 writes; all take part in checkpoints.
"""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import run_cli
from llmjax import config as cfglib
from llmjax import distributed

TRAIN = ["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
         "--config.data.tokenizer=byte", "--config.model.num_layers=2", "--config.model.embed_dim=64",
         "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.train.steps=5",
         "--config.train.grad_accum_steps=1",
         # float32 matmuls: the layouts are compared at rtol 1e-5, beyond bf16 operand rounding
         "--config.model.matmul_dtype=compute",
         "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=2",
         "--config.train.sample_tokens=0", "--config.train.tensorboard=False",
         "--config.train.progress=False", "--config.train.checkpoint_every=0",
         "--config.optim.warmup_steps=1", "--config.train.peak_flops=1e12"]
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _metrics(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _load_state(step_dir: Path):
  import orbax.checkpoint as ocp
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=args))


def test_two_processes_match_one_process_with_8_devices(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  # 2 processes x 4 devices; the data axis spans the processes (DCN), fsdp stays inside each.
  # The 1-process x 8-device reference runs at the same time (the machine has idle time while
  # the two processes wait on each other).
  multi_cmd = ["launch/local.py", "--num_processes=2", "--devices_per_process=4", "--timeout=600",
               "--", "python", *TRAIN, f"--workdir={multi}", "--config.mesh.data=1",
               "--config.mesh.fsdp=4", "--config.mesh.dcn.data=2"]
  single_cmd = [*TRAIN, f"--workdir={single}", "--config.mesh.data=2", "--config.mesh.fsdp=4"]
  with ThreadPoolExecutor(2) as pool:
    multi_run = pool.submit(run_cli, multi_cmd, env_extra={"XLA_FLAGS": FAST_XLA}, timeout=700)
    single_run = pool.submit(run_cli, single_cmd, timeout=700, env_extra={
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_XLA}"})
    proc, ref = multi_run.result(), single_run.result()
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert ref.returncode == 0, ref.stderr[-3000:]

  out = proc.stdout
  assert "over 8 cpu device(s)" in out and "mesh data=2 x fsdp=4" in out
  # Only process 0 logs, writes metrics, the config and the loss curve.
  assert "[p0] step 5: val loss" in out and "[p1] step 5" not in out
  assert "[p1] model:" not in out
  got, want = _metrics(multi), _metrics(single)
  assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 5]  # one writer: no duplicated lines
  for g, w in zip(got, want):
    assert g["split"] == w["split"]
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
  # Both processes took part in the (collective) checkpoint; it is complete and equal.
  a, b = _load_state(multi / "checkpoints" / "5"), _load_state(single / "checkpoints" / "5")
  assert int(a["step"]) == int(b["step"]) == 5
  leaves_a, leaves_b = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
  assert len(leaves_a) == len(leaves_b) > 5
  assert max(float(np.max(np.abs(x - y))) for x, y in zip(leaves_a, leaves_b)) <= 1e-5


def _settings(**kw):
  s = cfglib.default_config().mesh.distributed
  s.update(kw)
  return s


def test_distributed_single_process_needs_nothing():
  assert distributed.plan(_settings(), env={}) is None
  assert distributed.plan(_settings(initialize="off", coordinator_address="h:1"), env={}) is None


def test_distributed_auto_detects_tpu_pods_and_slurm():
  tpu = {"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}
  assert distributed.plan(_settings(), env=tpu) == {"initialization_timeout": 300}
  slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}
  assert distributed.plan(_settings(), env=slurm) == {"initialization_timeout": 300}
  assert distributed.plan(_settings(), env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.plan(_settings(), env={"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert distributed.plan(_settings(initialize="on"), env={}) == {"initialization_timeout": 300}


def test_distributed_explicit_flags():
  kw = distributed.plan(_settings(coordinator_address="10.0.0.1:1234", num_processes=4,
                                  process_id=3), env={})
  assert kw == {"initialization_timeout": 300, "coordinator_address": "10.0.0.1:1234",
                "num_processes": 4, "process_id": 3}
  with pytest.raises(cfglib.ConfigError, match="--num_processes=N --process_id=I"):
    distributed.plan(_settings(coordinator_address="10.0.0.1:1234"), env={})
  with pytest.raises(cfglib.ConfigError, match="process_id=4 must be below num_processes=4"):
    distributed.plan(_settings(coordinator_address="h:1", num_processes=4, process_id=4), env={})
  config = cfglib.default_config()
  distributed.apply_flags(config, "h:9", 2, 1)
  assert (config.mesh.distributed.coordinator_address, config.mesh.distributed.num_processes,
          config.mesh.distributed.process_id) == ("h:9", 2, 1)
