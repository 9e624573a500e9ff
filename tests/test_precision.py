"""model.matmul_dtype='bfloat16': bf16 x bf16 matmuls with float32 accumulation, forward and
backward, in a float32 model."""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.model import Transformer, TransformerConfig
from llmjax.model.layers import bf16_matmul, bf16_matmul_t


def test_bf16_matmul_gradients_run_in_bf16_and_match_float32():
  x = jax.random.normal(jax.random.key(0), (64, 32))
  w = jax.random.normal(jax.random.key(1), (32, 16))
  loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()  # noqa: E731
  got = jax.grad(loss(bf16_matmul), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
  for g, r in zip(got, ref):
    assert g.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))) < 2e-2  # bf16 operand rounding
  # Forward and both gradient matmuls take bf16 operands and accumulate in float32.
  text = jax.jit(jax.grad(loss(bf16_matmul), argnums=(0, 1))).lower(x, w).as_text()
  dots = [l for l in text.splitlines() if "stablehlo.dot_general" in l]
  assert len(dots) == 3, dots
  for line in dots:
    signature = line.rsplit(":", 1)[1]
    operands, result = signature.split("->")
    assert operands.count("bf16") == 2 and "f32" in result, line


def _compiled_dot_operand_types(fn, *args):
  """Operand dtypes of every dot in the optimized (compiled) HLO of fn(*args)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  types = {m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = (\w+)\[", text)}
  return [(types[a], types[b]) for a, b in re.findall(r" dot\(%(\S+), %(\S+)\)", text)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot lowering")
def test_bf16_matmul_gradient_dots_stay_bf16_after_xla_cpu_compiles_them():
  # XLA:CPU turned a dot reading a transposed operand (the weight gradient x.T @ g) into a
  # float32 Eigen dot at half the speed; bf16_matmul's backward is written so that every dot
  # of the compiled program keeps bf16 operands (issue 12, benchmarks/RESULTS.md, session 5).
  x = jax.random.normal(jax.random.key(0), (96, 32))
  w = jax.random.normal(jax.random.key(1), (32, 48))
  loss = lambda x, w: jnp.tanh(bf16_matmul(x, w)).sum()  # noqa: E731
  w_t = jax.random.normal(jax.random.key(2), (48, 32))  # [out, in], as a tied embedding table
  for f, weight in ((loss, w), (lambda x, w: jnp.tanh(bf16_matmul_t(x, w)).sum(), w_t)):
    dots = _compiled_dot_operand_types(jax.grad(f, argnums=(0, 1)), x, weight)
    assert len(dots) == 3 and all(d == ("bf16", "bf16") for d in dots), dots


def test_bf16_matmul_t_is_the_product_with_the_transpose_and_its_gradients():
  x = jax.random.normal(jax.random.key(0), (64, 32))
  w = jax.random.normal(jax.random.key(1), (16, 32))
  f = lambda g: jax.jit(jax.value_and_grad(lambda x, w: (g(x, w) ** 2).sum(), argnums=(0, 1)))  # noqa: E731
  (v, got), (r, ref) = f(bf16_matmul_t)(x, w), f(lambda x, w: x @ w.T)(x, w)
  assert abs(float(v) - float(r)) < 2e-2 * abs(float(r))
  for g, e in zip(got, ref):
    assert g.shape == e.shape and g.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(g - e)) / jnp.max(jnp.abs(e))) < 2e-2


@pytest.mark.parametrize("tie,scan,kv_heads", [(True, False, 0), (False, True, 2)])
def test_bf16_matmul_model_trains_like_float32(tie, scan, kv_heads):
  # tied (a bf16_matmul_t head) and untied, unrolled and scanned layers, multi-head and
  # grouped-query bf16 attention (llmjax.model.bf16_attention): compiled, so every dot of the
  # backward must run (XLA:CPU rejects some bf16 dot forms at run time)
  cfg = TransformerConfig(vocab_size=65, num_layers=2, embed_dim=64, num_heads=4, max_seq_len=32,
                          tie_embeddings=tie, scan_layers=scan, num_kv_heads=kv_heads)
  fast = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((2, 32), jnp.int32))
                         ["params"])
  tokens = jax.random.randint(jax.random.key(2), (4, 33), 0, 65)

  def loss(c):
    def f(p):
      logits = Transformer(c).apply({"params": p}, tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(f))  # compiled: XLA's passes see the whole backward

  (l32, g32), (l16, g16) = loss(cfg)(params), loss(fast)(params)
  assert abs(float(l32) - float(l16)) < 1e-2
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, atol=0.05 * float(jnp.max(jnp.abs(a))) + 1e-6)
