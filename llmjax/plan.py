"""Memory planning before hardware: compile the train step for a target topology, report bytes.

  python -m llmjax.plan --config=experiments/gpt_small.py --topology=v5e-16 \
      --config.mesh.fsdp=-1 --config.mesh.data=1

compiles the exact train step `llmjax.main` would run (same model, optimizer, shardings, donation)
ahead of time, without running it, and prints per-device bytes for parameters, optimizer state,
the batch, and the compiler's temporaries (activations kept for the backward pass, gradients,
collective buffers), next to the target's memory per chip.

How: on a TPU topology, when libtpu is installed (`pip install "jax[tpu]"`, also on a machine
without TPUs), JAX's topology API compiles with the TPU compiler for chips that need not be there
(`--backend=tpu`). Otherwise (`--backend=cpu`, the default where libtpu is absent)
the step is compiled for a fake CPU mesh with the same number of devices and the same mesh shape.
Parameter, optimizer and batch figures are exact either way (they follow from shapes and
shardings); the temporaries from the CPU compiler are an estimate of the TPU/GPU figure (different
fusion and layouts), good to tell "fits easily" from "does not fit" and to compare remat policies
and meshes against each other.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

GIB = 1024 ** 3

# device kind -> (JAX devices per unit of the topology suffix, HBM bytes per device). TPU v4/v5p
# names count TensorCores (two per chip, one JAX device per chip); v5e/v6e names count chips.
ACCELERATORS = {
    "v4": (0.5, 32 * GIB), "v5p": (0.5, 95 * GIB), "v5e": (1, 16 * GIB), "v5litepod": (1, 16 * GIB),
    "v6e": (1, 32 * GIB), "h100": (1, 80 * GIB), "h200": (1, 141 * GIB), "a100": (1, 80 * GIB),
    "cpu": (1, 0),
}
TOPOLOGY_RE = re.compile(r"^(?:(\d+)x)?([a-z0-9]+)-(\d+)$")


class PlanError(ValueError):
  """A topology that cannot be planned; reported as one line."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  kind: str
  num_slices: int
  devices_per_slice: int
  hbm_bytes: int

  @property
  def num_devices(self) -> int:
    return self.num_slices * self.devices_per_slice

  @property
  def is_tpu(self) -> bool:
    return self.kind.startswith("v")


def parse_topology(name: str) -> Topology:
  """'v5e-16', 'v5p-64' (TensorCores), '2xv5e-256' (multi-slice), 'h100-8', 'cpu-8'."""
  match = TOPOLOGY_RE.match(name.strip().lower())
  if not match or match.group(2) not in ACCELERATORS:
    raise PlanError(f"--topology={name!r} is not understood; use e.g. v5e-16, v5p-64, v4-32, v6e-8, "
                    f"2xv5e-256 (two slices), h100-8 or cpu-8 (kinds: {', '.join(ACCELERATORS)})")
  slices, kind, count = int(match.group(1) or 1), match.group(2), int(match.group(3))
  per_unit, hbm = ACCELERATORS[kind]
  devices = int(count * per_unit)
  if devices < 1 or devices != count * per_unit:
    raise PlanError(f"--topology={name!r}: {kind}-N counts TensorCores, so N must be even")
  return Topology(name, kind, slices, devices, hbm)


# -- building the step (shared with tests: the same function llmjax.loop jits) ---------------------
def default_vocab_size(config) -> int:
  if config.model.vocab_size:
    return config.model.vocab_size
  if config.data.tokenizer == "sentencepiece":
    return config.data.sp_vocab_size
  return 256  # byte tokenizer; a char vocabulary is smaller


def build(config, mesh, vocab_size: int):
  """The training program for `config` on `mesh`: the very step `llmjax.loop` trains with."""
  from llmjax import config as cfglib
  from llmjax import program
  return program.build(config, mesh, cfglib.model_config(config, vocab_size))


