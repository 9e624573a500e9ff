"""Does the train step fit the device? Checked once, right after compiling, before the first step.

The compiled step's own memory analysis (XLA's figure for arguments, outputs, donated buffers and
temporaries; the same one `llmjax.plan` reports) is compared with the memory each device has: its
allocator limit on GPU/TPU, the host's available RAM (shared by its CPU devices) on CPU. A step
that cannot fit is refused in one line naming both figures and the fixes, instead of dying minutes
later in an allocation failure; `train.grad_accum_steps=auto` (0) instead picks the smallest
accumulation that fits (the update is the same up to rounding). The executable compiled here is
the one jit reuses for the first step, so the check costs tracing only.
"""
from __future__ import annotations

import math
import os

import jax

from llmjax import config as cfglib
from llmjax import program as programlib

GIB = 1024 ** 3
AUTO = 0  # train.grad_accum_steps value meaning "the smallest that fits"


def _gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def host_available_bytes() -> int | None:
  """MemAvailable (Linux), else free physical pages; None when the OS does not say."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def device_limit(config) -> tuple[int | None, str]:
  """(bytes one device may use, where the figure comes from); (None, why) when unknown."""
  if config.train.device_memory > 0:
    return int(config.train.device_memory), "train.device_memory"
  if config.train.device_memory < 0:
    return None, "check disabled (train.device_memory<0)"
  device = jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without allocator statistics
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), \
        f"{device.device_kind} memory free"
  if device.platform == "cpu":
    available = host_available_bytes()
    if available:
      return available // jax.local_device_count(), (
          "available host RAM" + (f" / {jax.local_device_count()} CPU devices"
                                  if jax.local_device_count() > 1 else ""))
  return None, "unknown"


def agreed_limit(limit: int | None) -> int | None:
  """The smallest limit over all processes (hosts may have different free memory, and every
  process must compile the same step); None if any process cannot tell."""
  if jax.process_count() == 1:
    return limit
  import numpy as np
  from jax.experimental import multihost_utils
  # in KiB: without jax_enable_x64 the all-gather carries int32, and bytes (17 GB of host RAM)
  # would wrap around (a 17 GB host then read as 0.3 MiB and refused every step; issue 12)
  kib = -1 if limit is None else min(limit // 1024, np.iinfo(np.int32).max)
  values = np.asarray(multihost_utils.process_allgather(np.int32(kib)))
  return None if (values < 0).any() else int(values.min()) * 1024


def step_memory(program, batch_keys) -> dict | None:
  """Per-device bytes of the compiled train step (None when the backend gives no analysis)."""
  from llmjax import plan
  batch = {k: v for k, v in program.abstract_batch().items()}
  spec = next(iter(batch.values()))
  batch.update({k: spec for k in batch_keys if k not in batch})  # e.g. packing's segment ids
  with program.scope():
    compiled = program.train_step.lower(program.abstract_state, batch).compile()
  return plan.compiled_memory(compiled, program)


def accumulation_choices(config, data_parallel: int) -> list[int]:
  """Accumulation counts that split the batch into equal micro-batches the mesh can shard."""
  b = config.data.batch_size
  return [a for a in range(1, b + 1) if b % a == 0 and (b // a) % data_parallel == 0]


def _describe(stats: dict) -> str:
  return (f"{_gib(stats['peak_bytes'])} per device (arguments {_gib(stats['argument_bytes'])}, "
          f"temporaries {_gib(stats['temp_bytes'])})")


def fit(config, mesh, model_config, batch_keys=(), log=print):
  """The program for `config` whose compiled step fits the device memory. Resolves
  train.grad_accum_steps=auto in `config`. Raises ConfigError (one line) when nothing fits."""
  t = config.train
  auto = t.grad_accum_steps == AUTO
  limit, source = device_limit(config)
  limit = agreed_limit(limit)
  data_parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  choices = accumulation_choices(config, data_parallel) if auto else [t.grad_accum_steps]

  def build(accum):
    t.grad_accum_steps = accum
    return programlib.build(config, mesh, model_config)

  program = build(choices[0])
  if limit is None:
    if auto:
      log(f"train.grad_accum_steps=auto: 1 (device memory {source}; nothing to fit against)")
    return program
  stats = step_memory(program, batch_keys)
  if stats is None or stats["peak_bytes"] <= limit:
    if auto:
      log(f"train.grad_accum_steps=auto: {choices[0]} micro-batch(es) fit "
          f"({_gib(stats['peak_bytes']) if stats else '?'} of {_gib(limit)}, {source})")
    return program
  first = stats
  if auto:
    # Temporaries shrink about in proportion to the micro-batch; start at the predicted count
    # (one extra gradient buffer is held while accumulating) and verify by compiling.
    fixed = first["peak_bytes"] - first["temp_bytes"] + first["params_bytes"]
    room = limit - fixed
    start = math.ceil(first["temp_bytes"] / room) if room > 0 else choices[-1]
    tried = {choices[0]: first}
    for accum in [a for a in choices if a >= max(start, 2)] or choices[-1:]:
      program = build(accum)
      stats = tried[accum] = step_memory(program, batch_keys)
      if stats is None or stats["peak_bytes"] <= limit:
        # The prediction may overshoot: step down while a smaller count also fits.
        smaller = [a for a in choices if a < accum]
        while smaller and smaller[-1] not in tried:
          candidate = build(smaller.pop())
          found = tried[t.grad_accum_steps] = step_memory(candidate, batch_keys)
          if found is not None and found["peak_bytes"] > limit:
            break
          program, stats, accum = candidate, found, t.grad_accum_steps
        t.grad_accum_steps = accum
        log(f"train.grad_accum_steps=auto: {accum} micro-batches of "
            f"{config.data.batch_size // accum} sequences fit ({_gib(stats['peak_bytes'])} of "
            f"{_gib(limit)}, {source}; without accumulation the step needs "
            f"{_gib(first['peak_bytes'])})")
        return program
    raise cfglib.ConfigError(
        f"the train step does not fit even with train.grad_accum_steps={choices[-1]} (micro-batches "
        f"of {config.data.batch_size // choices[-1]}): it needs {_describe(stats)} but the device "
        f"has {_gib(limit)} ({source}); set --config.model.remat_policy (e.g. full), shorten "
        "data.seq_len, use a smaller model (e.g. experiments/gpt_small.py:tiny) or more devices")
  raise cfglib.ConfigError(
      f"the train step needs {_describe(first)} but the device has {_gib(limit)} ({source}); use "
      f"micro-batches (--config.train.grad_accum_steps=auto picks the smallest count that fits), "
      "--config.model.remat_policy (e.g. full), or a smaller model (e.g. "
      "experiments/gpt_small.py:tiny)")
