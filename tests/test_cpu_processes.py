"""mesh.cpu_processes (llmjax/cpu_processes.py) and the one-vector gradient all-reduce of CPU data
parallelism (llmjax/dp_grads.py): `python -m llmjax.main` re-launches itself as local processes
that train like one process, resume exactly, and fall back to one process where they cannot run."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import run_cli
from llmjax import config as cfglib
from llmjax import cpu_processes as cp

TRAIN = ["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
         "--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
         "--config.data.batch_size=8", "--config.data.seq_len=16", "--config.model.max_seq_len=16",
         "--config.train.grad_accum_steps=2", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.eval_batches=2",
         "--config.train.sample_tokens=0", "--config.train.tensorboard=False",
         "--config.train.progress=False", "--config.optim.warmup_steps=1",
         "--config.train.peak_flops=1e12"]
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ASKED = {cp.COUNT_ENV: ""}  # the suite sets LLMJAX_CPU_PROCESSES=1 (conftest); here the config decides


def _config(processes=1, batch=12, accum=1, devices=1):
  c = cfglib.default_config()
  c.data.batch_size, c.train.grad_accum_steps = batch, accum
  c.mesh.cpu_processes, c.mesh.cpu_devices = processes, devices
  return c


def test_process_count_choice():
  assert cfglib.default_config().mesh.cpu_processes == 1         # off unless asked for
  assert cp.choose(env={}, config=_config(1), cores=2) == 1
  assert cp.choose(env={}, config=_config(3), cores=2) == 3                     # explicit wins
  assert cp.choose(env={}, config=_config(0), cores=2) == 2                     # auto: one per core
  assert cp.choose(env={}, config=_config(0), cores=1) == 1                     # ... so one on a 1-core host
  assert cp.choose(env={}, config=_config(0, batch=9), cores=2) == 1            # ... dividing the batch
  assert cp.choose(env={}, config=_config(0, batch=12, accum=3), cores=8) == 4  # ... and the micro-batch
  assert cp.choose(env={}, config=_config(0, devices=2), cores=4) == 3          # 3 x 2 devices divide 12
  with pytest.raises(cfglib.ConfigError, match="mesh.cpu_processes=-1 must be"):
    cp.choose(env={}, config=_config(-1))
  with pytest.raises(cfglib.ConfigError, match="mesh.cpu_processes=-2 must be"):
    cfglib.validate(_config(-2))
  # the environment overrides the config (the test suite runs everything in one process)
  assert cp.choose(_config(0), cores=2, env={cp.COUNT_ENV: "1"}) == 1
  assert cp.choose(_config(1), cores=2, env={cp.COUNT_ENV: "2"}) == 2
  with pytest.raises(cfglib.ConfigError, match="LLMJAX_CPU_PROCESSES='two' must be"):
    cp.choose(_config(1), env={cp.COUNT_ENV: "two"})


def test_cores_are_split_between_processes():
  assert cp.assign_cores(2, [0, 1]) == [[0], [1]]
  assert cp.assign_cores(2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
  assert cp.assign_cores(3, [4, 5]) == [[4], [5], [4]]  # more processes than cores: round robin
  env = cp.worker_env(1, 2, 1234, [1], env={"XLA_FLAGS": "--xla_foo=1"})
  assert env[cp.ENV].startswith("1,2,1234,") and env[cp.ENV].endswith(",1")
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_cpu_multi_thread_eigen=false"
  assert env["JAX_PLATFORMS"] == "cpu"


def test_one_process_where_local_processes_cannot_run():
  c = _config(2)
  assert cp.why_not(c, env={"JAX_PLATFORMS": "cpu"}) is None
  assert "already a worker" in cp.why_not(c, env={cp.ENV: "0,2,1,1,0"})
  assert "not the CPU" in cp.why_not(c, env={"JAX_PLATFORMS": "cuda"})
  assert "TPU-pod/SLURM" in cp.why_not(c, env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
  c.mesh.distributed.coordinator_address = "10.0.0.1:1234"
  assert "multi-process job" in cp.why_not(c, env={"JAX_PLATFORMS": "cpu"})


def test_bad_process_count_is_one_line(tmp_path):
  proc = run_cli([*TRAIN, f"--workdir={tmp_path}", "--config.mesh.cpu_processes=5"],
                 env_extra=ASKED, timeout=120)
  # 5 processes cannot split the micro-batch of 4 rows: said once, by the launcher, exit 2
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("llmjax: error:")]
  assert len(errors) == 1 and "not divisible by the data-parallel size" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr


def _metrics(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _params(step_dir: Path):
  import orbax.checkpoint as ocp
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=args))
  return jax.tree.leaves(state["params"])


def test_two_cpu_processes_train_like_one(tmp_path):
  """2 pinned processes (one flat gradient all-reduce, strided micro-batches of 2 x 2 rows) vs
  one process: the same losses and weights up to float rounding; process 0 alone speaks."""
  one, two = tmp_path / "one", tmp_path / "two"
  env = {"XLA_FLAGS": FAST_XLA, **ASKED}
  ref = run_cli([*TRAIN, f"--workdir={one}", "--config.train.steps=3"], env_extra=env, timeout=300)
  proc = run_cli([*TRAIN, f"--workdir={two}", "--config.train.steps=3",
                  "--config.mesh.cpu_processes=2"], env_extra=env, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "over 2 cpu device(s)" in proc.stdout and proc.stdout.count("model:") == 1
  got, want = _metrics(two), _metrics(one)
  assert [m["step"] for m in got] == [1, 2, 3, 3]  # one writer
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
  for a, b in zip(_params(two / "checkpoints" / "3"), _params(one / "checkpoints" / "3")):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_two_cpu_processes_resume_exactly(tmp_path):
  """Stopped at step 2 and resumed to 4 equals 4 straight steps, bit for bit."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  args = [*TRAIN, "--config.mesh.cpu_processes=2", "--config.train.checkpoint_every=2"]
  for workdir, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
    proc = run_cli([*args, f"--workdir={workdir}", f"--config.train.steps={steps}"],
                   env_extra=ASKED, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 2" in proc.stdout
  for a, b in zip(_params(straight / "checkpoints" / "4"), _params(resumed / "checkpoints" / "4")):
    np.testing.assert_array_equal(a, b)
  train = lambda w: [m["loss"] for m in _metrics(w) if m["split"] == "train"]  # noqa: E731
  assert train(straight) == train(resumed)  # (the stopped run also evaluated at step 2)


WORKER = """
import os, signal, sys, time
from pathlib import Path
rank = os.environ["LLMJAX_CPU_PROCESS"].split(",")[0]
out = Path(sys.argv[1])
if sys.argv[2] == "fail" and rank == "1":
  print("worker 1 cannot go on", file=sys.stderr)
  sys.exit(3)
signal.signal(signal.SIGTERM, lambda *a: ((out / f"term{rank}").write_text("x"), sys.exit(0)))
(out / f"ready{rank}").write_text("x")
time.sleep(60)
sys.exit(5)
"""


def _launcher(tmp_path, mode):
  import subprocess
  import sys
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  code = ("import sys; from llmjax import cpu_processes as cp; "
          f"sys.exit(cp.launch(2, [{str(script)!r}, {str(tmp_path)!r}, {mode!r}]))")
  return subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                          stderr=subprocess.PIPE, text=True)


def test_launcher_forwards_a_stop_to_every_worker(tmp_path):
  import signal
  import time
  proc = _launcher(tmp_path, "wait")
  deadline = time.monotonic() + 60
  while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 0
  assert (tmp_path / "term0").exists() and (tmp_path / "term1").exists()


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  proc = _launcher(tmp_path, "fail")
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 3  # worker 1's status; worker 0 was stopped, not left waiting
  assert "[process 1] worker 1 cannot go on" in err
