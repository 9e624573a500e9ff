"""LoRA runs: the adapter spec from the config, the frozen (optionally int8) base, and adapter-only
checkpoints.

A LoRA run keeps the whole model in memory (base + adapters, one params tree) but trains and
checkpoints only the adapters when the base can be found again: when the run started from
`train.init_from` (another run or an HF import), its checkpoints hold the adapter leaves, their
optimizer state and the step, and meta["lora_base"] names the base checkpoint. Restoring (resume,
generate, eval, export) loads that base, rebuilds the same frozen base from it (merging the
source's own adapters, quantizing for QLoRA: both deterministic) and puts the adapters back.
A LoRA run from scratch (random base) has nothing to reload, so it checkpoints everything.
"""
from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax

from llmjax import checkpoint as ckpt
from llmjax import quantize
from llmjax.config import ConfigError
from llmjax.model import lora as loralib

BASE_META = "lora_base"   # meta key: {"workdir": absolute path, "step": int}
SPEC_META = "lora"        # meta key: the adapter spec and base dtype


def spec_from_config(config, model_config) -> loralib.LoraSpec | None:
  """The validated LoraSpec (None when lora.rank == 0); ConfigError (one line) if it does not fit."""
  lo = config.lora
  if lo.rank == 0:
    return None
  try:
    return loralib.make_spec(model_config, lo.rank, lo.alpha, lo.targets, lo.dropout)
  except loralib.LoraError as e:
    raise ConfigError(str(e)) from None


def wrap(model, config, model_config):
  """(model with adapters when lora.rank > 0, spec or None)."""
  spec = spec_from_config(config, model_config)
  return loralib.with_lora(model, spec), spec


def trainable_mask(params, extra=("classifier",)):
  """Adapters train; so does a freshly added task head (e.g. a classifier), as PEFT's
  modules_to_save would; every base weight is frozen."""
  def decide(path, _):
    keys = [getattr(k, "key", k) for k in path]
    return bool(keys) and (keys[-1] in loralib.ADAPTER_LEAVES or any(k in extra for k in keys))
  return jax.tree_util.tree_map_with_path(decide, params)


def lora_plus(optimizer, lr_ratio: float):
  """LoRA+ (Hayou et al. 2024): B's updates scaled by `lr_ratio`, i.e. B trains at lr_ratio times
  the learning rate of A (the update of Adam is linear in the learning rate, weight decay
  included). Stateless, so the optimizer state is unchanged; `optimizer` itself when the ratio is
  1. Leaves are found by name on the plain or boxed (nn.Partitioned) params. B is the output-side
  factor everywhere, so for the token table's adapter it is the random one (A starts at zero
  there); PEFT instead gives embedding adapters a learning rate of their own."""
  if lr_ratio == 1.0:
    return optimizer
  import optax

  def is_b(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "lora_b" for k in path), params)
  return optax.chain(optimizer, optax.masked(optax.scale(lr_ratio), is_b))


def describe(program, state) -> str:
  """One log line: what trains and what the frozen base costs."""
  spec = program.lora
  trained = sum(x.size for x in jax.tree.leaves(loralib.split(state.params)[0]))
  _, base = loralib.split(state.params)
  total = trained + sum(x.size for x in jax.tree.leaves(
      base, is_leaf=lambda x: isinstance(x, quantize.QArray)))
  return (f"LoRA rank {spec.rank} (alpha {spec.alpha:g}) on {', '.join(spec.targets)}: "
          f"{trained:,} trainable parameters ({trained / total:.2%}); frozen base in "
          f"{program.base_dtype}, {quantize.weight_bytes(base) / 2**20:.3g} MiB")


# -- the frozen base ---------------------------------------------------------------------------
def quantize_base(params, base_dtype: str):
  """QLoRA: the base's matrices as int8 (adapter leaves are not 'kernel's and stay float32)."""
  return quantize.quantize_params(params, "int8") if base_dtype == "int8" else params


def quantized_abstract(abstract_params, base_dtype: str):
  return quantize.quantize_abstract(abstract_params) if base_dtype == "int8" else abstract_params


def base_params_of(loaded):
  """The float base a new LoRA run builds on from a loaded run: its params, with its own adapters
  (if it is a LoRA run) merged in float32, so a DPO run after a LoRA SFT run starts from the SFT
  model."""
  spec = loralib.spec_of(loaded.model)
  params = quantize.dequantize_params(loaded.params)
  if spec is not None:
    params = loralib.merge(params, spec)
  return params


def load_base(source: str, step: int | None, mesh):
  """(base params as float, resolved step) from run `source`."""
  from llmjax import runs
  loaded = runs.load_run(source, step, mesh=mesh)
  return base_params_of(loaded), loaded.step