def memory_report(config, mesh, vocab_size: int) -> dict:
  """Compiles the train step on `mesh` (no FLOPs run) and returns per-device byte counts."""
  from llmjax import sharding as shd

  if config.train.grad_accum_steps == 0:  # 'auto' is resolved by training; plan without it
    config.train.grad_accum_steps = 1
  program = build(config, mesh, vocab_size)
  batch = program.abstract_batch()
  with program.scope():
    compiled = program.train_step.lower(program.abstract_state, batch).compile()
  report = {"devices": mesh.size, "mesh": dict(mesh.shape),
            "batch_bytes": shd.bytes_per_device(batch)}
  memory = compiled_memory(compiled, program)
  if memory is None:  # no analysis from this backend: shapes only
    memory = {k: 0 for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                             "generated_code_bytes", "peak_bytes")}
    memory.update(params_bytes=shd.bytes_per_device(program.abstract_state.params),
                  optimizer_bytes=shd.bytes_per_device(program.abstract_state.opt_state))
  report.update(memory)
  return report


def compiled_memory(compiled, program) -> dict | None:
  """Per-device byte counts of a compiled train step (None if the backend gives none)."""
  from llmjax import sharding as shd
  stats = compiled.memory_analysis()
  state = program.abstract_state
  report = {"params_bytes": shd.bytes_per_device(state.params),
            "optimizer_bytes": shd.bytes_per_device(state.opt_state)}
  if stats is None:
    return None
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
    report[field.replace("_size_in", "")] = int(getattr(stats, field, 0) or 0)
  # Donated state buffers are reused for the outputs (alias), so the peak is roughly
  # arguments + outputs - aliased + temporaries.
  report["peak_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                          - report["alias_bytes"] + report["temp_bytes"])
  return report


def tpu_chip_grid(kind: str, chips: int) -> tuple[int, ...]:
  """The physical chip grid of a TPU slice, as libtpu names it ('v5e:4x4', 'v5p:2x4x4').

  v5e/v6e slices are 2-D (v5e-16 = 4x4, v5e-32 = 4x8); v4/v5p slices are 3-D tori grown from one
  host's 2x2x1 (v5p-16 = 8 chips = 2x2x2, v5p-128 = 64 chips = 4x4x4). Growing a slice doubles its
  shortest side, the last one on ties, which reproduces Cloud TPU's published shapes."""
  if chips < 1 or chips & (chips - 1):
    raise PlanError(f"a TPU slice of {chips} chips is not a power of two (Cloud TPU slices are); "
                    "use e.g. v5e-16 or v5p-64")
  grid = [1, 1] if kind in ("v5e", "v5litepod", "v6e") else [2, 2, 1]
  if chips < math.prod(grid):
    return tuple([chips] + [1] * (len(grid) - 1))
  while math.prod(grid) < chips:
    shortest = min(grid)
    grid[max(i for i, g in enumerate(grid) if g == shortest)] *= 2
  return tuple(grid)


def _tpu_devices(topology: Topology):
  """Compile-only devices of a TPU topology (libtpu on a CPU host; no chips needed).

  Wrap-around links (twisted tori of full pods) change collective speed, not memory, so they are
  left out."""
  from jax.experimental import topologies
  kind = "v5e" if topology.kind == "v5litepod" else topology.kind
  megacore = kind in ("v4", "v5p")  # two TensorCores per chip act as one JAX device
  grid = tpu_chip_grid(kind, topology.devices_per_slice)  # one JAX device per chip
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{kind}:{'x'.join(map(str, grid))}",
      chip_config_name="megacore" if megacore else "default",
      chips_per_host_bounds=(2, 2, 1), num_slices=topology.num_slices,
      wrap=(False,) * 3)
  return desc.devices


def _gib(n: int) -> str:
  if n >= GIB:
    return f"{n / GIB:9.2f} GiB"
  return f"{n / 2**20:9.2f} MiB"


def format_report(report: dict, topology: Topology | None, num_params: int) -> str:
  lines = [f"mesh {' x '.join(f'{k}={v}' for k, v in report['mesh'].items())} over "
           f"{report['devices']} devices ({report['backend']} compile); {num_params:,} parameters",
           "per device:"]
  rows = [("parameters", report["params_bytes"]), ("optimizer state", report["optimizer_bytes"]),
          ("batch", report["batch_bytes"]),
          ("temporaries (activations, grads)", report["temp_bytes"]),
          ("compiled arguments", report["argument_bytes"]), ("outputs", report["output_bytes"]),
          ("aliased (donated)", report["alias_bytes"]), ("estimated peak", report["peak_bytes"])]
  lines += [f"  {name:<34}{_gib(value)}" for name, value in rows]
  if topology is not None and topology.hbm_bytes:
    fits = report["peak_bytes"] <= 0.9 * topology.hbm_bytes  # leave room for the runtime
    lines.append(f"  {topology.kind} memory per device{'':<12}{_gib(topology.hbm_bytes)} -> "
                 f"{'fits' if fits else 'DOES NOT FIT'} (peak at "
                 f"{report['peak_bytes'] / topology.hbm_bytes:.0%})")
  return "\n".join(lines)


