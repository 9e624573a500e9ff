"""One training run and its workdir: the config checked against what the workdir holds, the first
state (fresh, resumed from the newest readable checkpoint, or initialized from another run with
`train.init_from`), checkpoints and best-checkpoint keeping, batches, evaluation.

`llmjax.loop` drives a `Run` step by step; benchmarks build one to time the very step the loop jits.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from llmjax import adapters
from llmjax import checkpoint as ckpt
from llmjax import config as cfglib
from llmjax import evaluate as evallib
from llmjax import memory
from llmjax import metrics as mlib
from llmjax import sharding as shd
from llmjax import workdir as workdir_lib
from llmjax import objectives as objlib
from llmjax.data import load_tokenizer
from llmjax.data.batches import corpus_fingerprint
from llmjax.data.tokenizers import SPEC_FILE
from llmjax.data.shards import check_max_token_id
from llmjax.runs import CONFIG_FILE


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class Run:
  """Everything built from a config for one workdir: data, model, mesh, steps, checkpointer."""

  def __init__(self, config, workdir: str, allow_corpus_change: bool = False):
    self.config = config
    self.workdir = Path(workdir)
    self.is_writer = jax.process_index() == 0
    if self.is_writer:
      workdir_lib.claim(self.workdir)  # refuses a stranger's directory; one process per workdir
    if jax.process_count() > 1:  # the others must not create files before process 0 checked
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("llmjax: workdir claimed")
    if not self.is_writer:
      workdir_lib.check_not_empty(str(workdir))
      self.workdir.mkdir(parents=True, exist_ok=True)
    t = config.train
    self.checkpointer = ckpt.Checkpointer(
        str(self.workdir), keep=t.keep_checkpoints, keep_period=t.keep_checkpoint_period,
        async_save=t.async_checkpointing)
    self.set_aside: list[str] = []  # damaged checkpoints moved out of the way, for the log
    self.resume_step, saved_meta = self._newest_readable()
    resuming = self.resume_step is not None
    # init_from only starts a run: a workdir with checkpoints always resumes from its own.
    self.init_source = None if resuming else parse_init_from(t.init_from)
    if resuming and t.init_from:
      log(f"train.init_from={t.init_from} ignored: {self.workdir} already has checkpoints")
    if resuming:
      tokenizer = self._run_tokenizer(self.resume_step)
    elif self.init_source:
      saved_meta = _read_source_meta(*self.init_source)
      tokenizer = load_tokenizer(self.init_source[0])
    else:
      saved_meta, tokenizer = None, None
    if saved_meta is not None:
      self._check_compatible(saved_meta, tokenizer)
    # The objective says where its batches come from (token corpus, task rows, seq2seq pairs).
    self.dataset = objlib.get(t.objective).load_dataset(
        config, tokenizer, **_task_options(config, self.workdir if resuming else None))
    self.tokenizer = self.dataset.tokenizer
    _check_model_vocab(config, self.tokenizer)
    self.corpus = corpus_identity(config.data, self.dataset)
    if resuming:
      self._check_corpus(saved_meta, allow_corpus_change)
    self.tokenizer_item = ckpt.tokenizer_item(self.tokenizer) if self.is_writer else None
    if self.is_writer and not resuming:
      self.tokenizer.save(self.workdir)
    _apply_data_to_config(config, self.dataset)  # num_labels, train.epochs -> steps
    if self.is_writer and hasattr(self.dataset, "save"):
      self.dataset.save(self.workdir)  # e.g. the label mapping of a classification run

    self.model_config = cfglib.model_config(config, self.tokenizer.vocab_size)
    check_max_token_id(self.dataset, self.model_config.vocab_size)  # prepared corpora know their max id
    # Compiles the step once to refuse (or, with grad_accum_steps=auto, fit) a step that cannot
    # fit the device, before anything is allocated; jit reuses that executable for step one.
    batch_keys = self.dataset.batch("train", 0, config.data.batch_size).keys()
    self.program = memory.fit(config, shd.make_mesh(config), self.model_config, batch_keys, log)
    if self.is_writer:  # after 'auto' is resolved: the file says what actually trains
      _write_atomic(self.workdir / CONFIG_FILE, cfglib.to_json(config))
    prog = self.program
    self.dataset = prog.objective.wrap_dataset(self.dataset)
    self.model, self.mesh, self.rules = prog.model, prog.mesh, prog.rules
    self.optimizer, self.schedule = prog.optimizer, prog.schedule
    self.state_shardings, self.abstract_state = prog.state_shardings, prog.abstract_state
    self.train_step, self.eval_step = prog.train_step, prog.eval_step
    self.bytes_per_token = evallib.bytes_per_token(self.tokenizer, self.dataset.val)
    self.lora_base = None  # {"workdir", "step"} of the base an adapter-only LoRA run reloads
    self._all_finite = jax.jit(lambda p: jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))

  # -- damaged checkpoints, tokenizer and corpus of a resumed run ------------------------------
  def _newest_readable(self):
    """(step, meta) of the newest checkpoint whose metadata reads, setting damaged ones aside;
    (None, None) when there is none."""
    while True:
      step = self.checkpointer.latest_step()
      if step is None:
        return None, None
      try:
        return step, self.checkpointer.read_meta(step)
      except ckpt.DamagedCheckpoint as e:
        self._set_aside(e)

  def _set_aside(self, error: "ckpt.DamagedCheckpoint") -> None:
    moved = self.checkpointer.quarantine(error.step, error.reason)
    self.set_aside.append(str(moved))
    log(f"checkpoint step {error.step} is damaged ({error.reason}); moved it aside to {moved} "
        "(not deleted) and falling back to the previous checkpoint")

  def _run_tokenizer(self, step: int):
    """The run's tokenizer: its workdir file, or (when that was deleted) the copy stored in
    checkpoint `step`, which is written back into the workdir."""
    try:
      return load_tokenizer(self.workdir)
    except FileNotFoundError:
      pass
    item = self.checkpointer.read_tokenizer(step)
    if item is None:
      raise ckpt.CheckpointError(
          f"{self.workdir} has lost its {SPEC_FILE} and checkpoint {step} predates tokenizers "
          f"stored in checkpoints; put the run's {SPEC_FILE} back, or start a new --workdir")
    target = self.workdir if self.is_writer else Path(tempfile.mkdtemp(prefix="llmjax-tok-"))
    ckpt.write_tokenizer_files(item, target)
    log(f"restored the tokenizer ({SPEC_FILE}) from checkpoint step {step}")
    return load_tokenizer(target)

  def _check_corpus(self, saved_meta: dict, allow_change: bool) -> None:
    """Resuming on another corpus than the checkpoint was trained on: refused unless asked for
    (--allow_corpus_change), and said in one line either way."""
    saved = saved_meta.get("corpus")
    if not saved or saved.get("fingerprint") == self.corpus["fingerprint"]:
      return  # checkpoints from before corpora were fingerprinted cannot be compared
    what = describe_corpus_change(saved, self.corpus)
    if not allow_change:
      raise ckpt.CheckpointError(
          f"cannot resume {self.workdir} from step {self.resume_step} on another corpus ({what}); "
          "rerun with the run's data.path/data.val_path, or pass --allow_corpus_change to "
          "continue training on this one")
    log(f"continuing step {self.resume_step} on another corpus ({what}): "
        "--allow_corpus_change was given")

  def _check_compatible(self, saved_meta: dict, tokenizer) -> None:
    """Resuming (or init_from) with a different model or tokenizer: one line listing every
    differing field, before anything touches the arrays."""
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    model = cfglib.model_config(self.config, vocab).to_dict()
    diffs = ckpt.tokenizer_mismatches(saved_meta.get("tokenizer", {}), self.config.data, tokenizer)
    diffs += ckpt.model_mismatches(saved_meta.get("model", {}), model)
    if not diffs:
      return
    if not self.config.model.num_labels or self.init_source is not None:
      # num_labels 0 = taken from the data later; fine-tuning may add a head the source lacks
      diffs = [d for d in diffs if not d.startswith("model.num_labels (")]
    if self.init_source is not None:  # issue 9: the new head may pool differently (no weights)
      diffs = [d for d in diffs if not d.startswith("model.pooling (")]
    if not diffs:
      return
    if self.init_source is None:
      raise ckpt.CheckpointError(
          f"cannot resume {self.workdir} from step {self.resume_step}: the config differs from the "
          f"checkpoint in {', '.join(diffs)}; rerun with the run's config ({CONFIG_FILE}), or "
          f"use a new --workdir (with --config.train.init_from={self.workdir} to start from its "
          "weights)")
    raise ckpt.CheckpointError(
        f"cannot initialize from {self.config.train.init_from}: the config differs from that "
        f"checkpoint in {', '.join(diffs)}; use the same model shape and tokenizer")

  # -- state -----------------------------------------------------------------------------------
  def initial_state(self):
    """The latest checkpoint if there is one, else the weights named by train.init_from with a
    fresh optimizer, else a freshly initialized state (always created already sharded)."""
    while self.resume_step is not None:
      step = self.resume_step
      try:
        meta = self.checkpointer.read_meta(step)
        self.lora_base = meta.get(adapters.BASE_META)
        state, items = adapters.restore(self.checkpointer, self.abstract_state, step, meta,
                                        self.mesh, self.program.base_dtype)
      except ckpt.DamagedCheckpoint as e:  # fall back to the newest one that restores
        self._set_aside(e)
        self.resume_step, _ = self._newest_readable()
        continue
      data_step = items.get("data", {}).get("step", step)
      if data_step != int(jax.device_get(state.step)):
        raise ckpt.CheckpointError(f"checkpoint {step} in {self.checkpointer.directory} is "
                                   f"inconsistent: data position {data_step} != state step")
      log(f"resumed from step {step} in {self.checkpointer.directory}")
      return state
    if self.set_aside:
      raise ckpt.CheckpointError(
          f"no checkpoint in {self.checkpointer.directory} restores: the damaged ones were moved "
          f"aside ({', '.join(self.set_aside)}); rerun to start over from step 0, or restore "
          "their files")
    if self.init_source is not None:
      from llmjax import runs
      source, source_step = self.init_source
      # outside the mesh/rules context: load_run builds its own abstract state
      loaded = runs.load_run(source, source_step, mesh=self.mesh)
      # a LoRA source contributes its merged weights; a LoRA run here checkpoints only adapters
      params = adapters.base_params_of(loaded)
      if _lacks_leaves(params, self.program.abstract_state.params):
        params = _add_new_leaves(self.program, params)  # e.g. a new classifier head
      state = self.program.state_from_params(params)
      if self.program.lora is not None:
        self.lora_base = adapters.base_meta(source, loaded.step)
      log(f"initialized from {source} step {loaded.step} (fresh optimizer state, step 0)")
      return state
    return self.program.init(jax.random.key(self.config.train.seed))

  def checkpoint_meta(self, step: int) -> dict:
    meta = {"step": int(step), "data_step": int(step), "model": self.model_config.to_dict(),
            "tokenizer": {"kind": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size},
            "rng": f"fold_in(key(train.seed={self.config.train.seed}), step): no key is stored",
            "corpus": self.corpus}
    if self.config.train.init_from:
      meta["init_from"] = self.config.train.init_from
    if self.program.lora is not None:
      meta[adapters.SPEC_META] = adapters.spec_meta(self.program.lora, self.program.base_dtype)
    if self.lora_base is not None:
      meta[adapters.BASE_META] = self.lora_base
    return meta

  def save(self, state, step: int) -> None:
    """Starts an asynchronous save of the whole run at `step` (blocking only for the device to
    host copy). The guard keeps parameters finite; this check makes sure no NaN is ever saved."""
    if not bool(jax.device_get(self._all_finite(state.params))):
      raise ckpt.CheckpointError(f"refusing to checkpoint step {step}: parameters are not finite")
    data = {"step": int(step), "seed": self.config.train.seed,
            "note": "batches are a pure function of (seed, split, step)"}
    if self.lora_base is not None:  # the base is reloaded from lora_base: save the adapters only
      state = adapters.adapter_only(state)
    self.checkpointer.save(step, state, self.checkpoint_meta(step), data, self.config.to_dict(),
                           tokenizer=self.tokenizer_item)

  # -- data --------------------------------------------------------------------------------------
  def host_batch(self, split: str, step: int):
    """This process's rows of batch `step` as numpy arrays (what the prefetch thread makes)."""
    return self.dataset.batch(split, step, self.config.data.batch_size,
                              jax.process_index(), jax.process_count())

  def batch(self, split: str, step: int):
    return shd.put_batch(self.host_batch(split, step), self.mesh)

  # -- evaluation --------------------------------------------------------------------------------
  def keep_if_best(self, state, step: int, result: dict) -> None:
    """train.keep_best: when `result` improves the metric, makes sure checkpoint `step` exists
    and records it as the best (checkpoints/best.json); retention never deletes that step."""
    metric = self.config.train.keep_best
    if not metric:
      return
    name = metric[len("val/"):] if metric.startswith("val/") else metric
    if name not in result:
      raise cfglib.ConfigError(f"train.keep_best={metric!r}: validation reports no {name!r} "
                               f"(it reports {', '.join('val/' + k for k in result)}); pick one")
    value, mode = float(result[name]), ckpt.metric_mode(name)
    best = ckpt.read_best(self.checkpointer.directory)
    if best is not None and best.get("metric") == metric:
      if (value >= best["value"]) if mode == "min" else (value <= best["value"]):
        return
    if self.checkpointer.latest_step() != step:
      self.save(state, step)
    self.checkpointer.wait()  # only a complete checkpoint may be named the best
    if self.is_writer:
      ckpt.write_best(self.checkpointer.directory,
                      {"metric": metric, "value": value, "step": int(step), "mode": mode})
    log(f"step {step}: best {metric} so far ({value:.6g}); checkpoint {step} is kept")

  def evaluate(self, params, num_batches: int | None = None) -> dict:
    """Validation metrics; a data.mixture adds each source's own ('<name>/loss', ...)."""
    if num_batches is None and hasattr(self.dataset, "num_batches"):
      # task data: the whole validation set exactly once (empty rows pad the last batch)
      num_batches = self.dataset.num_batches("val", self.config.data.batch_size)
    splits = {"": "val"}
    splits.update({f"{name}/": f"val/{name}" for name in getattr(self.dataset, "names", [])})
    result = {}
    with self.program.scope():
      for prefix, split in splits.items():
        metrics = evallib.evaluate_params(
            self.eval_step, params, lambda i, split=split: self.batch(split, i),
            num_batches or self.config.train.eval_batches, self.tokenizer, self.bytes_per_token,
            self.program.objective)
        result.update({prefix + k: v for k, v in metrics.items()})
    return result


