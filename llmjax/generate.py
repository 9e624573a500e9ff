"""KV-cached text generation: prefill the prompts, then decode one token at a time.

Prompts of different lengths share one batch: each example writes its keys and values at its own
absolute positions in a preallocated per-layer cache, so no example ever attends to padding.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(rng, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Draws token ids from logits [batch, vocab]. temperature 0 is greedy (argmax)."""
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token when the mass strictly before it is still below p: the smallest set reaching p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(model, batch_size: int):
  """Zeroed KV cache for `batch_size` sequences of up to model.cfg.max_seq_len tokens."""
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model",))
def _forward_cached(model, params, cache, tokens, positions):
  logits, updates = model.apply({"params": params, "cache": cache}, tokens, positions=positions,
                                decode=True, mutable=["cache"])
  return logits, updates["cache"]


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _sample(rng, logits, temperature, top_k, top_p):
  return sample_logits(rng, logits, temperature, top_k, top_p)


def stream_tokens(model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  eos_id: int | None = None) -> Iterator[np.ndarray]:
  """Yields the next token of every sequence ([batch] int array) once per decoding step."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  max_len = model.cfg.max_seq_len
  if lengths.max() + max_new_tokens > max_len:
    raise ValueError(f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"the model's context of {max_len} tokens; shorten one of them")
  batch, width = len(prompts), int(lengths.max())
  padded = np.zeros((batch, width), np.int32)
  for i, p in enumerate(prompts):
    padded[i, : len(p)] = p
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
  cache = init_cache(model, batch)
  logits, cache = _forward_cached(model, params, cache, jnp.asarray(padded), jnp.asarray(positions))
  next_logits = logits[jnp.arange(batch), jnp.asarray(lengths) - 1]
  rng = jax.random.key(seed)
  done = np.zeros(batch, bool)
  pos = jnp.asarray(lengths)
  for i in range(max_new_tokens):
    token = _sample(jax.random.fold_in(rng, i), next_logits, temperature, top_k, top_p)
    host_token = np.asarray(token)
    yield host_token
    if eos_id is not None:
      done |= host_token == eos_id
      if done.all():
        return
    if i + 1 == max_new_tokens:
      return
    logits, cache = _forward_cached(model, params, cache, token[:, None], pos[:, None])
    next_logits = logits[:, 0]
    pos = pos + 1


def generate(model, params, prompts, max_new_tokens: int, **kwargs) -> list[list[int]]:
  """The generated continuation (without the prompt) of each prompt, cut after an EOS."""
  eos_id = kwargs.get("eos_id")
  outs = [[] for _ in prompts]
  finished = [False] * len(prompts)
  for step_tokens in stream_tokens(model, params, prompts, max_new_tokens, **kwargs):
    for i, t in enumerate(step_tokens):
      if not finished[i]:
        outs[i].append(int(t))
        finished[i] = eos_id is not None and int(t) == eos_id
  return outs


def sample_text(model, params, tokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
  """Prompt text in, prompt + continuation text out (used for the end-of-training sample)."""
  ids = tokenizer.encode(prompt) or [0]
  max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
  out = generate(model, params, [ids], max_new_tokens, temperature=temperature, top_k=top_k,
                 seed=seed, eos_id=tokenizer.eos_id)[0]
  return prompt + tokenizer.decode(out)
