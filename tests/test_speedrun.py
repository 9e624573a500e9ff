"""issue 12, the speedrun's levers: validation batches evaluated in groups (train.eval_group) give
the same estimate as batch by batch; the squared-ReLU MLP; the warmup-stable-decay schedule."""
import jax
import numpy as np

from llmjax import config as cfglib


def tiny_config(**train):
  config = cfglib.default_config()
  config.model.update(num_layers=1, num_heads=2, embed_dim=16, max_seq_len=16)
  config.data.update(seq_len=16, batch_size=4)
  config.train.update(steps=2, eval_batches=7, progress=False, tensorboard=False, **train)
  return config


def test_grouped_evaluation_is_the_same_estimate(tmp_path):
  """eval_group=3 over 7 batches: two vmapped calls of 3 stacked batches and one batch alone,
  the same windows and per-batch sums as 7 calls; a group larger than eval_batches falls back."""
  from llmjax import loop
  results = {}
  for group in (1, 3, 10):
    run = loop.Run(tiny_config(eval_group=group), str(tmp_path / f"g{group}"))
    params = run.initial_state().params
    results[group] = run.evaluate(params)
  for group in (3, 10):
    np.testing.assert_allclose(results[group]["loss"], results[1]["loss"], rtol=1e-6)
  assert results[1]["loss"] > 3.0  # an untrained model: about log(vocab)


def test_grouped_step_sums_each_batch_with_its_own_index():
  """The grouped step is eval_step vmapped over (batch, index): each batch keeps its index."""
  from llmjax import evaluate as evallib
  seen = []

  def step(params, batch, index):
    seen.append(int(index))
    return {"loss": batch["x"].sum(), "weight": np.float32(batch["x"].size)}

  def group_step(params, batches, indices):
    seen.extend(int(i) for i in indices)
    return {"loss": batches["x"].sum(axis=(1, 2)),
            "weight": np.full(len(indices), batches["x"][0].size, np.float32)}

  batches = [{"x": np.full((2, 3), i, np.float32)} for i in range(5)]
  stack = lambda first, n: {"x": np.stack([b["x"] for b in batches[first:first + n]])}  # noqa: E731

  class Tok:
    kind = "byte"
  out = evallib.evaluate_params(step, None, lambda i: batches[i], 5, Tok, 1.0, group=2,
                                group_step=group_step, group_batch_fn=stack)
  assert seen == [0, 1, 2, 3, 4]
  np.testing.assert_allclose(out["loss"], 2.0)  # mean of 0..4


def test_relu2_mlp_and_wsd_schedule():
  import jax.numpy as jnp
  from llmjax.model import Transformer, TransformerConfig
  from llmjax.optim import learning_rate_schedule
  cfg = TransformerConfig(vocab_size=16, num_layers=1, num_heads=2, embed_dim=8, max_seq_len=8,
                          mlp="relu2")
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  assert np.isfinite(np.asarray(model.apply(params, tokens))).all()
  o = cfglib.default_config().optim
  o.update(schedule="wsd", lr=1.0, warmup_steps=10, min_lr_ratio=0.0, cooldown_frac=0.5)
  lr = learning_rate_schedule(o, 110)
  assert float(lr(5)) == 0.5 and float(lr(10)) == 1.0 and float(lr(60)) == 1.0
  np.testing.assert_allclose([float(lr(85)), float(lr(110))], [0.5, 0.0], atol=1e-6)
