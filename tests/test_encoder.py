"""Encoder models (BERT family) and the shared pieces they brought: post-norm blocks, token types,
sinusoidal positions, the masked-LM head, the pooler and NSP head, padding masks, build_model."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as cfglib
from llmjax.model import Encoder, Transformer, TransformerConfig, build_model, num_params
from llmjax.model.embeddings import sinusoidal_positions

BERT = TransformerConfig(vocab_size=61, num_layers=2, num_heads=4, embed_dim=32, max_seq_len=32,
                         family="encoder", causal=False, norm_position="post", type_vocab_size=2,
                         gelu_approximate=False, norm_eps=1e-12, pooler=True, nsp_head=True)
VARIANTS = {
    "bert": BERT,
    "pre_norm_sinusoidal_untied": dataclasses.replace(
        BERT, norm_position="pre", position="sinusoidal", tie_embeddings=False, pooler=False,
        nsp_head=False, type_vocab_size=0),
    "unrolled_remat_rotary_swiglu": dataclasses.replace(
        BERT, scan_layers=False, remat_policy="full", position="rotary", mlp="swiglu",
        use_bias=False),
}


def init(cfg, length=16):
  model = build_model(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, length), jnp.int32))
  return model, nn.meta.unbox(variables["params"]), variables


def ids(cfg, shape=(2, 16), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@pytest.mark.parametrize("name", VARIANTS)
def test_encoder_shapes_heads_and_parameter_count(name):
  cfg = VARIANTS[name]
  model, params, _ = init(cfg)
  assert isinstance(model, Encoder)
  x = ids(cfg)
  logits = model.apply({"params": params}, x)
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  assert sum(p.size for p in jax.tree.leaves(params)) == num_params(cfg)
  assert ("final_norm" in params) == (cfg.norm_position == "pre")
  assert ("pooler" in params) == cfg.pooler and ("nsp" in params) == cfg.nsp_head
  assert model.apply({"params": params}, x, return_hidden=True).shape == (2, 16, cfg.embed_dim)
  if cfg.nsp_head:
    same, nsp = model.apply({"params": params}, x, return_nsp=True)
    np.testing.assert_allclose(same, logits, atol=1e-6)
    assert nsp.shape == (2, 2)
    pooled = model.apply({"params": params}, x, return_pooled=True)
    assert pooled.shape == (2, cfg.embed_dim) and float(jnp.max(jnp.abs(pooled))) <= 1.0  # tanh


def test_encoder_is_bidirectional_even_if_causal_is_left_on():
  cfg = dataclasses.replace(BERT, causal=True)  # the encoder never applies a causal mask
  model, params, _ = init(cfg)
  x = ids(cfg)
  y = x.at[:, 10:].set((x[:, 10:] + 7) % cfg.vocab_size)
  assert not np.allclose(model.apply({"params": params}, x)[:, :5],
                         model.apply({"params": params}, y)[:, :5])


def test_padding_with_segment_zero_never_changes_real_tokens():
  model, params, _ = init(BERT)
  x = ids(BERT, (1, 10))
  alone = model.apply({"params": params}, x)
  padded = jnp.concatenate([x, jnp.full((1, 6), 3, x.dtype)], axis=1)
  seg = jnp.asarray([[1] * 10 + [0] * 6])
  out = model.apply({"params": params}, padded, segment_ids=seg)
  np.testing.assert_allclose(out[:, :10], alone, atol=1e-5)
  # without the mask the padding leaks into every position
  assert not np.allclose(model.apply({"params": params}, padded)[:, :10], alone, atol=1e-5)


def test_token_types_select_their_own_embedding():
  model, params, _ = init(BERT)
  x = ids(BERT)
  zero = model.apply({"params": params}, x)
  np.testing.assert_allclose(zero, model.apply({"params": params}, x,
                                               token_types=jnp.zeros_like(x)), atol=1e-6)
  ones = jnp.ones_like(x).at[:, :8].set(0)
  assert not np.allclose(zero[:, 8:], model.apply({"params": params}, x, token_types=ones)[:, 8:])


def test_mlm_head_decoder_is_tied_to_the_token_embedding_with_its_own_bias():
  model, params, _ = init(BERT)
  x = ids(BERT)
  hidden = model.apply({"params": params}, x, return_hidden=True)
  head = params["mlm_head"]
  h = hidden @ head["transform"]["kernel"] + head["transform"]["bias"]
  h = jax.nn.gelu(h, approximate=False)
  mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mean) / jnp.sqrt(var + BERT.norm_eps) * head["norm"]["scale"] + head["norm"]["bias"]
  expected = h @ params["token_embedding"].T + head["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), expected, atol=1e-4)


def test_sinusoidal_positions_are_the_original_transformers():
  pos = jnp.arange(50)[None]
  pe = np.asarray(sinusoidal_positions(pos, 16))[0]
  p, i = np.arange(50)[:, None], np.arange(8)[None]
  np.testing.assert_allclose(pe[:, 0::2], np.sin(p / 10000 ** (2 * i / 16)), atol=1e-5)
  np.testing.assert_allclose(pe[:, 1::2], np.cos(p / 10000 ** (2 * i / 16)), atol=1e-5)
  assert sinusoidal_positions(pos, 15).shape == (1, 50, 15)  # odd widths truncate


def test_decoders_take_sinusoidal_positions_and_post_norm():
  cfg = TransformerConfig(vocab_size=61, num_layers=2, num_heads=4, embed_dim=32, max_seq_len=32,
                          position="sinusoidal", norm_position="post")
  model, params, _ = init(cfg)
  assert isinstance(model, Transformer)
  assert "position_embedding" not in params and "final_norm" not in params
  assert sum(p.size for p in jax.tree.leaves(params)) == num_params(cfg)
  x = ids(cfg)
  a = model.apply({"params": params}, x)
  y = x.at[:, 10:].set((x[:, 10:] + 7) % cfg.vocab_size)
  np.testing.assert_allclose(a[:, :10], model.apply({"params": params}, y)[:, :10], atol=1e-5)
  # positions matter: the same token at two places gets two different outputs
  same = jnp.full((1, 8), 5)
  out = model.apply({"params": params}, same)
  assert not np.allclose(out[0, 2], out[0, 5])
  # post-norm: one layer's output is norm(h + mlp(h)) with h = norm(x + attn(x))
  pre = dataclasses.replace(cfg, norm_position="pre")
  assert not np.allclose(a, init(pre)[0].apply({"params": {**params, "final_norm": {
      "scale": jnp.ones(32), "bias": jnp.zeros(32)}}}, x))


def test_post_norm_block_is_norm_of_residual_sum():
  from llmjax.model.transformer import Block
  cfg = dataclasses.replace(BERT, num_layers=1)
  block = Block(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  v = block.init(jax.random.key(1), x, pos, None)
  p = nn.meta.unbox(v["params"])
  out, _ = block.apply({"params": p}, x, pos, None)
  from llmjax.model.attention import Attention
  from llmjax.model.layers import Mlp, Norm
  attn = Attention(cfg).apply({"params": p["attn"]}, x, pos)
  h = Norm(cfg).apply({"params": p["attn_norm"]}, x + attn)
  expected = Norm(cfg).apply({"params": p["mlp_norm"]}, h + Mlp(cfg).apply({"params": p["mlp"]}, h))
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_every_encoder_parameter_has_logical_axis_names():
  _, _, variables = init(BERT)
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.Partitioned) for b in boxed)
  for b in boxed:
    named = [n for n in b.names if n]
    assert len(named) == len(set(named))  # a name may shard one dimension only


def test_build_model_and_config_validation():
  with pytest.raises(ValueError, match="model.family='nope'"):
    build_model(dataclasses.replace(BERT, family="nope"))
  c = cfglib.default_config()
  c.model.family = "nope"
  with pytest.raises(cfglib.ConfigError, match="model.family"):
    cfglib.validate(c)
  c = cfglib.default_config()
  c.model.norm_position = "middle"
  with pytest.raises(cfglib.ConfigError, match="model.norm_position"):
    cfglib.validate(c)
  c = cfglib.default_config()
  c.model.update(family="encoder", causal=False, position="sinusoidal", norm_position="post")
  cfglib.validate(c)


def test_encoder_refuses_cached_decoding():
  model, params, _ = init(BERT)
  with pytest.raises(ValueError, match="no KV-cached decoding"):
    model.apply({"params": params}, ids(BERT), decode=True)