# -- issue 9: task data ----------------------------------------------------------------------------
def _task_options(config, resumed_workdir) -> dict:
  from llmjax import objectives
  return objectives.data_options(config, resumed_workdir)


def _apply_data_to_config(config, dataset) -> None:
  """Fields the data decides: model.num_labels (classification, when 0) and, with train.epochs,
  train.steps. Done before the config is saved and the program is built."""
  if getattr(dataset, "num_labels", 0) and not config.model.num_labels:
    config.model.num_labels = dataset.num_labels
  if config.train.epochs:
    if not hasattr(dataset, "steps_for_epochs"):
      raise cfglib.ConfigError("train.epochs needs task data (data.path=<.jsonl/.parquet/datasets "
                               "dir>); for raw text set train.steps instead")
    config.train.steps = dataset.steps_for_epochs(config.train.epochs, config.data.batch_size)


def _lacks_leaves(params, abstract) -> bool:
  """True when the model (`abstract` params) has a weight `params` lacks; LoRA adapters (added
  fresh by Program.state_from_params) do not count."""
  for key, value in abstract.items():
    if key in adapters.loralib.ADAPTER_KEYS:
      continue
    if key not in params:
      return True
    if isinstance(value, dict) and _lacks_leaves(params[key], value):
      return True
  return False


