"""Opening a run for evaluation on this machine's devices."""
from __future__ import annotations

import jax

from llmjax import config as cfglib
from llmjax import sharding as shd


def eval_mesh(config, override=None):
  """A mesh for evaluating a run with `config` here: `override`'s mesh if given (a ConfigError if
  it does not fit), else the run's own mesh, else plain data parallelism over every device, else
  one device. `config.mesh` is updated to the mesh chosen."""
  if override is not None:
    config.mesh.update(override.mesh.to_dict())
    cfglib.validate(config, num_devices=jax.device_count())
    return shd.make_mesh(config)
  try:
    cfglib.validate(config, num_devices=jax.device_count())  # e.g. batch vs the new mesh
    return shd.make_mesh(config)
  except cfglib.ConfigError:
    pass
  config.mesh.update(data=-1, fsdp=1, sequence=1, tensor=1)
  config.mesh.dcn.update(data=1, fsdp=1, sequence=1, tensor=1)
  try:
    cfglib.validate(config, num_devices=jax.device_count())
    return shd.make_mesh(config)
  except cfglib.ConfigError:  # e.g. the run's batch does not split over this many devices
    config.mesh.data = 1
    return shd.make_mesh(config, devices=jax.devices()[:1])


def load(workdir: str, step=None):
  """The run's LoadedRun (checkpoint `step`, default the latest) placed on `eval_mesh`."""
  from llmjax import runs
  return runs.load_run(workdir, step, mesh=eval_mesh(runs.read_config(workdir)))
