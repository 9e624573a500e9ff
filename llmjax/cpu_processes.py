"""Data parallelism over the cores of one CPU host as separate processes (`mesh.cpu_processes`).

One XLA CPU device runs a small model's step mostly on one core, and two in-process CPU devices
deadlocked in their gradient all-reduce until llmjax/cpu_devices.py sized XLA's thread pool for
them (benchmarks/RESULTS.md). So, like `torchrun
--nproc_per_node`, `python -m llmjax.main` re-launches itself as N local processes joined by
`jax.distributed` on 127.0.0.1 (CPU collectives over gloo), each with a single-threaded XLA
runtime (--xla_cpu_multi_thread_eigen=false), each taking its rows of every batch. The OS places
them (LLMJAX_CPU_PIN=1 pins each to its own core(s) instead: faster only on an idle host). The
batch is still a pure function of (seed, step) and the mesh's data axis spans the processes, so
a run trains like one process up to float rounding, resumes exactly, and process 0 alone writes
the workdir's files (as on a multi-host cluster). Their gradients cross as one flat vector
(llmjax/dp_grads.py).

`mesh.cpu_processes`:
  1 (default): one process (nothing is launched).
  N > 1: N processes.
  0 (auto): one per core this process may run on, reduced to the largest count that divides the
     micro-batch (data.batch_size / train.grad_accum_steps) per XLA device; 1 on a 1-core host.
The environment variable LLMJAX_CPU_PROCESSES, when set, overrides it. It applies to CPU runs
only: on a GPU/TPU host, or when the run is already one process of a multi-process job
(mesh.distributed / --coordinator_address, TPU pods, SLURM), it is ignored with a note, and the
run stays in this process.

The parent only launches and waits: it forwards SIGINT/SIGTERM once to every worker (they agree
on the step to stop at and save it, llmjax.preemption), stops the others when one fails (one
failed process would leave the rest waiting on a collective), and exits with the first non-zero
status. Workers die with the parent (PR_SET_PDEATHSIG), so none is left behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from llmjax.config import ConfigError

# When set, overrides mesh.cpu_processes (the test suite sets 1: its many short CLI runs of
# experiments/shakespeare_char.py would otherwise each start two processes).
COUNT_ENV = "LLMJAX_CPU_PROCESSES"
# Set in each worker's environment: "rank,count,port,launcher pid,cpus" (cpus: core ids, commas).
ENV = "LLMJAX_CPU_PROCESS"
SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"


def host_cores() -> list[int]:
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux: no pinning, one process per reported core
    return list(range(os.cpu_count() or 1))


def choose(config, cores: int | None = None, env=os.environ) -> int:
  """How many processes `config` asks for on a host with `cores` cores (see the docstring)."""
  requested = int(config.mesh.get("cpu_processes", 1))
  if env.get(COUNT_ENV, "").strip():
    try:
      requested = int(env[COUNT_ENV])
    except ValueError:
      raise ConfigError(f"{COUNT_ENV}={env[COUNT_ENV]!r} must be a process count (0: one per "
                        "core), like mesh.cpu_processes") from None
  if requested < 0:
    raise ConfigError(f"mesh.cpu_processes={requested} must be 0 (one per core), 1 (off) or a "
                      "process count")
  if requested:
    return requested
  n = cores if cores is not None else len(host_cores())
  devices = max(int(config.mesh.get("cpu_devices", 1)), 1)
  micro = config.data.batch_size // max(config.train.grad_accum_steps, 1)
  while n > 1 and micro % (n * devices):
    n -= 1
  return max(n, 1)


def is_worker(env=os.environ) -> bool:
  return bool(env.get(ENV))


def why_not(config, env=os.environ) -> str | None:
  """None when this run may launch local processes; otherwise the reason it stays in one."""
  from llmjax import distributed
  if is_worker(env):
    return "this is already a worker"
  d = config.mesh.distributed
  if d.coordinator_address or d.initialize == "on":
    return "mesh.distributed configures a multi-process job already"
  if distributed.on_tpu_pod(env) or distributed.in_slurm_job(env):
    return "this is one process of a TPU-pod/SLURM job"
  backend = default_backend(env)
  if backend != "cpu":
    return f"the default backend is {backend}, not the CPU"
  return None


def default_backend(env=os.environ) -> str:
  """The backend JAX will pick, without starting JAX when that is already clear: JAX_PLATFORMS
  names it, or no accelerator plugin is installed (then it is the CPU). Starting JAX in the
  launcher costs a second and memory it never uses."""
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip()
  if not _accelerator_plugins():
    return "cpu"
  import jax
  return jax.default_backend()


def _accelerator_plugins() -> list[str]:
  import importlib.util
  from importlib import metadata
  found = [ep.name for ep in metadata.entry_points(group="jax_plugins")]
  try:
    import pkgutil
    import jax_plugins
    found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  return found + [name for name in ("libtpu",) if importlib.util.find_spec(name) is not None]


def assign_cores(count: int, cores: list[int]) -> list[list[int]]:
  """Each process's cores: an even split when there are enough, else one core each, round robin."""
  if count <= len(cores):
    per = len(cores) // count
    return [cores[i * per:(i + 1) * per] for i in range(count)]
  return [[cores[i % len(cores)]] for i in range(count)]


