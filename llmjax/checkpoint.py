"""Orbax checkpoints of the whole run: train state, data-iterator position, resolved config, metadata.

Each step is one Orbax composite checkpoint `checkpoints/<step>/` with five items:
  state   the TrainState (step, params, optimizer state, non-finite counters) as sharded arrays
  data    the data-iterator position: batches are a pure function of (seed, split, step), so the
          position is the step; it is stored explicitly so a reader never has to assume that
  config  the fully resolved run configuration
  meta    what a reader needs without the config code: step, model config, tokenizer identity,
          corpus fingerprint
  tokenizer  the tokenizer's files (base64), so a checkpoint is self-contained: a run whose
          tokenizer.json was deleted gets it back from here (checkpoints written before this
          item existed simply lack it)

No RNG key is stored: dropout and masking randomness is `fold_in(key(train.seed), step)`, so the
step *is* the RNG state and restoring the step restores the random stream bit for bit.

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it only when
every item is complete, so a process killed at any moment (even mid async save) never leaves a
directory that `latest_step()` takes for a checkpoint; the partial directory is deleted the next
time a writer opens the directory (`cleanup_tmp_directories`). Old checkpoints are garbage-collected
only after a new one finalized successfully, so a failing save never deletes earlier ones.

Damage: a checkpoint that fails to read (truncated or deleted files) raises `DamagedCheckpoint`.
Training then falls back to the newest checkpoint that restores and moves the damaged one aside
to `checkpoints/<step>.damaged` (`quarantine`): a user's data is never deleted.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "data", "config", "meta", "tokenizer")
_DELETING = ".llmjax-deleting"
DAMAGED_SUFFIX = ".damaged"

# Model fields that may change between a checkpoint and the run resuming it: they change how the
# model is computed (precision, memory, kernels, init of *new* runs), not which parameters exist
# or what they mean.
RUNTIME_MODEL_FIELDS = frozenset({"dtype", "logits_dtype", "remat_policy", "attention_impl",
                                  "scan_layers", "dropout", "init_std"})


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or does not fit this run: reported as one line."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint whose files cannot be read (truncated, partly deleted, corrupt)."""

  def __init__(self, step: int, directory: Path, reason: str):
    super().__init__(f"checkpoint step {step} in {directory} is damaged ({reason}); restore its "
                     f"files, or pass another --step (steps: see {directory})")
    self.step, self.reason = step, reason


def _one_line(error: BaseException, limit: int = 300) -> str:
  """The most specific message in an exception chain, on one line (Orbax/TensorStore errors
  wrap the OS error several levels deep)."""
  seen, e, best = set(), error, None
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.strerror:
      best = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    e = e.__cause__ or e.__context__
  text = best or (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text.split(" See full TensorStore details")[0]  # the rest is a pybind repr, not a reason
  code = re.search(r"os_error_code='?(\d+)", text)  # TensorStore reports errno this way
  if code and not best:
    text = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
  return text if len(text) <= limit else text[:limit] + "..."


def _drop_orbax_tracebacks(record) -> bool:
  """Orbax logs a failed background save with a full traceback from its own thread; we re-raise
  the same failure as one CheckpointError line, so the traceback is only noise."""
  return not (record.exc_info and "orbax" in (record.pathname or ""))


def _is_closed_loop_noise(exc_type, exc, tb) -> bool:
  """TensorStore's I/O threads complete a failed write by calling `call_soon_threadsafe` on the
  event loop Orbax already closed after the failure: each such callback raises this, and the C++
  side prints it as a traceback (about 185 of them on a full disk). The failure itself is reported
  once, as a CheckpointError."""
  if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
    return False
  import traceback
  return any(f.filename.endswith(("asyncio/base_events.py", "asyncio\\base_events.py"))
             for f in traceback.extract_tb(tb))


def _is_orbax_noise(tb) -> bool:
  """A failed read of a damaged checkpoint (or a failed write on a full disk) fails in one of
  Orbax's per-array coroutines; the others are dropped and each reports the same failure again
  ("Exception ignored in", "Task exception was never retrieved") when collected. The failure
  itself is reported once (DamagedCheckpoint / CheckpointError)."""
  import traceback
  return any("/orbax/checkpoint/" in f.filename.replace("\\", "/")
             for f in traceback.extract_tb(tb))


def _install_closed_loop_filter() -> None:
  import sys
  previous = sys.excepthook
  if getattr(previous, "_llmjax_filter", False):
    return

  def hook(exc_type, exc, tb):
    if not _is_closed_loop_noise(exc_type, exc, tb):
      previous(exc_type, exc, tb)
  hook._llmjax_filter = True
  sys.excepthook = hook
  # the same noise may arrive as an "unraisable" exception or from a Python thread
  previous_unraisable = sys.unraisablehook

  def unraisable(args):
    if not (_is_closed_loop_noise(args.exc_type, args.exc_value, args.exc_traceback)
            or _is_orbax_noise(args.exc_traceback)):
      previous_unraisable(args)
  sys.unraisablehook = unraisable
  import threading
  previous_thread = threading.excepthook

  def thread_hook(args):
    if not _is_closed_loop_noise(args.exc_type, args.exc_value, args.exc_traceback):
      previous_thread(args)
  threading.excepthook = thread_hook


def _drop_orbax_task_noise(record) -> bool:
  """asyncio logs "Task exception was never retrieved" for Orbax's other write tasks once one
  write failed: the same failure, already reported once as a CheckpointError."""
  exc = getattr(record, "exc_info", None)
  if exc and exc[2] is not None and _is_orbax_noise(exc[2]):
    return False
  context = record.getMessage()
  return not ("never retrieved" in context and "orbax" in context)


def _quiet_orbax_errors() -> None:
  import logging
  logger = logging.getLogger("absl")
  if _drop_orbax_tracebacks not in logger.filters:
    logger.addFilter(_drop_orbax_tracebacks)
  aio = logging.getLogger("asyncio")
  if _drop_orbax_task_noise not in aio.filters:
    aio.addFilter(_drop_orbax_task_noise)
  _install_closed_loop_filter()


def _check_writable(directory: Path) -> None:
  """Fails early, before any training, when checkpoints could not be written."""
  probe = directory / f".llmjax-write-test-{os.getpid()}-{jax.process_index()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f"checkpoint directory {directory} is not writable ({e.strerror}); "
                          "choose another --workdir or fix its permissions") from None