def _add_new_leaves(program, params):
  """`params` completed with freshly initialized leaves the program's model has and they lack
  (a fine-tuning head); every leaf they share is kept."""
  fresh = jax.device_get(program.init(jax.random.key(program.config.train.seed)).params)
  loaded = jax.device_get(params)

  def merge(f, l):
    if isinstance(f, dict):
      return {k: merge(v, l[k]) if isinstance(l, dict) and k in l else v for k, v in f.items()}
    return l
  return merge(fresh, loaded)


def parse_init_from(spec: str):
  """'<workdir>[:step|:best]' -> (workdir, step, 'best' or None); '' -> None."""
  if not spec:
    return None
  path, step = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and (tail.isdigit() or tail == "best"):
    path, step = head, int(tail) if tail.isdigit() else tail
  return path, step


def _check_model_vocab(config, tokenizer) -> None:
  """An explicit model.vocab_size must cover every id the tokenizer produces (plus [MASK])."""
  need = tokenizer.vocab_size + (1 if config.train.objective == "masked_lm" else 0)
  if config.model.vocab_size and config.model.vocab_size < need:
    raise cfglib.ConfigError(
        f"model.vocab_size={config.model.vocab_size} is smaller than the {tokenizer.kind} "
        f"tokenizer's {need} ids{' (with [MASK])' if need > tokenizer.vocab_size else ''}; "
        f"set --config.model.vocab_size={need} or larger (or 0: taken from the tokenizer)")


