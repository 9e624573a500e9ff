"""The optimizer: schedules, the weight-decay mask, clipping, and gradient accumulation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as cfglib
from llmjax import train as trainlib
from llmjax.model import Transformer, TransformerConfig
from llmjax.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


def optim_config(**kw):
  c = cfglib.default_config().optim
  c.update({"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})
  return c


def test_warmup_then_cosine_linear_and_constant():
  cos = learning_rate_schedule(optim_config(schedule="cosine"), 110)
  assert float(cos(0)) == 0.0
  assert float(cos(5)) == pytest.approx(5e-4)
  assert float(cos(10)) == pytest.approx(1e-3)
  assert float(cos(60)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-4)
  assert float(cos(110)) == pytest.approx(1e-4, rel=1e-4)
  lin = learning_rate_schedule(optim_config(schedule="linear"), 110)
  assert float(lin(60)) == pytest.approx(0.5 * (1e-3 + 1e-4), rel=1e-4)
  const = learning_rate_schedule(optim_config(schedule="constant"), 110)
  assert float(const(100)) == pytest.approx(1e-3)


def test_decay_mask_skips_norms_biases_and_optionally_embeddings():
  cfg = TransformerConfig(vocab_size=11, num_layers=1, num_heads=2, embed_dim=8, max_seq_len=8)
  params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  mask = weight_decay_mask(params)
  assert mask["layers"]["mlp"]["fc"]["kernel"] and not mask["layers"]["mlp"]["fc"]["bias"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["token_embedding"]
  assert weight_decay_mask(params, decay_embeddings=True)["token_embedding"]


def test_weight_decay_really_follows_the_mask():
  params = {"w": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  opt, _ = make_optimizer(optim_config(weight_decay=0.5, warmup_steps=0, schedule="constant",
                                       grad_clip=0.0), 10)
  state = opt.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, state, params)
  assert float(jnp.abs(updates["w"]).sum()) > 0 and float(jnp.abs(updates["bias"]).sum()) == 0


def test_global_norm_clipping():
  """With clipping at 1.0, two gradient sequences whose first gradient differs only in
  (above-threshold) scale give identical updates; without clipping Adam's moments differ."""
  params = {"w": jnp.zeros((3,))}

  def second_update(grad_clip, scale):
    opt, _ = make_optimizer(optim_config(grad_clip=grad_clip, warmup_steps=0, schedule="constant",
                                         weight_decay=0.0), 10)
    state = opt.init(params)
    _, state = opt.update({"w": scale * jnp.asarray([0.6, 0.8, 0.0])}, state, params)
    updates, _ = opt.update({"w": jnp.asarray([1.5, 0.0, 0.0])}, state, params)
    return np.asarray(updates["w"])

  np.testing.assert_allclose(second_update(1.0, 10.0), second_update(1.0, 50.0), rtol=1e-6)
  assert not np.allclose(second_update(0.0, 10.0), second_update(0.0, 50.0), rtol=1e-3)


def test_gradient_accumulation_equals_one_large_batch():
  cfg = TransformerConfig(vocab_size=17, num_layers=2, num_heads=2, embed_dim=16, max_seq_len=8)
  model = Transformer(cfg)
  opt, schedule = make_optimizer(optim_config(warmup_steps=0), 10)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  state = trainlib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
  x = jax.random.randint(jax.random.key(1), (8, 9), 0, cfg.vocab_size)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  one, m1 = jax.jit(trainlib.make_train_step(model, opt, schedule, seed=0))(state, batch)
  four, m4 = jax.jit(trainlib.make_train_step(model, opt, schedule, seed=0, grad_accum_steps=4))(state, batch)
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_muon_orthogonalizes_layer_matrices_and_leaves_the_rest_to_adamw():
  from llmjax.optim import muon_dimension_numbers
  cfg = TransformerConfig(vocab_size=32, num_layers=2, num_heads=2, embed_dim=16, max_seq_len=8,
                          tie_embeddings=False)
  model = Transformer(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))["params"])
  dims = muon_dimension_numbers(params)
  layer = dims["layers"]
  assert layer["attn"]["query"]["kernel"].reduction_axis == 1          # [L, embed, heads, hd]
  assert layer["attn"]["query"]["kernel"].output_axis == (2, 3)
  assert layer["attn"]["out"]["kernel"].reduction_axis == (1, 2)       # [L, heads, hd, embed]
  assert layer["mlp"]["fc"]["kernel"].output_axis == 2
  assert dims["token_embedding"] is None and dims["lm_head"]["kernel"] is None
  assert layer["attn_norm"]["scale"] is None

  o = optim_config(optimizer="muon", muon_lr=0.02, lr=1e-3, warmup_steps=0, weight_decay=0.0,
                   grad_clip=0.0)
  tx, _ = make_optimizer(o, 100)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  # jitted: one compilation instead of one per eager op of Newton-Schulz's many small ones
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # A layer matrix moves by an (approximately) orthogonal matrix: all singular values alike.
  fc = np.asarray(updates["layers"]["mlp"]["fc"]["kernel"][0])              # [16, 64]
  sv = np.linalg.svd(fc, compute_uv=False)
  assert sv.max() / sv.min() < 2.0 and 0.01 < sv.mean() < 0.1, sv
  # The embedding gets Adam's (Nesterov) first step: one magnitude, of order lr, on every entry.
  emb = np.abs(np.asarray(updates["token_embedding"]))
  np.testing.assert_allclose(emb, emb.flat[0], rtol=1e-3)
  assert 1e-3 <= emb.flat[0] < 2e-3