def fresh_adapter(model, init_inputs: dict, rng, shardings):
  """Newly initialized adapter leaves only (A random, B zero). jit drops the base's init as
  dead code, so no random base is ever materialized."""
  def init(r):
    params = nn.meta.unbox(model.init(r, **init_inputs)["params"])
    return loralib.split(params)[0]
  return jax.jit(init, out_shardings=shardings)(rng)


def base_meta(source: str, step: int) -> dict:
  return {"workdir": str(Path(source).absolute()), "step": int(step)}


def adapter_only(state):
  """The train state as an adapter-only checkpoint stores it."""
  return state.replace(params=loralib.split(state.params)[0])


def restore(checkpointer, abstract_state, step: int, meta: dict, mesh, base_dtype: str):
  """Restores a checkpoint of a LoRA run into full params (base + adapters). Returns
  (state, json items). Plain checkpoints go straight through."""
  if BASE_META not in meta:
    return checkpointer.restore(abstract_state, step)
  state, items = checkpointer.restore(adapter_only(abstract_state), step)
  base_info = meta[BASE_META]
  if not Path(base_info["workdir"]).exists():
    raise ckpt.CheckpointError(
        f"the LoRA checkpoint {step} in {checkpointer.directory} needs its base model "
        f"{base_info['workdir']} (step {base_info['step']}), which is gone; restore that run "
        "directory")
  base, _ = load_base(base_info["workdir"], base_info["step"], mesh)
  return state.replace(params=attach_base(base, state.params, abstract_state.params, base_dtype)), items


def float_shardings(abstract_params):
  """The shardings of the float weights (a QArray's values carry its float array's sharding)."""
  return jax.tree.map(lambda a: a.values.sharding if isinstance(a, quantize.QArray) else a.sharding,
                      abstract_params, is_leaf=lambda x: isinstance(x, quantize.QArray))


def attach_base(base, adapter, abstract_params, base_dtype: str):
  """Full params: the float `base` placed in the program's shardings (int8 for QLoRA) plus the
  adapter leaves."""
  _, base = loralib.split(base)
  _, shardings = loralib.split(float_shardings(abstract_params))
  try:
    base = jax.device_put(base, shardings)
  except ValueError as e:
    raise ckpt.CheckpointError(f"the base model does not fit this LoRA run's model ({e}); use the "
                               "same model shape as the base") from None
  return loralib.combine(quantize_base(base, base_dtype), adapter)


def spec_meta(spec: loralib.LoraSpec, base_dtype: str) -> dict:
  return dict(rank=spec.rank, alpha=spec.alpha, targets=list(spec.targets), dropout=spec.dropout,
              base_dtype=base_dtype)


def create_lora_run(workdir, base, spec: loralib.LoraSpec, adapter) -> None:
  """Writes a new LoRA run directory: `adapter` (llmjax adapter params) on the loaded run `base`,
  checkpointed adapter-only at step 0 like a LoRA run trained from `base` (peft_import)."""
  import copy

  from llmjax import config as cfglib
  from llmjax import program as programlib
  from llmjax.runs import CONFIG_FILE
  workdir = Path(workdir)
  if (workdir / ckpt.CHECKPOINT_DIR).exists() and any((workdir / ckpt.CHECKPOINT_DIR).iterdir()):
    raise ckpt.CheckpointError(f"{workdir} already holds checkpoints; choose a new --workdir")
  config = copy.deepcopy(base.config)
  config.lora.update(rank=spec.rank, alpha=spec.alpha, targets=",".join(spec.targets),
                     dropout=spec.dropout, base_dtype="float32")
  config.train.init_from = f"{base.workdir}:{base.step}"
  program = programlib.build(config, base.mesh, base.model_config)
  state = program.state_from_params(loralib.combine(base_params_of(base), adapter))
  workdir.mkdir(parents=True, exist_ok=True)
  base.tokenizer.save(workdir)
  (workdir / CONFIG_FILE).write_text(cfglib.to_json(config))
  meta = {"step": 0, "data_step": 0, "model": base.model_config.to_dict(),
          "tokenizer": {"kind": base.tokenizer.kind, "vocab_size": base.tokenizer.vocab_size},
          "init_from": config.train.init_from, SPEC_META: spec_meta(spec, "float32"),
          BASE_META: base_meta(base.workdir, base.step)}
  checkpointer = ckpt.Checkpointer(str(workdir), async_save=False)
  try:
    checkpointer.save(0, adapter_only(state), meta, {"step": 0, "seed": config.train.seed},
                      config.to_dict())
    checkpointer.wait()
  finally:
    checkpointer.close()