def corpus_identity(data_config, dataset) -> dict:
  """What a checkpoint records about its corpus, to notice a resume on another one."""
  return {"fingerprint": int(corpus_fingerprint(dataset)), "path": data_config.path,
          "val_path": data_config.val_path, "train_tokens": int(len(dataset.train)),
          "val_tokens": int(len(dataset.val))}


def describe_corpus_change(saved: dict, now: dict) -> str:
  parts = [f"data.{k} {saved.get(k)!r} -> {now[k]!r}" for k in ("path", "val_path")
           if saved.get(k) != now[k]]
  parts += [f"{k.replace('_', ' ')} {saved.get(k):,} -> {now[k]:,}"
            for k in ("train_tokens", "val_tokens") if saved.get(k) != now[k]]
  return ", ".join(parts) or "same paths and sizes, different contents"


def _read_source_meta(workdir: str, step: int | None) -> dict:
  source = ckpt.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    return source.read_meta(step)
  finally:
    source.close()


def _write_atomic(path: Path, text: str) -> None:
  """A crash mid-write leaves the old file, never a truncated one."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def trim_metrics(workdir: Path, step: int) -> None:
  """On resume, drops records past the restored step (and a line cut short by a crash): the
  resumed run logs those steps again, identically."""
  path = workdir / mlib.METRICS_FILE
  if not path.exists():
    return
  kept = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      if json.loads(line).get("step", 0) <= step:
        kept.append(line)
    except json.JSONDecodeError:
      continue
  _write_atomic(path, "".join(k + "\n" for k in kept))
