"""How many XLA devices a CPU host is split into, chosen from the config before JAX starts.

One XLA CPU device runs a small model's step mostly on one core. Splitting the host into one XLA
device per core and sharding the batch over them (the `mesh.data` axis) runs the halves of the
batch concurrently, through the same SPMD data-parallel path that multi-GPU runs use.

The in-process all-reduce deadlock, and its fix (issue 12): XLA:CPU runs an all-reduce thunk on a
worker thread of the client's intra-op pool and blocks that thread until every device's thunk has
arrived at the rendezvous. The pool has one thread per core (PJRT_NPROC / NPROC override it), so
with N devices on fewer than 2N threads a device can wait forever for a thread to reach its own
all-reduce: "Termination timeout for all reduce ... only 1 of them arrived", then an abort. With
jax/jaxlib 0.10.2 on the 2-core host a 2-device psum after a chain of matmuls deadlocked in every
run with 2 or 3 threads and never with 4, 5 or 8; 3 devices needed 6 (benchmarks/RESULTS.md).
So with N > 1 devices `configure_cpu_devices` sizes the pool at max(cores, 2N) threads unless
PJRT_NPROC or NPROC is set. It stays NOT the default: it does not make the steps faster here.

`mesh.cpu_devices`:
  1 (default): a single CPU device (XLA's own default).
  N: N devices.
  0 (auto): one device per core (at most MAX_AUTO_DEVICES) when the mesh is the default
     data-parallel one (data=-1, every other axis 1), reduced to the largest count that divides the
     micro-batch; an explicitly sized mesh gets exactly the devices it names.
It only affects the CPU backend (on GPU/TPU hosts the accelerators are the devices), and it never
overrides a device count the user already set with XLA_FLAGS=--xla_force_host_platform_device_count
or jax.config's jax_num_cpu_devices.
"""
from __future__ import annotations

import math
import os

MAX_AUTO_DEVICES = 8
_XLA_FLAG = "xla_force_host_platform_device_count"
# Read by the XLA:CPU client when it is created: the size of its thread pools.
POOL_ENVS = ("PJRT_NPROC", "NPROC")


def pool_threads(devices: int, cores: int | None = None) -> int:
  """Threads the CPU client needs so that `devices` in-process devices cannot starve one
  another's all-reduce (see the module docstring): two per device, at least one per core."""
  return max(cores or host_cores(), 2 * devices)


def size_thread_pool(devices: int, env=os.environ) -> int | None:
  """Sets PJRT_NPROC for `devices` > 1 unless the user set PJRT_NPROC/NPROC; returns the size
  set, or None."""
  if devices <= 1 or any(env.get(k, "").strip() for k in POOL_ENVS):
    return None
  env["PJRT_NPROC"] = str(pool_threads(devices))
  return int(env["PJRT_NPROC"])


def host_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def choose_cpu_devices(config, cores: int | None = None) -> int:
  """The number of XLA CPU devices `config` asks for (see the module docstring)."""
  requested = int(config.mesh.get("cpu_devices", 0))
  if requested > 0:
    return requested
  axes = [a for a in ("data", "fsdp", "sequence", "tensor") if a in config.mesh]
  sizes = [int(config.mesh[a]) for a in axes]
  if sizes.count(-1) == 0:
    return math.prod(sizes)  # an explicit mesh needs exactly this many devices (per process)
  if sizes != [-1] + [1] * (len(axes) - 1):
    return 1                 # -1 on another axis with others fixed: leave XLA's default
  micro = config.data.batch_size // max(config.train.grad_accum_steps, 1)
  n = min(cores or host_cores(), MAX_AUTO_DEVICES)
  while n > 1 and micro % n:
    n -= 1
  return max(n, 1)


def configure_cpu_devices(config) -> int | None:
  """Sets jax_num_cpu_devices from the config; call before JAX initializes a backend.

  Returns the count it set, or None when it left things alone (the user chose via XLA_FLAGS /
  jax.config, or JAX has already started and the count can no longer change).
  """
  import jax
  if _XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  if jax.config.jax_num_cpu_devices != -1:
    return None
  n = choose_cpu_devices(config)
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # a backend is already up (e.g. called twice in one process)
    return None
  size_thread_pool(n)  # before the client exists: it reads the size once
  return n
