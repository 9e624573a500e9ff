"""Orbax checkpoints of the whole run: train state, data-iterator position, and resolved config.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a checkpoint that looks finished; `latest_step()` only ever sees complete ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or does not fit this run: reported as one line."""


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, keep_period: int | None = None):
    self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None, create=True,
        enable_async_checkpointing=async_save)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))
    except OSError as e:
      raise CheckpointError(f"cannot create checkpoint directory {self.directory}: {e.strerror}; "
                            "choose a writable --workdir") from None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` and the JSON-able `meta` at `step`."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, abstract_state, step: int | None = None):
    """Restores the state into the shardings carried by `abstract_state`'s ShapeDtypeStructs.

    Returns (state, meta)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract, shardings):
  """ShapeDtypeStructs that tell Orbax where each restored array must live."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def describe_meta(meta: dict) -> str:
  return json.dumps(meta, sort_keys=True)