def test_muon_trains_through_the_program(tmp_path):
  """The train state is shaped from boxed (partitioned) params; Muon's masks must still find the
  layer matrices there, and steps must run and lower the loss."""
  from llmjax import loop
  config = cfglib.default_config()
  config.model.update(num_layers=2, num_heads=2, embed_dim=32, max_seq_len=32)
  config.data.update(seq_len=32, batch_size=4)
  config.optim.update(optimizer="muon", warmup_steps=0)
  config.train.update(steps=10)
  run = loop.Run(config, str(tmp_path))
  state = run.initial_state()
  mu = state.opt_state[1].inner_states["muon"].inner_state[0].mu
  assert mu["layers"]["mlp"]["fc"]["kernel"].shape == state.params["layers"]["mlp"]["fc"]["kernel"].shape
  losses = []
  with run.program.scope():
    for step in range(6):
      state, metrics = run.train_step(state, run.batch("train", 0))
      losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses


def _muon_setup():
  cfg = TransformerConfig(vocab_size=32, num_layers=2, num_heads=2, embed_dim=16, max_seq_len=8,
                          tie_embeddings=False)
  params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0),
                                                         jnp.zeros((2, 8), jnp.int32))["params"])
  grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
           for i in range(3)]
  return params, grads


def _run(tx, params, grads):
  state, out = tx.init(params), []
  for g in grads:
    updates, state = tx.update(g, state, params)
    out.append(updates)
  return out


def test_stacked_muon_equals_optax_contrib_muon():
  """issue 12: llmjax.muon stacks the matrices of one shape into one Newton-Schulz batch; in
  float32 its updates (3 steps, momentum and Nesterov included) are optax.contrib.muon's."""
  from optax import contrib
  from llmjax import muon
  from llmjax.optim import muon_dimension_numbers
  params, grads = _muon_setup()
  kw = dict(beta=0.95, weight_decay=0.1, adam_b1=0.9, adam_b2=0.95, adam_learning_rate=1e-3,
            adam_weight_decay=0.1)
  ours = _run(muon.muon(0.02, muon_dimension_numbers, **kw), params, grads)
  theirs = _run(contrib.muon(0.02, muon_weight_dimension_numbers=muon_dimension_numbers, **kw),
                params, grads)
  for a, b in zip(ours, theirs):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-7), a, b)


def test_muon_bf16_newton_schulz_stays_close_to_float32():
  """The bf16-operand iteration (optim.muon_ns_dtype) orthogonalizes as well as float32: every
  layer matrix's update is within bf16 rounding of the float32 one, and fewer iterations
  (optim.muon_ns_steps) change it."""
  params, grads = _muon_setup()
  f32, bf16, three = (make_optimizer(optim_config(optimizer="muon", warmup_steps=0, grad_clip=0.0,
                                                  muon_ns_dtype=d, muon_ns_steps=n), 100)[0]
                      for d, n in (("float32", 5), ("bfloat16", 5), ("float32", 3)))
  a, b, c = (_run(tx, params, grads[:1])[0] for tx in (f32, bf16, three))
  fc = lambda u: np.asarray(u["layers"]["mlp"]["fc"]["kernel"])  # noqa: E731
  scale = np.abs(fc(a)).max()
  assert np.abs(fc(a) - fc(b)).max() < 0.05 * scale
  assert np.abs(fc(a) - fc(c)).max() > 1e-3 * scale
  np.testing.assert_array_equal(a["token_embedding"], b["token_embedding"])  # AdamW's part
