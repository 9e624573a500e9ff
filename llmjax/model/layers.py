"""Building blocks: norms, the MLP, rotary embeddings and logically-annotated dense layers.

Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv', 'vocab', ...). The model
never sees a mesh: llmjax.sharding maps these names onto mesh axes.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.model.config import TransformerConfig


def logical_init(cfg: TransformerConfig, names: Sequence[str | None], std: float | None = None):
  """A normal initializer tagged with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(std or cfg.init_std), tuple(names))


def zeros_init(names: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def ones_init(names: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(names))


def dense_weight(w, dtype, x):
  """Weight `w` as a `dtype` array for multiplying activation `x`. A compressed weight (e.g. an
  int8 QArray from llmjax.quantize) expands here, tied to `x` so that the compiler cannot expand
  every layer's weights at once ahead of time."""
  if hasattr(w, "dequantize_after"):
    return w.dequantize_after(x, dtype)
  return w.astype(dtype)


def embedding_rows(table, ids):
  """Rows `ids` of an embedding table (a compressed table gives just those rows)."""
  if hasattr(table, "take_rows"):
    return table.take_rows(ids)
  return jnp.take(table, ids, axis=0)


def constrain(x, names: Sequence[str | None]):
  """Activation sharding hint; a no-op unless logical axis rules are active."""
  return nn.with_logical_constraint(x, tuple(names))


@jax.custom_vjp
def bf16_matmul(x, w):
  """x @ w with bfloat16 operands and float32 accumulation, in the forward pass and in both
  gradient matmuls (autodiff of a mixed-precision dot would run the backward in float32, where
  two thirds of the FLOPs are). x and w share a dtype, which the result and gradients keep."""
  return _bf16_dot(x, w).astype(x.dtype)


def _bf16_dot(a, b, contract=(1, 0)):
  """a @ b (contract=(1, 0)) or a @ b.T (contract=(1, 1)), bf16 operands, float32 accumulation."""
  return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                             (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


def materialized_transpose(a):
  """a with its last two axes swapped, as a real copy the dot reads row by row, on CPU.

  XLA folds a plain transpose into the dot that reads it, and XLA:CPU (jaxlib 0.10) then runs
  a dot that contracts the lhs's first axis (the weight gradient x.T @ g) in float32 through
  Eigen: it converts both bf16 operands to float32, at about half the speed of the bf16 dot
  (benchmarks/RESULTS.md, issue 12, session 5). The same transpose written as reshape ->
  swapaxes -> reshape is not folded, so the dot keeps bf16 operands and runs in YNNPACK. Other
  backends contract any axis natively: there the plain transpose stays."""
  if jax.default_backend() != "cpu":
    return jnp.swapaxes(a, -1, -2)
  *lead, rows, cols = a.shape
  n = len(lead)
  return jnp.swapaxes(a.reshape(*lead, rows, cols, 1), n, n + 2).reshape(*lead, cols, rows)


def _bf16_matmul_fwd(x, w):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)  # saved as bf16: half the bytes
  return _bf16_dot(xb, wb).astype(x.dtype), (xb, wb)


def _bf16_matmul_bwd(saved, g):
  xb, wb = saved
  gb = g.astype(jnp.bfloat16)
  # dx = g @ w.T as a dot contracting both operands' last axes (kept in bf16 by XLA:CPU; a
  # transpose op in front of the dot made it fall back to float32 operands); dw = x.T @ g with
  # x.T materialized (see materialized_transpose).
  dx = _bf16_dot(gb, wb, contract=(1, 1))
  dw = _bf16_dot(materialized_transpose(xb), gb)
  return dx.astype(g.dtype), dw.astype(g.dtype)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


@jax.custom_vjp
def bf16_matmul_t(x, w):
  """x @ w.T (w: [out, in], e.g. a tied embedding table used as the output head) as bf16_matmul
  does x @ w. A separate function rather than bf16_matmul(x, w.T): XLA folds that transpose
  into the gradient dot, and on CPU the resulting bf16 dot contracting both operands' first
  axes reaches an Eigen kernel that rejects bf16 ("Unsupported element type for
  DotThunk::Execute")."""
  return _bf16_dot(x, w, contract=(1, 1)).astype(x.dtype)


def _bf16_matmul_t_fwd(x, w):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return _bf16_dot(xb, wb, contract=(1, 1)).astype(x.dtype), (xb, wb)


def _bf16_matmul_t_bwd(saved, g):
  xb, wb = saved
  gb = g.astype(jnp.bfloat16)
  dx = _bf16_dot(gb, wb)                               # g @ w
  dw = _bf16_dot(materialized_transpose(gb), xb)      # g.T @ x: [out, in] like w
  return dx.astype(g.dtype), dw.astype(g.dtype)


bf16_matmul_t.defvjp(_bf16_matmul_t_fwd, _bf16_matmul_t_bwd)


def matmul(cfg: TransformerConfig, x, w, transpose_w: bool = False):
  """A 2-D matmul x @ w (x @ w.T with transpose_w) as the config asks (see
  TransformerConfig.matmul_dtype)."""
  if cfg.matmul_dtype == "bfloat16":
    return (bf16_matmul_t if transpose_w else bf16_matmul)(x, w.astype(x.dtype))
  return jnp.dot(x, w.T if transpose_w else w)


class DenseGeneral(nn.Module):
  """y = x @ W (+ b) contracting x's last `len(in_shape)` axes, with logical names on W and b."""
  cfg: TransformerConfig
  out_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_axes: int = 1
  use_bias: bool = False
  std: float | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    in_shape = x.shape[-self.in_axes:]
    kernel = self.param("kernel", logical_init(cfg, self.kernel_axes, self.std),
                        tuple(in_shape) + tuple(self.out_shape), cfg.weight_dtype)
    x = x.astype(cfg.compute_dtype)
    kernel = dense_weight(kernel, cfg.compute_dtype, x)
    # One plain 2-D matmul [tokens, in] @ [in, out]: XLA:CPU runs it and the two matmuls of its
    # gradient much faster than a dot_general contracting over several axes (1.4x per step on
    # the 6-layer 384-wide CPU benchmark; benchmarks/RESULTS.md). The reshapes are free.
    lead = x.shape[: x.ndim - self.in_axes]
    y = matmul(cfg, x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(in_shape), -1))
    y = y.reshape(*lead, *self.out_shape)
    if self.use_bias:
      bias_axes = self.kernel_axes[self.in_axes:]
      bias = self.param("bias", zeros_init(bias_axes), tuple(self.out_shape), cfg.weight_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


class Norm(nn.Module):
  """LayerNorm (GPT-2) or RMSNorm (Llama), computed in float32 for stability."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    scale = self.param("scale", ones_init(("embed",)), (x.shape[-1],), cfg.weight_dtype)
    xf = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
      mean = jnp.mean(xf, axis=-1, keepdims=True)
      xf = xf - mean
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + cfg.norm_eps) * scale.astype(jnp.float32)
    if cfg.norm == "layernorm" and cfg.use_bias:
      bias = self.param("bias", zeros_init(("embed",)), (x.shape[-1],), cfg.weight_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(cfg.compute_dtype)


class Mlp(nn.Module):
  """GELU (GPT-2: fc -> gelu -> proj), ReLU (T5 v1.0), squared ReLU (relu2), SwiGLU (Llama: silu(gate) * up -> down) or
  GeGLU (T5 v1.1: gelu(gate) * up -> down)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.cfg
    f = cfg.hidden_dim
    # GPT-2 scales the init of residual-output projections by 1/sqrt(2 * layers).
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    if cfg.mlp == "swiglu":
      gate = DenseGeneral(cfg, (f,), ("embed", "mlp"), use_bias=cfg.use_bias, name="gate")(x)
      up = DenseGeneral(cfg, (f,), ("embed", "mlp"), use_bias=cfg.use_bias, name="up")(x)
      h = nn.silu(gate) * up
    elif cfg.mlp == "geglu":  # T5 v1.1's gated GELU: gelu(gate) * up -> down
      gate = DenseGeneral(cfg, (f,), ("embed", "mlp"), use_bias=cfg.use_bias, name="gate")(x)
      up = DenseGeneral(cfg, (f,), ("embed", "mlp"), use_bias=cfg.use_bias, name="up")(x)
      h = nn.gelu(gate, approximate=cfg.gelu_approximate) * up
    elif cfg.mlp in ("gelu", "relu", "relu2"):
      h = DenseGeneral(cfg, (f,), ("embed", "mlp"), use_bias=cfg.use_bias, name="fc")(x)
      if cfg.mlp == "gelu":
        h = nn.gelu(h, approximate=cfg.gelu_approximate)
      else:  # relu2: squared ReLU (Primer; the modded-nanogpt speedrun's MLP), issue 12
        h = nn.relu(h) if cfg.mlp == "relu" else jnp.square(nn.relu(h))
    else:
      raise ValueError(f"model.mlp must be 'gelu', 'swiglu', 'relu', 'relu2' or 'geglu', got "
                       f"{cfg.mlp!r}")
    h = constrain(h, ("batch", "length", "mlp"))
    out = DenseGeneral(cfg, (cfg.embed_dim,), ("mlp", "embed"), use_bias=cfg.use_bias,
                       std=out_std, name="proj")(h)
    return nn.Dropout(cfg.dropout)(out, deterministic=deterministic)


def rotary_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> jax.Array:
  """Inverse frequencies theta^(-2i/d), optionally rescaled (see TransformerConfig.rope_scaling)."""
  freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return freqs
  kind, factor, low, high, original_len = scaling
  if kind == "linear":
    return freqs / factor
  if kind == "llama3":
    # Wavelengths longer than original_len/low are slowed down by `factor`, shorter than
    # original_len/high are kept, and the band between is interpolated linearly in 1/wavelength.
    wavelen = 2 * jnp.pi / freqs
    smooth = (original_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return jnp.where(wavelen > original_len / low, freqs / factor,
                     jnp.where(wavelen < original_len / high, freqs, blended))
  raise ValueError(f"unknown rope scaling {kind!r}; expected 'none', 'linear' or 'llama3'")


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float,
                 scaling: tuple | None = None) -> jax.Array:
  """Rotate pairs (x[..., i], x[..., i + d/2]) by position * freq_i (the Llama / HF "rotate_half" layout).

  x: [batch, length, heads, head_dim]; positions: [batch, length] integer positions.
  """
  d = x.shape[-1]
  freqs = rotary_frequencies(d, theta, scaling)                          # [d/2]
  angles = positions[..., None].astype(jnp.float32) * freqs             # [b, t, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def relative_position_bucket(relative: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucket of each relative position (key position - query position): half the buckets hold
  exact small distances, the rest grow logarithmically up to max_distance (farther shares the
  last bucket). Bidirectional (encoder) splits the buckets between the two directions; causal
  (decoder) gives every future position bucket 0."""
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative > 0).astype(relative.dtype) * num_buckets
    distance = jnp.abs(relative)
  else:
    distance = -jnp.minimum(relative, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # Float32 like the reference, so the bucket boundaries fall on the same distances.
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(relative.dtype), num_buckets - 1)
  return bucket + jnp.where(is_small, distance, large)


def relative_bias(table: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
                  bidirectional: bool, max_distance: int) -> jax.Array:
  """Attention score bias [batch, heads, q, k] from a learned table [buckets, heads]."""
  relative = k_positions[:, None, :] - q_positions[:, :, None]           # [batch, q, k]
  buckets = relative_position_bucket(relative.astype(jnp.int32), bidirectional, table.shape[0],
                                     max_distance)
  return jnp.take(table, buckets, axis=0).transpose(0, 3, 1, 2)
