"""Multi-host start-up: one `jax.distributed.initialize` call before anything touches devices.

On TPU pods and in SLURM jobs JAX finds the coordinator, process count and process id itself; on
other clusters (or for the local multi-process launcher) they come from config/flags:
  --config.mesh.distributed.coordinator_address=10.0.0.1:1234
  --config.mesh.distributed.num_processes=2 --config.mesh.distributed.process_id=0
(`python -m llmjax.main` also accepts the short flags --coordinator_address, --num_processes,
--process_id.) After this every process sees all devices of the job; `jax.process_index()` is its
rank, and the data layer feeds each process only its own rows of the global batch.
"""
from __future__ import annotations

import os

from llmjax.config import ConfigError

# Environment variables that mean "this process is one worker of a multi-host TPU slice".
TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def on_tpu_pod(env=os.environ) -> bool:
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def in_slurm_job(env=os.environ) -> bool:
  """A SLURM step with more than one task (one task per host/GPU set)."""
  return "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1


def plan(settings, env=os.environ) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, or None for a single-process run.

  settings: the config's mesh.distributed section (initialize, coordinator_address,
  num_processes, process_id, timeout_s)."""
  mode = settings.initialize
  explicit = bool(settings.coordinator_address)
  if mode == "off":
    return None
  if mode == "auto" and not (explicit or on_tpu_pod(env) or in_slurm_job(env)):
    return None
  kwargs = {"initialization_timeout": int(settings.timeout_s)}
  if explicit:
    if settings.num_processes < 1 or settings.process_id < 0:
      raise ConfigError("mesh.distributed.coordinator_address is set, so num_processes and "
                        "process_id are needed too: pass --num_processes=N --process_id=I")
    if settings.process_id >= settings.num_processes:
      raise ConfigError(f"mesh.distributed.process_id={settings.process_id} must be below "
                        f"num_processes={settings.num_processes}")
    kwargs.update(coordinator_address=settings.coordinator_address,
                  num_processes=int(settings.num_processes), process_id=int(settings.process_id))
  else:
    # TPU pod / SLURM: JAX's cluster detection fills in everything left unset.
    if settings.num_processes:
      kwargs["num_processes"] = int(settings.num_processes)
    if settings.process_id >= 0:
      kwargs["process_id"] = int(settings.process_id)
  return kwargs


_initialized = False


def initialize(config, env=os.environ) -> bool:
  """Initializes the JAX distributed runtime when the config or environment asks for it.

  Must run before the first call that touches devices (jax.devices(), jax.device_count(), any
  array creation). Returns True when this is a multi-process run."""
  global _initialized
  kwargs = plan(config.mesh.distributed, env)
  if kwargs is None or _initialized:
    return _initialized
  import jax
  jax.distributed.initialize(**kwargs)
  _initialized = True
  return True


def apply_flags(config, coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Copies the short command-line flags into the config (they win over the config file)."""
  d = config.mesh.distributed
  if coordinator_address:
    d.coordinator_address = coordinator_address
  if num_processes:
    d.num_processes = num_processes
  if process_id >= 0:
    d.process_id = process_id
