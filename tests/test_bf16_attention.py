"""llmjax.model.bf16_attention: self-attention with bf16 x bf16 -> float32 matmuls (forward and
backward), used by model.matmul_dtype='bfloat16' on XLA's attention path (issue 12)."""
import re

import jax
import jax.numpy as jnp
import pytest

from llmjax.model.attention import uses_bf16_attention
from llmjax.model.bf16_attention import bf16_attention
from llmjax.model.config import TransformerConfig


def _reference(q, k, v, scale, causal):
  heads_second = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  out = jax.nn.dot_product_attention(heads_second(q), heads_second(k), heads_second(v),
                                     is_causal=causal, scale=scale, implementation="xla")
  return heads_second(out)


def _inputs(shape=(2, 3, 16, 8)):
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, shape) for key in keys]


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_attention_matches_float32_attention_and_its_gradients(causal):
  q, k, v, w = _inputs()
  scale = 8 ** -0.5

  def value_and_grads(f):
    loss = lambda q, k, v: jnp.sum(jnp.tanh(f(q, k, v, scale, causal)) * w)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (got, got_grads), (want, want_grads) = value_and_grads(bf16_attention), value_and_grads(_reference)
  assert abs(float(got) - float(want)) < 1e-2 * float(jnp.sum(jnp.abs(w)))
  for g, r in zip(got_grads, want_grads):
    assert g.shape == r.shape and g.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))) < 3e-2  # bf16 operand rounding
  # causal: a query never depends on later keys
  if causal:
    dq_first = jax.grad(lambda k: bf16_attention(q, k, v, scale, True)[:, :, 0].sum())(k)
    assert float(jnp.max(jnp.abs(dq_first[:, :, 1:]))) == 0.0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot lowering")
def test_bf16_attention_dots_stay_bf16_after_xla_cpu_compiles_them():
  q, k, v, _ = _inputs()
  grad = jax.grad(lambda q, k, v: bf16_attention(q, k, v, 0.35, True).sum(), argnums=(0, 1, 2))
  text = jax.jit(grad).lower(q, k, v).compile().as_text()
  types = {m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = (\w+)\[", text)}
  dots = [(types[a], types[b]) for a, b in re.findall(r" dot\(%(\S+), %(\S+)\)", text)]
  assert len(dots) == 6 and all(d == ("bf16", "bf16") for d in dots), dots


def test_only_bf16_matmul_models_on_the_xla_path_use_it():
  cfg = TransformerConfig(vocab_size=8, num_layers=1, embed_dim=16, num_heads=2, max_seq_len=8)
  assert not uses_bf16_attention(cfg)  # matmul_dtype='compute'
  assert uses_bf16_attention(TransformerConfig(**{**cfg.__dict__, "matmul_dtype": "bfloat16",
                                                  "attention_impl": "xla"}))
  assert not uses_bf16_attention(TransformerConfig(**{**cfg.__dict__, "matmul_dtype": "bfloat16",
                                                      "attention_impl": "cudnn"}))


def test_shakespeare_char_trains_with_bf16_matmuls_and_bf16_attention():
  # issue 12: the experiment's default (benchmarks/RESULTS.md, session 5)
  from experiments import shakespeare_char
  from llmjax import config as cfglib
  cfg = cfglib.model_config(shakespeare_char.get_config(), vocab_size=65)
  assert cfg.matmul_dtype == "bfloat16"
  assert uses_bf16_attention(cfg) or jax.default_backend() != "cpu"