def plan(config, topology: Topology | None, vocab_size: int | None, backend: str) -> dict:
  import jax
  from llmjax import config as cfglib, sharding as shd
  from llmjax.model import num_params

  vocab = vocab_size or default_vocab_size(config)
  if backend == "tpu":
    devices = list(_tpu_devices(topology))
  else:
    devices = jax.devices()
    if topology is not None and len(devices) != topology.num_devices:
      raise PlanError(f"{len(devices)} CPU devices but {topology.name} has {topology.num_devices}; "
                      "run through `python -m llmjax.plan`, which sets XLA_FLAGS before JAX starts")
    # A fake CPU mesh has one process and no slice index: fold DCN sizes into the global mesh
    # shape, which is all per-device memory depends on.
    if topology is not None and topology.num_slices > 1:
      ici, dcn = cfglib.mesh_layout(config, topology.num_devices, topology.num_slices)
      for axis in cfglib.MESH_AXES:
        config.mesh[axis] = ici[axis] * dcn[axis]
        config.mesh.dcn[axis] = 1
  slices = topology.num_slices if (topology is not None and backend == "tpu") else 1
  cfglib.validate(config, num_devices=len(devices), num_slices=slices)
  mesh = shd.make_mesh(config, devices)
  report = memory_report(config, mesh, vocab)
  report.update(backend=backend, topology=topology.name if topology else f"cpu-{len(devices)}",
                hbm_bytes=topology.hbm_bytes if topology else 0, vocab_size=vocab,
                num_params=num_params(cfglib.model_config(config, vocab)))
  return report


# -- command line --------------------------------------------------------------------------------
def _argv_value(argv, name: str, default: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def run() -> None:
  """Sets up the fake CPU devices (before JAX starts), then parses flags and plans."""
  topo_name = _argv_value(sys.argv, "topology", "cpu-8")
  backend = _argv_value(sys.argv, "backend", "auto")
  try:
    topology = parse_topology(topo_name)
  except PlanError as e:
    print(f"llmjax: error: {e}", file=sys.stderr)
    sys.exit(2)
  if backend == "auto":
    backend = "tpu" if topology.is_tpu and _libtpu_available() else "cpu"
  if backend == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={topology.num_devices}"

  from absl import app, flags, logging
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file("config", None, "An experiment file.",
                                                lock_config=False)
  flags.DEFINE_string("topology", "cpu-8", "Target: v5e-16, v5p-64, 2xv5e-256, h100-8, cpu-8, ...")
  flags.DEFINE_enum("backend", "auto", ["auto", "cpu", "tpu"],
                    "tpu: JAX's TPU topology API (needs libtpu); cpu: a fake CPU mesh of the same size.")
  flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (default: model.vocab_size, else the "
                       "tokenizer's configured size).")
  flags.DEFINE_string("json", "", "Also write the report to this JSON file.")

  def main(argv):
    from llmjax.config import ConfigError
    if len(argv) > 1:
      print(f"llmjax: error: unexpected arguments {argv[1:]}", file=sys.stderr)
      sys.exit(2)
    if config_flag.value is None:
      print("llmjax: error: --config is required, e.g. --config=experiments/gpt_small.py",
            file=sys.stderr)
      sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    try:
      report = plan(config_flag.value, topology, flags.FLAGS.vocab_size or None, backend)
    except (ConfigError, PlanError) as e:
      print(f"llmjax: error: {e}", file=sys.stderr)
      sys.exit(2)
    print(format_report(report, topology, report["num_params"]))
    if flags.FLAGS.json:
      with open(flags.FLAGS.json, "w") as f:
        json.dump(report, f, indent=2)

  app.run(main)


if __name__ == "__main__":
  run()
