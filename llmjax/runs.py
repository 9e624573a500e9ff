"""Open a run directory for inference, or create one from existing weights.

A run directory holds `config.json`, the tokenizer and `checkpoints/`. Generation, evaluation,
Hugging Face export and `init_from` all open runs through `load_run`; Hugging Face import creates
one through `create_run`, so every tool reads and writes the same format as training.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import jax

from llmjax import adapters
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
  workdir: str = ""              # absolute path of the run directory (LoRA runs name their base)


def read_config(workdir: str | Path):
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir} is not an llmjax run directory (no {CONFIG_FILE}); "
                            "pass the --workdir of a training run or of an HF import")
  return cfglib.from_json(path.read_text())


def load_run(workdir: str | Path, step: int | str | None = None, mesh=None) -> LoadedRun:
  """The parameters of checkpoint `step` (default: the latest one that restores), placed on
  `mesh` (default: the run's mesh config over this host's devices, or one device if it does not
  fit). A damaged latest checkpoint is skipped with a warning (left in place: readers never move
  a run's files); an explicit damaged `step` is a CheckpointError naming it."""
  config = read_config(workdir)
  checkpointer = ckpt.Checkpointer(str(workdir), async_save=False, read_only=True)
  try:
    step = ckpt.resolve_step(workdir, step)  # int, None (latest) or 'best'
    steps = checkpointer.all_steps()
    if not steps:
      raise ckpt.CheckpointError(f"no checkpoint in {checkpointer.directory}")
    if step is not None and step not in steps:
      raise ckpt.CheckpointError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                                 f"available steps: {', '.join(map(str, sorted(steps)))}")
    candidates = [step] if step is not None else sorted(steps, reverse=True)
    if mesh is None:
      mesh = _default_mesh(config)
    for i, candidate in enumerate(candidates):
      try:
        meta = checkpointer.read_meta(candidate)
        model_config = TransformerConfig.from_mapping(meta["model"])
        program = programlib.build(config, mesh, model_config)
        state, _ = adapters.restore(checkpointer, program.abstract_state, candidate, meta,
                                    mesh, program.base_dtype)
        step = candidate
        break
      except ckpt.DamagedCheckpoint as e:
        if i + 1 == len(candidates):
          raise
        print(f"llmjax: warning: {e.args[0].split('; restore')[0]}; using step "
              f"{candidates[i + 1]} instead", file=sys.stderr, flush=True)
    tokenizer = run_tokenizer(workdir, checkpointer, step)
  finally:
    checkpointer.close()
  return LoadedRun(config=config, model_config=model_config, model=program.model,
                   params=state.params, tokenizer=tokenizer, step=int(step), mesh=mesh,
                   objective=program.objective, workdir=str(Path(workdir).absolute()))


def run_tokenizer(workdir: str | Path, checkpointer, step: int):
  """The run's tokenizer from its workdir; if that file is gone, from checkpoint `step` (written
  back into the workdir when it is writable, else into a temporary directory)."""
  try:
    return load_tokenizer(workdir)
  except FileNotFoundError:
    item = checkpointer.read_tokenizer(step)
    if item is None:
      raise
  target = Path(workdir)
  try:
    ckpt.write_tokenizer_files(item, target)
  except OSError:
    target = Path(tempfile.mkdtemp(prefix="llmjax-tokenizer-"))
    ckpt.write_tokenizer_files(item, target)
  print(f"llmjax: restored the tokenizer into {target} from checkpoint step {step}",
        file=sys.stderr, flush=True)
  return load_tokenizer(target)


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
  from llmjax import workdir as workdir_lib
  workdir = Path(workdir)
  if (workdir / ckpt.CHECKPOINT_DIR).exists() and any((workdir / ckpt.CHECKPOINT_DIR).iterdir()):
    raise ckpt.CheckpointError(f"{workdir} already holds checkpoints; choose a new --workdir")
  held = workdir_lib.holds(workdir)
  workdir = workdir_lib.claim(workdir)  # never over a stranger's config.json; one writer
  try:
    _write_new_run(workdir, config, params, tokenizer, step)
  finally:
    if not held:
      workdir_lib.release(workdir)


def _write_new_run(workdir: Path, config, params, tokenizer, step: int) -> None:
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
                      config.to_dict(), tokenizer=ckpt.tokenizer_item(tokenizer))
    checkpointer.wait()
  finally:
    checkpointer.close()