# -- the best checkpoint (train.keep_best) -------------------------------------------------------
BEST_FILE = "best.json"  # in the checkpoints directory: {"metric", "value", "step", "mode"}
LOWER_IS_BETTER = ("loss", "perplexity", "bpb", "bpc")


def metric_mode(metric: str) -> str:
  """'min' for losses/perplexities/bits, 'max' for scores (accuracy, F1, exact match, ...)."""
  name = metric.split("/")[-1]
  return "min" if name in LOWER_IS_BETTER or name.endswith("loss") else "max"


def read_best(directory: Path) -> dict | None:
  path = Path(directory) / BEST_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text())


def write_best(directory: Path, record: dict) -> None:
  """Atomically records the best step (only after that step's checkpoint is complete)."""
  path = Path(directory) / BEST_FILE
  tmp = path.with_name(f"{BEST_FILE}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(record, indent=2))
  os.replace(tmp, path)


def resolve_step(workdir, step):
  """The one place a user's step is resolved, for every tool that takes one (--step of
  generate, --mode=eval, export, evaluate; init_from=RUN:step): None or '' -> None (latest);
  an int or digit string -> int; 'best' -> the step train.keep_best recorded. One-line
  CheckpointError otherwise."""
  if step is None or step == "":
    return None
  if isinstance(step, (int, np.integer)):
    return int(step)
  text = str(step).strip()
  if text.isdigit():
    return int(text)
  if text == "best":
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    best = read_best(directory)
    if best is None:
      raise CheckpointError(f"{workdir} has no best checkpoint ({directory / BEST_FILE} is "
                            "missing); train it with --config.train.keep_best=val/loss (or another "
                            "val metric), or give a step number")
    return int(best["step"])
  raise CheckpointError(f"step {text!r} is not a step number or 'best'")


class Checkpointer:
  """A CheckpointManager with the run's four items. `read_only=True` opens another run's
  checkpoints for evaluation or `init_from` without cleaning up (or racing) its writer."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, keep_period: int = 0,
               read_only: bool = False):
    self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
    self.read_only = read_only
    _quiet_orbax_errors()
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoint directory {self.directory}; pass the --workdir of a "
                            "training run")
    if not read_only:
      _check_writable(self.directory)
    # Retention is ours, not Orbax's: Orbax garbage-collects old steps even when the new save
    # fails (a full disk would cost a good checkpoint), so `_apply_retention` deletes only after
    # a newer save is confirmed complete.
    self.keep, self.keep_period = keep, keep_period
    options = ocp.CheckpointManagerOptions(
        create=not read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        preservation_policy=ocm.preservation_policy.LatestN(n=None))
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
                    tokenizer=ocp.JsonCheckpointHandler())
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    except OSError as e:
      raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e.strerror}; "
                            "choose a writable --workdir") from None
    self._saving_step = None
    # Orbax removes partial `<step>.orbax-checkpoint-tmp` directories in the background and only
    # joins that work at the first save; finish it now so a restart starts from a clean directory.
    cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if cleanup is not None and not read_only:
      cleanup()
    if not read_only and jax.process_index() == 0:
      for trash in self.directory.glob(f"*{_DELETING}"):  # a deletion interrupted by a crash
        shutil.rmtree(trash, ignore_errors=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # -- saving ------------------------------------------------------------------------------------
  def _save_failed(self, step, error: BaseException) -> CheckpointError:
    kept = ", ".join(map(str, self.all_steps())) or "none"
    return CheckpointError(f"saving the checkpoint of step {step} to {self.directory} failed "
                           f"({_one_line(error)}); earlier checkpoints are intact (steps: {kept}); "
                           "free disk space or fix the directory, then rerun to resume")

  def save(self, step: int, state, meta: dict, data: dict, config: dict,
           tokenizer: dict | None = None) -> None:
    """Starts an asynchronous save; an error of the previous background save is raised here.
    `tokenizer`: `tokenizer_item(...)` of the run's tokenizer."""
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                 config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta))
    if tokenizer is not None:
      items["tokenizer"] = ocp.args.JsonSave(tokenizer)
    args = ocp.args.Composite(**items)
    self.wait()  # Orbax would wait for the previous save anyway; this attributes its error
    self._apply_retention()
    try:
      self._saving_step = step
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable line
      raise self._save_failed(step, e) from e

  def _apply_retention(self) -> None:
    """Keeps the latest `keep` complete checkpoints plus every step divisible by `keep_period`.
    Runs only after the newest save is known to be complete. A step is first renamed out of the
    step namespace (atomic), then deleted, so a crash mid-delete never leaves a half checkpoint
    under a step name."""
    steps = self.all_steps()
    keep = set(steps[-self.keep:]) if self.keep > 0 else set(steps)
    best = read_best(self.directory)
    if best is not None:
      keep.add(int(best["step"]))  # train.keep_best: never deleted by retention
    if self.keep_period:
      keep |= {s for s in steps if s % self.keep_period == 0}
    doomed = [s for s in steps if s not in keep]
    if not doomed:
      return
    if jax.process_index() == 0:
      for step in doomed:
        trash = self.directory / f"{step}{_DELETING}"
        (self.directory / str(step)).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    self.manager.reload()

  def check(self) -> None:
    """Raises a CheckpointError if the last background save failed (does not block)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(self._saving_step, e) from e

  def wait(self) -> None:
    """Blocks until the background save is complete; raises its error if it failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(self._saving_step, e) from e

  # -- reading -----------------------------------------------------------------------------------
  def _step_or_latest(self, step: int | str | None) -> int:
    step = resolve_step(self.directory.parent, step)
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: "
                            f"{', '.join(map(str, self.all_steps())) or 'none'}")
    return step

  def read_json(self, step: int | None = None,
                names: tuple[str, ...] = ("meta", "data", "config")) -> dict:
    """The JSON items of a checkpoint: {'meta': ..., 'data': ..., 'config': ...} (those that
    exist; 'meta' must). DamagedCheckpoint if they cannot be read."""
    step = self._step_or_latest(step)
    if not (self.directory / str(step) / "meta").exists():
      raise DamagedCheckpoint(step, self.directory, "its meta item is missing")
    names = [n for n in names if (self.directory / str(step) / n).exists()]
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{n: ocp.args.JsonRestore() for n in names}))
      return {n: dict(restored[n]) for n in names}
    except Exception as e:  # noqa: BLE001 - truncated/corrupt JSON or missing files
      raise DamagedCheckpoint(step, self.directory, _one_line(e)) from e

  def read_meta(self, step: int | None = None) -> dict:
    return self.read_json(step, ("meta",))["meta"]

  def read_tokenizer(self, step: int) -> dict | None:
    """The checkpoint's tokenizer item (see `tokenizer_item`), or None for older checkpoints."""
    return self.read_json(step, ("meta", "tokenizer")).get("tokenizer")

  def quarantine(self, step: int, reason: str) -> Path:
    """Moves damaged checkpoint `step` out of the step namespace, to `<step>.damaged` (never
    deleted: it is the user's data), with the reason beside it. Returns the new path."""
    target = self.directory / f"{step}{DAMAGED_SUFFIX}"
    n = 1
    while target.exists():
      target, n = self.directory / f"{step}{DAMAGED_SUFFIX}.{n}", n + 1
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
      try:
        (target / "llmjax-damaged.txt").write_text(f"moved aside by llmjax: {reason}\n")
      except OSError:
        pass
    self.manager.reload()
    return target

  def restore(self, abstract_state, step: int | None = None):
    """Restores the state into the shardings carried by `abstract_state`'s ShapeDtypeStructs
    (any mesh: Orbax reads each device's slice from the saved global arrays). Returns
    (state, json_items)."""
    step = self._step_or_latest(step)
    items = self.read_json(step)
    self._check_shapes(abstract_state, step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001 - unreadable arrays: truncated or missing files
      raise DamagedCheckpoint(step, self.directory, _one_line(e)) from e
    return restored["state"], items

  def _check_shapes(self, abstract_state, step: int) -> None:
    """Names the parameters whose shape/dtype differ instead of failing deep inside Orbax."""
    try:
      saved = self.manager.item_metadata(step)["state"]["params"]
    except Exception:  # noqa: BLE001 - metadata unreadable: let restore report the problem
      return
    want = _leaves_by_path(abstract_state.params)
    have = _leaves_by_path(saved)
    diffs = [f"{p} missing in checkpoint" for p in sorted(set(want) - set(have))]
    diffs += [f"{p} not in this model" for p in sorted(set(have) - set(want))]
    diffs += [f"{p} shape {tuple(have[p].shape)} in checkpoint vs {tuple(want[p].shape)} here"
              for p in sorted(set(want) & set(have))
              if tuple(have[p].shape) != tuple(want[p].shape)]
    if diffs:
      more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this model: "
                            f"{'; '.join(diffs[:4])}{more}")

  def restore_numpy(self, step: int | None = None):
    """The saved state as a pytree of host numpy arrays, on any device count (tests, tools)."""
    step = self._step_or_latest(step)
    metadata = self.manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return jax.tree.map(np.asarray, restored["state"])

  def close(self) -> None:
    """Waits for the pending save (raising its error) and releases Orbax's threads."""
    try:
      self.wait()
      if not self.read_only:
        self._apply_retention()
    finally:
      self.manager.close()