def worker_env(rank: int, count: int, port: int, cpus: list[int], env=os.environ) -> dict:
  """The environment of worker `rank` (the launcher's, plus who it is and a 1-thread runtime)."""
  flags = env.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:  # one core each: no intra-op thread pool
    flags = f"{flags} {SINGLE_THREAD_FLAG}".strip()
  return {**env, ENV: f"{rank},{count},{port},{os.getpid()},{','.join(map(str, cpus))}",
          "XLA_FLAGS": flags,
          "JAX_PLATFORMS": "cpu"}


def join(config, env=os.environ) -> tuple[int, int] | None:
  """In a worker: pins it to its cores and points config.mesh.distributed at the coordinator
  (call before JAX starts). Returns (rank, count), or None outside a worker."""
  spec = env.get(ENV)
  if not spec:
    return None
  rank, count, port, parent, cpus = spec.split(",", 4)
  _die_with_parent(int(parent))
  # Pinning is opt-in (LLMJAX_CPU_PIN=1): on a shared 2-core host (load 12) pinned workers ran
  # 210 ms/step against 95 ms unpinned, as a pinned worker cannot leave a core another job holds.
  if cpus and hasattr(os, "sched_setaffinity") and env.get("LLMJAX_CPU_PIN", "0") == "1":
    try:
      os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    except OSError:  # a container may refuse; the run is still correct, only slower
      pass
  d = config.mesh.distributed
  d.coordinator_address, d.num_processes, d.process_id = f"127.0.0.1:{port}", int(count), int(rank)
  d.initialize = "on"
  return int(rank), int(count)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent(parent: int) -> None:
  """The worker gets SIGKILL when the launching process dies (Linux; set here rather than in a
  preexec_fn, which would fork a possibly multithreaded launcher)."""
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # the launcher died before the line above ran
    os._exit(1)


def launch(count: int, argv: list[str] | None = None, quiet_others: bool = True) -> int:
  """Runs `python argv...` (default: this process's own command line) as `count` workers and
  waits for them; returns the exit status (the first non-zero one)."""
  argv = list(sys.argv if argv is None else argv)
  cmd = [sys.executable, *_own_command(argv)]
  port = _free_port()
  cores = assign_cores(count, host_cores())
  procs, errors = [], []
  for rank in range(count):
    # Rank 0 speaks for the run (the loop logs on process 0 only). The others' stderr is kept
    # aside and shown only when one of them failed first: an error every process meets (a
    # missing data file) is then said once.
    quiet = quiet_others and rank > 0
    err = tempfile.TemporaryFile("w+") if quiet else None
    errors.append(err)
    procs.append(subprocess.Popen(cmd, env=worker_env(rank, count, port, cores[rank]),
                                  stdout=subprocess.DEVNULL if quiet else None, stderr=err,
                                  # its own process group: a Ctrl-C reaches the launcher only,
                                  # which forwards it once to every worker
                                  process_group=0))
  forwarded = []

  def forward(signum, frame):
    forwarded.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)  # a second one aborts the workers, as it would one process

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  status = 0
  try:
    while [p.poll() for p in procs].count(None):  # poll every one (any() would stop at the first)
      failed = [p.returncode for p in procs if p.returncode]
      if failed:  # the others would wait on a collective forever
        status = failed[0]
        break
      time.sleep(0.05)
    status = status or next((p.returncode for p in procs if p.returncode), 0)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for s, h in previous.items():
      signal.signal(s, h)
    if status and procs[0].returncode != status:  # a worker other than rank 0 failed first
      for rank, (p, err) in enumerate(zip(procs, errors)):
        if err is not None and p.returncode == status:
          err.seek(0)
          sys.stderr.write("".join(f"[process {rank}] {line}" for line in err.readlines()[-20:]))
          break
    for err in errors:
      if err is not None:
        err.close()
  return status


def _own_command(argv: list[str]) -> list[str]:
  """The arguments that re-run this program: `-m module ...` when it was started with -m."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name:
    name = spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name
    return ["-m", name, *argv[1:]]
  return argv
