"""The model: shapes, parameter counts, causality, GQA vs MHA, rotary invariants, packed segments."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.model import Transformer, TransformerConfig, num_params
from llmjax.model.layers import apply_rotary

GPT2 = TransformerConfig(vocab_size=61, num_layers=2, num_heads=4, embed_dim=32, max_seq_len=32)
LLAMA = dataclasses.replace(GPT2, position="rotary", norm="rmsnorm", mlp="swiglu", num_kv_heads=2,
                            use_bias=False, tie_embeddings=False, mlp_dim=48)
MQA = dataclasses.replace(LLAMA, num_kv_heads=1)
VARIANTS = {"gpt2": GPT2, "llama_gqa": LLAMA, "mqa": MQA,
            "unrolled_remat": dataclasses.replace(LLAMA, scan_layers=False, remat_policy="full")}


def init(cfg, length=16, seed=0):
  model = Transformer(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((2, length), jnp.int32))["params"])
  return model, params


def tokens(cfg, shape=(2, 16), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_parameter_count(name):
  cfg = VARIANTS[name]
  model, params = init(cfg)
  logits = model.apply({"params": params}, tokens(cfg))
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  assert sum(x.size for x in jax.tree.leaves(params)) == num_params(cfg)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality_future_tokens_never_change_earlier_logits(name):
  cfg = VARIANTS[name]
  model, params = init(cfg)
  x = tokens(cfg)
  y = x.at[:, 10:].set((x[:, 10:] + 7) % cfg.vocab_size)
  a = model.apply({"params": params}, x)
  b = model.apply({"params": params}, y)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert not np.allclose(a[:, 10:], b[:, 10:])


def test_bidirectional_mode_sees_the_future():
  cfg = dataclasses.replace(GPT2, causal=False)
  model, params = init(cfg)
  x = tokens(cfg)
  y = x.at[:, 10:].set((x[:, 10:] + 7) % cfg.vocab_size)
  assert not np.allclose(model.apply({"params": params}, x)[:, :10],
                         model.apply({"params": params}, y)[:, :10])


def test_gqa_with_kv_heads_equal_heads_is_multi_head():
  explicit = dataclasses.replace(LLAMA, num_kv_heads=LLAMA.num_heads)
  implicit = dataclasses.replace(LLAMA, num_kv_heads=0)
  m1, p1 = init(explicit)
  m2, p2 = init(implicit)
  assert jax.tree.map(jnp.shape, p1) == jax.tree.map(jnp.shape, p2)
  x = tokens(LLAMA)
  np.testing.assert_allclose(m1.apply({"params": p1}, x), m2.apply({"params": p1}, x), atol=1e-6)


def test_gqa_equals_multi_head_with_repeated_kv_weights():
  """A GQA layer is a multi-head layer whose K/V heads are shared within each group."""
  gqa = LLAMA
  mha = dataclasses.replace(LLAMA, num_kv_heads=LLAMA.num_heads)
  m_gqa, p_gqa = init(gqa)
  m_mha, _ = init(mha)
  group = gqa.num_heads // gqa.kv_heads
  p_mha = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.repeat(v, group, axis=2)
      if any(getattr(k, "key", None) in ("key", "value") for k in path) else v, p_gqa)
  x = tokens(gqa)
  np.testing.assert_allclose(m_gqa.apply({"params": p_gqa}, x), m_mha.apply({"params": p_mha}, x),
                             atol=1e-5)


def test_rotary_preserves_norms_and_depends_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 2, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
  pos = lambda p: jnp.full((1, 1), p)
  rq = apply_rotary(q, pos(5), 10000.0)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(apply_rotary(q, pos(0), 10000.0), q, atol=1e-6)
  dot = lambda a, b: float(jnp.sum(apply_rotary(q, pos(a), 500.0) * apply_rotary(k, pos(b), 500.0)))
  assert dot(7, 3) == pytest.approx(dot(14, 10), rel=1e-4)
  assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-3)


def test_rope_theta_changes_the_model():
  model, params = init(LLAMA)
  other = Transformer(dataclasses.replace(LLAMA, rope_theta=500000.0))
  x = tokens(LLAMA)
  assert not np.allclose(model.apply({"params": params}, x), other.apply({"params": params}, x))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_packed_segments_never_attend_across_documents(name):
  cfg = VARIANTS[name]
  model, params = init(cfg)
  x = tokens(cfg, (1, 16))
  seg = jnp.asarray([[1] * 6 + [2] * 10])
  pos = jnp.asarray([list(range(6)) + list(range(10))])
  packed = model.apply({"params": params}, x, positions=pos, segment_ids=seg)
  alone_a = model.apply({"params": params}, x[:, :6])
  alone_b = model.apply({"params": params}, x[:, 6:])
  np.testing.assert_allclose(packed[:, :6], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed[:, 6:], alone_b, atol=1e-5)


def test_bf16_compute_with_fp32_params():
  cfg = dataclasses.replace(LLAMA, dtype="bfloat16", param_dtype="float32")
  model, params = init(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ref = Transformer(LLAMA).apply({"params": params}, tokens(cfg))
  out = model.apply({"params": params}, tokens(cfg))
  assert out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1


def test_dropout_is_active_only_when_training():
  cfg = dataclasses.replace(GPT2, dropout=0.5)
  model, params = init(cfg)
  x = tokens(cfg)
  eval_a = model.apply({"params": params}, x)
  np.testing.assert_allclose(eval_a, model.apply({"params": params}, x))
  train_a = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(train_a, eval_a)


def test_every_parameter_has_logical_axis_names():
  model = Transformer(LLAMA)
  boxed = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert leaves and all(len(s) > 0 and all(n is not None for n in s) for s in leaves)