def _leaves_by_path(tree) -> dict:
  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(name(e) for e in path): leaf for path, leaf in flat}


def tokenizer_item(tokenizer) -> dict:
  """The files `tokenizer.save(dir)` writes, base64-encoded: a checkpoint item."""
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save(tmp)
    files = {p.name: base64.b64encode(p.read_bytes()).decode("ascii")
             for p in sorted(Path(tmp).iterdir()) if p.is_file()}
  return {"kind": tokenizer.kind, "files": files}


def write_tokenizer_files(item: dict, directory: Path) -> list[str]:
  """Writes a checkpoint's tokenizer item into `directory` (each file atomically); returns
  the names written."""
  directory.mkdir(parents=True, exist_ok=True)
  names = sorted(item["files"], key=lambda n: n == "tokenizer.json")  # the spec last
  for name in names:
    tmp = directory / f"{name}.tmp{os.getpid()}"
    tmp.write_bytes(base64.b64decode(item["files"][name]))
    os.replace(tmp, directory / name)
  return names


def model_mismatches(saved_model: dict, model: dict) -> list[str]:
  """'field (checkpoint X, config Y)' for every model field that changes the parameters or their
  meaning; RUNTIME_MODEL_FIELDS may differ."""
  return [f"model.{k} (checkpoint {saved_model[k]!r}, config {model[k]!r})"
          for k in sorted(set(saved_model) & set(model))
          if k not in RUNTIME_MODEL_FIELDS and saved_model[k] != model[k]]


def tokenizer_mismatches(saved: dict, data_config, tokenizer) -> list[str]:
  """Differences between the checkpoint's tokenizer, the config's, and the tokenizer on disk."""
  out = []
  if saved.get("kind") != data_config.tokenizer:
    out.append(f"data.tokenizer (checkpoint {saved.get('kind')!r}, config {data_config.tokenizer!r})")
  if tokenizer is not None and saved.get("vocab_size") != tokenizer.vocab_size:
    out.append(f"tokenizer vocabulary size (checkpoint {saved.get('vocab_size')}, tokenizer file "
               f"{tokenizer.vocab_size})")
  return out


def describe_meta(meta: dict) -> str:
  return json.dumps(meta, sort_keys=True)
