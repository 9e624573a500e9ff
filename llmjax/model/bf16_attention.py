"""Self-attention with bf16 x bf16 -> float32 matmuls, forward and backward (model.matmul_dtype=
'bfloat16', on the XLA path: CPUs, and GPUs without cuDNN).

`jax.nn.dot_product_attention`'s XLA implementation runs its four batched matmuls (and the
backward's) in the compute dtype, float32 for these models. On a CPU with AVX-512 BF16 the bf16
dots run about twice as fast, so this version casts q, k, v, the probabilities and the score
gradients to bf16 for the matmuls, accumulates in float32, and keeps the softmax, the mask and
the saved probabilities in float32 (the same split as `layers.bf16_matmul`). The backward is
written out (a custom VJP) so that every dot has a form XLA:CPU keeps in bf16: the two that
contract over query positions read a materialized transpose (see
`layers.materialized_transpose`). Issue 12, benchmarks/RESULTS.md (session 5).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from llmjax.model.layers import materialized_transpose

_BF16, _F32 = jnp.bfloat16, jnp.float32


def _bdot(a, b, contract_a: int, contract_b: int):
  """Matmul batched over the leading (batch, heads) axes, bf16 operands, float32 result."""
  return jax.lax.dot_general(a.astype(_BF16), b.astype(_BF16),
                             (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                             preferred_element_type=_F32)


def _forward(q, k, v, scale, causal):
  qb, kb, vb = q.astype(_BF16), k.astype(_BF16), v.astype(_BF16)
  scores = _bdot(qb, kb, 3, 3) * scale                                # [b, h, t, s]
  if causal:
    t, s = scores.shape[-2:]
    keep = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    scores = jnp.where(keep, scores, jnp.finfo(_F32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = _bdot(probs, vb, 3, 2)                                        # [b, h, t, d]
  return out.astype(q.dtype), (qb, kb, vb, probs, out)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bf16_attention(q, k, v, scale: float, causal: bool):
  """softmax(q k^T * scale [causal mask]) v for q, k, v: [batch, heads, length, head_dim]
  (k and v with as many heads as q), bf16 matmuls with float32 accumulation."""
  return _forward(q, k, v, scale, causal)[0]


def _fwd(q, k, v, scale, causal):
  return _forward(q, k, v, scale, causal)


def _bwd(scale, causal, saved, g):
  qb, kb, vb, probs, out = saved
  gb = g.astype(_BF16)
  dv = _bdot(materialized_transpose(probs.astype(_BF16)), gb, 3, 2)  # p^T @ dO
  dp = _bdot(gb, vb, 3, 3)                                            # dO @ v^T
  # softmax backward: dS = P * (dP - rowsum(dO * O)) (masked entries have P = 0)
  delta = jnp.sum(g.astype(_F32) * out, axis=-1, keepdims=True)
  ds = (probs * (dp - delta) * scale).astype(_BF16)
  dq = _bdot(ds, kb, 3, 2)                                            # dS @ k
  dk = _bdot(materialized_transpose(ds), qb, 3, 2)                    # dS^T @ q
  return dq.astype(g.dtype), dk.astype(g.dtype), dv.astype(g.dtype)


bf16_attention.defvjp(_fwd, _bwd)
