"""model.matmul_dtype='bfloat16': bf16 x bf16 matmuls with float32 accumulation, forward and
backward, in a float32 model."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.model import Transformer, TransformerConfig
from llmjax.model.layers import bf16_matmul


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


def test_bf16_matmul_model_trains_like_float32():
  cfg = TransformerConfig(vocab_size=65, num_layers=2, embed_dim=64, num_heads=4, max_seq_len=32)
  fast = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((2, 32), jnp.int32))
                         ["params"])
  tokens = jax.random.randint(jax.random.key(2), (4, 33), 0, 65)

  def loss(c):
    def f(p):
      logits = Transformer(c).apply({"params": p}, tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return jax.value_and_grad(f)

  (l32, g32), (l16, g16) = loss(cfg)(params), loss(fast)(params)
  assert abs(float(l32) - float(l16)) < 1e-2
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, atol=0.05 * float(jnp.max(jnp.abs(a))) + 1e-6)
