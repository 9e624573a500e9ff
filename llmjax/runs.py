"""Open a run directory for inference, or create one from existing weights.

A run directory holds `config.json`, the tokenizer and `checkpoints/`. Generation, evaluation,
Hugging Face export and `init_from` all open runs through `load_run`; Hugging Face import creates
one through `create_run`, so every tool reads and writes the same format as training.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from llmjax import checkpoint as ckpt
from llmjax import config as cfglib
from llmjax import program as programlib
from llmjax import sharding as shd
from llmjax import train as trainlib
from llmjax.data import load_tokenizer
from llmjax.model import Transformer, TransformerConfig  # noqa: F401 (LoadedRun.model's type)
from llmjax.optim import make_optimizer

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class LoadedRun:
  config: object                 # the run's ml_collections.ConfigDict
  model_config: TransformerConfig
  model: Transformer
  params: dict
  tokenizer: object
  step: int
  mesh: object
  objective: object = None       # the run's llmjax.objectives.Objective (train.objective)


def read_config(workdir: str | Path):
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir} is not an llmjax run directory (no {CONFIG_FILE}); "
                            "pass the --workdir of a training run or of an HF import")
  return cfglib.from_json(path.read_text())


def load_run(workdir: str | Path, step: int | str | None = None, mesh=None) -> LoadedRun:
  """The parameters of checkpoint `step` (default: the latest complete one), placed on `mesh`
  (default: the run's mesh config over this host's devices, or one device if it does not fit)."""
  config = read_config(workdir)
  checkpointer = ckpt.Checkpointer(str(workdir), async_save=False, read_only=True)
  try:
    step = ckpt.resolve_step(workdir, step)  # int, None (latest) or 'best'
    steps = checkpointer.all_steps()
    if not steps:
      raise ckpt.CheckpointError(f"no checkpoint in {checkpointer.directory}")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ckpt.CheckpointError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                                 f"available steps: {', '.join(map(str, sorted(steps)))}")
    meta = checkpointer.read_meta(step)
    model_config = TransformerConfig.from_mapping(meta["model"])
    if mesh is None:
      mesh = _default_mesh(config)
    program = programlib.build(config, mesh, model_config)
    state, _ = checkpointer.restore(program.abstract_state, step)
  finally:
    checkpointer.close()
  return LoadedRun(config=config, model_config=model_config, model=program.model,
                   params=state.params, tokenizer=load_tokenizer(workdir), step=int(step), mesh=mesh,
                   objective=program.objective)


def _default_mesh(config):
  try:
    return shd.make_mesh(config)
  except cfglib.ConfigError:
    single = cfglib.default_config()
    single.mesh.update(data=1, fsdp=1, tensor=1)
    return shd.make_mesh(single, devices=jax.devices()[:1])


def create_run(workdir: str | Path, config, params, tokenizer, step: int = 0) -> None:
  """Writes a new run directory whose checkpoint `step` holds `params` and a fresh optimizer
  state: training with this workdir continues from these weights, and eval/generate/export
  accept it like any trained run. Refuses to overwrite an existing run."""
  workdir = Path(workdir)
  if (workdir / ckpt.CHECKPOINT_DIR).exists() and any((workdir / ckpt.CHECKPOINT_DIR).iterdir()):
    raise ckpt.CheckpointError(f"{workdir} already holds checkpoints; choose a new --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  model_config = cfglib.model_config(config, tokenizer.vocab_size)
  config.model.vocab_size = model_config.vocab_size
  optimizer, _ = make_optimizer(config.optim, config.train.steps)
  state = trainlib.TrainState.create(step, params, optimizer.init(params))
  tokenizer.save(workdir)
  (workdir / CONFIG_FILE).write_text(cfglib.to_json(config))
  checkpointer = ckpt.Checkpointer(str(workdir), async_save=False)
  try:
    meta = {"step": step, "data_step": step, "model": model_config.to_dict(),
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}}
    checkpointer.save(step, state, meta, {"step": step, "seed": config.train.seed},
                      config.to_dict())
    checkpointer.wait()
  finally:
    checkpointer.close()
