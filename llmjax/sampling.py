"""Token samplers: greedy, temperature, top-k and top-p (nucleus), as one pure jittable function.

The order is the usual one (Hugging Face, nanoGPT): divide by the temperature, keep the top k,
then keep the smallest set of tokens whose probability mass reaches p, and draw from what is left.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen.

  Only `top_k` and whether a nucleus filter runs at all change the compiled program; temperature
  and top_p are passed to it as values (`dynamic()`), so trying other settings never recompiles.
  """
  temperature: float = 1.0   # 0 -> greedy (argmax)
  top_k: int = 0             # 0 -> no top-k filter
  top_p: float = 1.0         # 1 -> no nucleus filter

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 disables it)")

  @property
  def static(self) -> tuple[int, bool]:
    """(top_k, nucleus): the part of the sampler that shapes the compiled program."""
    return (self.top_k, self.top_p < 1.0)

  def dynamic(self):
    return (jnp.float32(self.temperature), jnp.float32(self.top_p))


def sample(rng, logits, static: tuple[int, bool], dynamic):
  """Sampler.static/.dynamic split version of `sample_logits`, for use inside jitted loops."""
  top_k, nucleus = static
  temperature, top_p = dynamic
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  filtered = filter_logits(logits, safe_t, top_k, top_p if nucleus else 1.0)
  drawn = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


def top_p_mask(logits, top_p: float):
  """True for the tokens of the smallest set whose probability mass reaches `top_p`.

  A token is kept when the mass of the tokens ranked strictly above it is still below p, so the set
  always contains the most likely token and stops at the first token that reaches p.
  """
  order = jnp.argsort(-logits, axis=-1)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < top_p
  # Undo the sort: the rank of each token is the inverse permutation of `order`.
  rank = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, rank, axis=-1)


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """The logits the sampler draws from: scaled, with filtered-out tokens at -inf."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if not (isinstance(top_p, float) and top_p >= 1.0):
    logits = jnp.where(top_p_mask(logits, top_p), logits, -jnp.inf)
  return logits


def sample_logits(rng, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Token ids [batch] drawn from logits [batch, vocab]. temperature 0 is greedy (argmax)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
