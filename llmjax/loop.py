"""The training loop: build everything from the config, train, evaluate, checkpoint, log, sample.

Every step's work runs inside one jitted function; the host only assembles batches and, every
`log_every` steps, fetches the metrics (the only device-to-host syncs in the hot path).
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
from pathlib import Path

import jax

from llmjax import adapters
from llmjax import evaluate as evallib
from llmjax import metrics as mlib
from llmjax import preemption
from llmjax import sharding as shd
from llmjax import train as trainlib
from llmjax import workdir as workdir_lib
from llmjax.data.prefetch import Prefetcher
from llmjax.model import num_params
from llmjax.run import Run, log, trim_metrics

SAMPLE_FILE = "sample.txt"


def train(config, workdir: str, allow_corpus_change: bool = False) -> dict:
  """Trains (or resumes) the run in `workdir` up to config.train.steps; returns final eval metrics
  (or {'stopped_at': step, 'signal': name} when SIGTERM/SIGINT stopped it). The workdir stays
  locked against other processes until this returns."""
  held = workdir_lib.holds(workdir)
  try:
    return _train(config, workdir, allow_corpus_change)
  finally:
    if not held:
      workdir_lib.release(Path(workdir))


def _train(config, workdir: str, allow_corpus_change: bool) -> dict:
  run = Run(config, workdir, allow_corpus_change=allow_corpus_change)
  t, d = config.train, config.data
  state = run.initial_state()
  start = int(jax.device_get(state.step))
  skipped_before = int(jax.device_get(state.nonfinite_skipped))
  tokens_per_step = d.batch_size * d.seq_len
  flops_per_step = mlib.flops_per_token(run.model_config, d.seq_len) * tokens_per_step
  peak, peak_source = mlib.peak_flops_per_device(t.peak_flops)
  peak_total = peak * jax.device_count()
  mesh_desc = " x ".join(f"{k}={v}" for k, v in run.mesh.shape.items())
  log(f"model: {num_params(run.model_config):,} parameters "
      f"({num_params(run.model_config, include_embeddings=False):,} without embeddings); "
      f"{flops_per_step / tokens_per_step / 1e6:.1f} MFLOPs/token")
  if run.program.lora is not None:
    log(adapters.describe(run.program, state))
  log(f"data: {len(run.dataset.train):,} train / {len(run.dataset.val):,} val tokens, "
      f"{run.tokenizer.kind} tokenizer with {run.tokenizer.vocab_size} ids; "
      f"mesh {mesh_desc} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
  log(f"peak {peak_total / 1e12:.3g} TFLOP/s ({peak_source}); training steps {start}..{t.steps}")
  if hasattr(run.dataset, "summary"):
    log(f"task data: {run.dataset.summary()}")

  if run.is_writer:  # also at step 0: a first save killed mid-way left records of a lost run
    trim_metrics(run.workdir, start)
  writer = mlib.MetricsWriter(str(run.workdir), tensorboard=t.tensorboard, enabled=run.is_writer)
  progress = None
  if run.is_writer and t.progress:
    from tqdm import tqdm
    progress = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5)

  try:
    state, stopped = _train_steps(run, state, start, writer, progress,
                                  flops_per_step / peak_total, tokens_per_step)
  except BaseException:
    _shutdown_after_error(run, writer, progress)
    raise
  if progress is not None:
    progress.close()
  final_step = int(jax.device_get(state.step))
  if stopped is not None:
    writer.close()
    run.checkpointer.close()
    log(f"{stopped}: stopped at step {final_step}; checkpoint saved in "
        f"{run.checkpointer.directory / str(final_step)}; rerun the same command to resume")
    return {"stopped_at": final_step, "signal": stopped}

  skipped = int(jax.device_get(state.nonfinite_skipped)) - skipped_before
  if final_step > start and skipped >= final_step - start:
    writer.close()
    run.checkpointer.close()
    raise trainlib.NonFiniteError(
        f"every update of steps {start + 1}..{final_step} was skipped (non-finite loss or "
        f"gradients on each, train.nonfinite_policy='{t.nonfinite_policy}'): nothing was learned, "
        f"so no checkpoint was written; check the data (token ids vs the vocabulary) and optim.lr")
  if final_step > start and run.checkpointer.latest_step() != final_step:
    run.save(state, final_step)
  result = run.evaluate(state.params)
  writer.write(final_step, result, prefix="val")
  run.keep_if_best(state, final_step, result)
  log(f"step {final_step}: " + evallib.describe_metrics(result))
  run.checkpointer.wait()
  if run.is_writer:
    plot = mlib.plot_loss_curve(str(run.workdir))
    if plot:
      log(f"loss curve: {plot}")
    if t.sample_tokens > 0 and config.model.causal and not run.model_config.num_labels:
      from llmjax.generate import sample_text
      text = sample_text(run.model, state.params, run.tokenizer, t.sample_prompt, t.sample_tokens,
                         temperature=t.sample_temperature, seed=t.seed)
      (run.workdir / SAMPLE_FILE).write_text(text, encoding="utf-8")
      writer.write_text(final_step, "sample", text)
      log(f"sample ({SAMPLE_FILE}):\n{text}")
  writer.close()
  run.checkpointer.close()
  return result


def _train_steps(run: Run, state, start: int, writer, progress, mfu_per_step_time: float,
                 tokens_per_step: int):
  """The hot loop. Returns (state, None) at train.steps, or (state, signal name) after a stop
  request was honoured with a checkpoint at the current step."""
  t = run.config.train
  # Test-only knob (crash/preemption tests): sleep after each step so that a signal or SIGKILL can
  # land at a chosen point of a tiny, fast run. Changes timing only, never results.
  delay = float(os.environ.get("LLMJAX_TEST_STEP_DELAY_S", "0") or 0)
  last_log_time, last_log_step = time.perf_counter(), start
  multi_host = jax.process_count() > 1
  halt_early = t.nonfinite_policy == "halt" and not multi_host  # hosts must stop at the same step
  inflight = InFlight(progress, (lambda m, d: _check_nonfinite(run, m, d)) if halt_early else None)
  finished = inflight.retire

  # host rows of the next steps are read on a background thread while the device computes
  prefetch = Prefetcher(lambda s: run.host_batch("train", s), start, t.steps)
  with preemption.StopRequest() as stop, run.program.scope(), \
      contextlib.closing(prefetch):
    for step in range(start, t.steps):
      state, pending = run.train_step(state, shd.put_batch(prefetch.get(step), run.mesh))
      done = step + 1
      inflight.add(done, pending)
      finished()
      if delay:
        time.sleep(delay)
      if done % t.log_every == 0 or done == t.steps:
        values = jax.device_get(pending)
        finished(upto=done)
        now = time.perf_counter()
        step_time = (now - last_log_time) / max(done - last_log_step, 1)
        last_log_time, last_log_step = now, done
        values.update(step_time_ms=step_time * 1e3, tokens_per_sec=tokens_per_step / step_time,
                      mfu=mfu_per_step_time / step_time)
        values.update(prefetch.stats())  # data_host_ms, data_wait_ms: input cost per step
        writer.write(done, values)
        _check_nonfinite(run, values, done)
        if progress is not None:
          progress.set_postfix(loss=f"{values['loss']:.4f}",
                               tok_s=f"{values['tokens_per_sec']:,.0f}", mfu=f"{values['mfu']:.1%}")
      if t.eval_every and done % t.eval_every == 0 and done != t.steps:
        result = run.evaluate(state.params)
        writer.write(done, result, prefix="val")
        run.keep_if_best(state, done, result)
        last_log_time = time.perf_counter()  # eval time is not step time
      preempted = multi_host and run.checkpointer.manager.reached_preemption(done)
      if stop.requested(done) or preempted:
        finished(upto=done)
        _check_nonfinite(run, jax.device_get(pending), done)
        run.save(state, done)
        run.checkpointer.wait()
        return state, stop.signal_name or "preemption notice"
      if (t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.steps
          and run.checkpointer.latest_step() != done):  # keep_best may have saved it already
        finished(upto=done)
        _check_nonfinite(run, jax.device_get(pending), done)  # never checkpoint a halted run
        run.save(state, done)
    finished(upto=t.steps)
  return state, None


class InFlight:
  """Steps dispatched but not yet known to have finished: JAX returns from a step call long
  before the device is done with it (a gpt_small step on a CPU: ten dispatched in four seconds
  while each takes a minute). The progress bar (its rate and ETA) and the early non-finite check
  advance only on steps whose metrics are ready, without waiting for them."""

  def __init__(self, progress=None, on_finished=None):
    self.progress, self.on_finished = progress, on_finished
    self.pending: collections.deque = collections.deque()

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def retire(self, upto: int = -1) -> None:
    """Retires the steps that have finished, in order; every step <= `upto` is waited for."""
    while self.pending and (self.pending[0][0] <= upto
                            or self.pending[0][1]["nonfinite_streak"].is_ready()):
      step, metrics = self.pending.popleft()
      if self.progress is not None:
        self.progress.update(1)
      if self.on_finished is not None:
        self.on_finished(metrics, step)


def _check_nonfinite(run: Run, values: dict, done: int) -> None:
  """Under nonfinite_policy='halt', stops once the guard saw `nonfinite_halt_after` consecutive
  bad steps (the jitted step has kept the parameters from before them). The streak in step
  `done`'s metrics also counts the frozen steps after the halt, so the first bad step is
  done - streak + 1 whenever the check runs."""
  t = run.config.train
  streak = int(values["nonfinite_streak"])
  if t.nonfinite_policy == "halt" and streak >= t.nonfinite_halt_after:
    first = done - streak + 1
    bad = (f"step {first}" if t.nonfinite_halt_after == 1
           else f"steps {first}..{first + t.nonfinite_halt_after - 1}")
    raise trainlib.NonFiniteError(
        f"non-finite loss or gradients at {bad}; stopped by train.nonfinite_policy='halt' "
        f"(train.nonfinite_halt_after={t.nonfinite_halt_after}); the bad update(s) were skipped, "
        f"latest checkpoint: {_latest_checkpoint(run)}; lower optim.lr, check the data, or set "
        "--config.train.nonfinite_policy=skip")


def _latest_checkpoint(run: Run) -> str:
  """The newest complete checkpoint on disk, once any save in flight has finished."""
  run.checkpointer.wait()
  run.checkpointer.manager.reload()  # the manager's list may predate a just-finished save
  steps = run.checkpointer.all_steps()
  if not steps:
    return "none yet (a rerun starts from step 0)"
  return f"step {steps[-1]} ({run.checkpointer.directory / str(steps[-1])})"


def _shutdown_after_error(run: Run, writer, progress) -> None:
  """Releases files and lets a pending (good) save finish, without masking the original error."""
  if progress is not None:
    progress.close()
  writer.close()
  try:
    run.checkpointer.close()
  except Exception:  # noqa: BLE001 - the error being raised is the one to report
    pass
