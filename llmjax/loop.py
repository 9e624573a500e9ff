"""The training loop: build everything from the config, train, evaluate, checkpoint, log, sample.

Every step's work runs inside one jitted function; the host only assembles batches and, every
`log_every` steps, fetches the metrics (the only device-to-host syncs in the hot path).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from llmjax import checkpoint as ckpt
from llmjax import config as cfglib
from llmjax import metrics as mlib
from llmjax import sharding as shd
from llmjax import train as trainlib
from llmjax.data import load_dataset, load_tokenizer
from llmjax.model import Transformer, num_params
from llmjax.optim import make_optimizer

from llmjax.runs import CONFIG_FILE  # noqa: E402  (one name for the run's config file)
SAMPLE_FILE = "sample.txt"


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class Run:
  """Everything built from a config for one workdir: data, model, mesh, steps, checkpointer."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.is_writer = jax.process_index() == 0
    self.checkpointer = ckpt.Checkpointer(str(self.workdir), keep=config.train.keep_checkpoints)
    resuming = self.checkpointer.latest_step() is not None
    tokenizer = load_tokenizer(self.workdir) if resuming else None
    self.dataset = load_dataset(config.data, config.train.seed, tokenizer)
    self.tokenizer = self.dataset.tokenizer
    if self.is_writer and not resuming:
      self.tokenizer.save(self.workdir)
    if self.is_writer:
      (self.workdir / CONFIG_FILE).write_text(cfglib.to_json(config))

    self.model_config = cfglib.model_config(config, self.tokenizer.vocab_size)
    self.model = Transformer(self.model_config)
    self.mesh = shd.make_mesh(config)
    self.rules = shd.logical_rules(config)
    self.optimizer, self.schedule = make_optimizer(config.optim, config.train.steps)

    t = config.train
    micro_batch = config.data.batch_size // t.grad_accum_steps
    self._init_fn, boxed = trainlib.abstract_state(
        self.model, self.optimizer, (micro_batch, config.data.seq_len))
    self.state_shardings = trainlib.state_shardings(boxed, self.mesh, self.rules)
    self.abstract_state = ckpt.abstract_with_shardings(nn.meta.unbox(boxed), self.state_shardings)
    replicated = shd.replicated(self.mesh)
    batch_sharding = shd.batch_sharding(self.mesh)
    train_step = trainlib.make_train_step(
        self.model, self.optimizer, self.schedule, seed=t.seed,
        grad_accum_steps=t.grad_accum_steps, objective=t.objective, mlm_probability=t.mlm_probability)
    self.train_step = jax.jit(train_step, in_shardings=(self.state_shardings, batch_sharding),
                              out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    eval_step = trainlib.make_eval_step(self.model, objective=t.objective,
                                        mlm_probability=t.mlm_probability, seed=t.seed)
    self.eval_step = jax.jit(eval_step, in_shardings=(self.state_shardings.params, batch_sharding, None),
                             out_shardings=(replicated, replicated))
    self.bytes_per_token = self._bytes_per_token()

  # -- state -----------------------------------------------------------------------------------
  def initial_state(self):
    """The latest checkpoint if there is one, else a freshly initialized (already sharded) state."""
    step = self.checkpointer.latest_step()
    if step is None:
      with shd.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        init = jax.jit(lambda r: nn.meta.unbox(self._init_fn(r)), out_shardings=self.state_shardings)
        return init(jax.random.key(self.config.train.seed))
    state, meta = self.checkpointer.restore(self.abstract_state, step)
    log(f"resumed from step {step} in {self.checkpointer.directory}")
    return state

  def checkpoint_meta(self, step: int) -> dict:
    return {"step": int(step), "data_step": int(step), "model": self.model_config.to_dict(),
            "tokenizer": {"kind": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size},
            "config": self.config.to_dict()}

  def save(self, state, step: int) -> None:
    self.checkpointer.save(step, state, self.checkpoint_meta(step), force=True)

  # -- data --------------------------------------------------------------------------------------
  def batch(self, split: str, step: int):
    host = self.dataset.batch(split, step, self.config.data.batch_size,
                              jax.process_index(), jax.process_count())
    return shd.put_batch(host, self.mesh)

  def _bytes_per_token(self) -> float:
    if self.tokenizer.kind in ("char", "byte"):
      return 1.0  # bits per character / per byte == bits per token
    sample = np.asarray(self.dataset.val[: 1 << 16])
    return max(len(self.tokenizer.decode(sample).encode("utf-8")), 1) / len(sample)

  # -- evaluation --------------------------------------------------------------------------------
  def evaluate(self, params, num_batches: int | None = None) -> dict:
    num_batches = num_batches or self.config.train.eval_batches
    total, count = 0.0, 0.0
    with shd.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for i in range(num_batches):
        loss_sum, n = self.eval_step(params, self.batch("val", i), i)
        total, count = total + loss_sum, count + n
    loss = float(total / count)
    unit = "bpc" if self.tokenizer.kind == "char" else "bpb"
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            unit: loss / (math.log(2) * self.bytes_per_token)}


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir` up to config.train.steps; returns final eval metrics."""
  run = Run(config, workdir)
  t, d = config.train, config.data
  state = run.initial_state()
  start = int(jax.device_get(state.step))
  tokens_per_step = d.batch_size * d.seq_len
  flops_per_step = mlib.flops_per_token(run.model_config, d.seq_len) * tokens_per_step
  peak, peak_source = mlib.peak_flops_per_device(t.peak_flops)
  peak_total = peak * jax.device_count()
  mesh_desc = " x ".join(f"{k}={v}" for k, v in run.mesh.shape.items())
  log(f"model: {num_params(run.model_config):,} parameters "
      f"({num_params(run.model_config, include_embeddings=False):,} without embeddings); "
      f"{flops_per_step / tokens_per_step / 1e6:.1f} MFLOPs/token")
  log(f"data: {len(run.dataset.train):,} train / {len(run.dataset.val):,} val tokens, "
      f"{run.tokenizer.kind} tokenizer with {run.tokenizer.vocab_size} ids; "
      f"mesh {mesh_desc} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
  log(f"peak {peak_total / 1e12:.3g} TFLOP/s ({peak_source}); training steps {start}..{t.steps}")

  writer = mlib.MetricsWriter(str(run.workdir), tensorboard=t.tensorboard, enabled=run.is_writer)
  progress = None
  if run.is_writer and t.progress:
    from tqdm import tqdm
    progress = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5)

  last_log_time, last_log_step = time.perf_counter(), start
  pending = None  # the last step's metrics, still on device
  with shd.use_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for step in range(start, t.steps):
      state, pending = run.train_step(state, run.batch("train", step))
      done = step + 1
      if progress is not None:
        progress.update(1)
      if done % t.log_every == 0 or done == t.steps:
        values = jax.device_get(pending)
        now = time.perf_counter()
        step_time = (now - last_log_time) / max(done - last_log_step, 1)
        last_log_time, last_log_step = now, done
        tokens_per_sec = tokens_per_step / step_time
        values.update(step_time_ms=step_time * 1e3, tokens_per_sec=tokens_per_sec,
                      mfu=flops_per_step / step_time / peak_total)
        if not np.isfinite(values["loss"]):
          log(f"step {done}: loss is {values['loss']}; stopping (lower optim.lr or check the data)")
          break
        writer.write(done, values)
        if progress is not None:
          progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                               mfu=f"{values['mfu']:.1%}")
      if t.eval_every and done % t.eval_every == 0 and done != t.steps:
        writer.write(done, run.evaluate(state.params), prefix="val")
        last_log_time = time.perf_counter()  # eval time is not step time
      if t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.steps:
        run.save(state, done)

  final_step = int(jax.device_get(state.step))
  if final_step > start:
    run.save(state, final_step)
  if progress is not None:
    progress.close()
  result = run.evaluate(state.params)
  writer.write(final_step, result, prefix="val")
  log(f"step {final_step}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
      + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k in ("bpc", "bpb")))
  run.checkpointer.wait()
  if run.is_writer:
    plot = mlib.plot_loss_curve(str(run.workdir))
    if plot:
      log(f"loss curve: {plot}")
    if t.sample_tokens > 0 and config.model.causal:
      from llmjax.generate import sample_text
      text = sample_text(run.model, state.params, run.tokenizer, t.sample_prompt, t.sample_tokens,
                         temperature=t.sample_temperature, seed=t.seed)
      (run.workdir / SAMPLE_FILE).write_text(text, encoding="utf-8")
      writer.write_text(final_step, "sample", text)
      log(f"sample ({SAMPLE_FILE}):\n{text}")
  writer.close()
  run.checkpointer.close()
  return result
