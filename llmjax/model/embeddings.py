"""Fixed sinusoidal position encodings (Vaswani et al. 2017, section 3.5).

PE[p, 2i] = sin(p / 10000^(2i/d)) and PE[p, 2i+1] = cos(p / 10000^(2i/d)): no parameters, any
length, and PE[p + k] a linear function of PE[p]. Decoders and encoders both use them through
model.position='sinusoidal'.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sinusoidal_positions(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
  """positions: int [batch, length] -> float32 [batch, length, dim], sin and cos interleaved."""
  half = (dim + 1) // 2
  inv_freq = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / dim)       # [half]
  angles = positions[..., None].astype(jnp.float32) * inv_freq                 # [b, t, half]
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)                  # [b, t, half, 2]
  return pe.reshape(*positions.shape, 2 * half)[..., :dim]
