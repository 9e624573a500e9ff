"""Beam search on the device, for decoder-only and encoder-decoder models alike.

The search itself (`search`) knows nothing about models: it asks a `step(cache, tokens, index)
-> (logits, cache)` function for the next logits of every beam and a `reorder(cache, parents)`
function to make each surviving beam's cache follow its parent. The drivers here
(`generate_beams` for decoder-only runs) and in llmjax.seq2seq_decode (encoder-decoders) supply
them on top of the same KV-cache machinery as greedy decoding.

It follows Hugging Face's vectorized beam search (itself from Flax's), so that the same model gives
the same continuations as transformers' `generate(num_beams=...)`:
- every step keeps the 2 * num_beams best (beam, token) continuations by summed log-probability;
  those ending in EOS (or reaching max_new_tokens) among the best num_beams become finished
  hypotheses scored sum_logprob / generated_length ** length_penalty (t5x/HF's length penalty:
  > 0 favours longer outputs, < 0 shorter); the best num_beams unfinished ones continue;
- early_stopping=True stops an example once num_beams hypotheses are finished; False (HF's
  default) stops it once the best running beam, normalized at its current length, cannot beat
  the worst finished one; "never" assumes the running beams could reach max_new_tokens.
The result per example is its best finished hypothesis.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9  # HF's "impossible" score


class BeamSearchError(ValueError):
  """A beam-search request that cannot run as given: reported as one line."""


@dataclasses.dataclass(frozen=True)
class BeamConfig:
  num_beams: int = 4
  length_penalty: float = 1.0
  early_stopping: bool | str = False   # True | False | "never"

  def __post_init__(self):
    if int(self.num_beams) < 1:
      raise BeamSearchError(f"num_beams={self.num_beams} must be at least 1")
    if self.early_stopping not in (True, False, "never"):
      raise BeamSearchError(f"early_stopping={self.early_stopping!r} must be true, false or 'never'")


def _gather(x, idx):
  """x [batch, n, ...], idx [batch, k] -> [batch, k, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def search(step: Callable, reorder: Callable, cache, first_logits, batch: int, beams: BeamConfig,
           max_new_tokens: int, eos_id, pad_id: int = 0):
  """Runs the search inside a jitted caller.

  first_logits: [batch * num_beams, vocab] (each example's logits repeated per beam; the caches
  in `cache` likewise hold num_beams identical copies per example). step(cache, tokens
  [batch*num_beams], index) feeds generated token number `index` (0-based) and returns its
  successor's logits and the cache; reorder(cache, parents [batch*num_beams]) gathers the beams.
  Returns (tokens [batch, max_new_tokens] of the best hypothesis, padded with pad_id;
  their scores [batch]; the generated lengths [batch])."""
  k, n = beams.num_beams, max_new_tokens
  lp, early = beams.length_penalty, beams.early_stopping
  vocab = first_logits.shape[-1]
  keep = 2 * k
  top_k_mask = jnp.arange(keep) < k

  running_seqs = jnp.full((batch, k, n), pad_id, jnp.int32)
  running_scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG)
  seqs = jnp.full((batch, k, n), pad_id, jnp.int32)
  scores = jnp.full((batch, k), NEG, jnp.float32)
  finished = jnp.zeros((batch, k), bool)
  improvable = jnp.ones((batch, 1), bool)

  def cond(carry):
    i, done = carry[0], carry[-1]
    return (i < n) & ~done

  def body(carry):
    (i, cache, logits, running_seqs, running_scores, seqs, scores, finished, improvable,
     _) = carry
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
    logprobs = (logprobs + running_scores[:, :, None]).reshape(batch, k * vocab)
    top_lp, top_idx = jax.lax.top_k(logprobs, keep)
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = _gather(running_seqs, parent)
    top_seqs = jax.lax.dynamic_update_slice(
        top_seqs, token[:, :, None], (0, 0, i))
    hits = (token == eos_id) | (i + 1 >= n)

    # The best num_beams continuations that did not finish go on.
    live_lp = top_lp + hits.astype(jnp.float32) * NEG
    next_idx = jax.lax.top_k(live_lp, k)[1]
    new_running_seqs = _gather(top_seqs, next_idx)
    new_running_scores = _gather(live_lp, next_idx)
    parents = _gather(parent, next_idx)

    # Finished hypotheses among the top num_beams join the finished set if they beat it.
    just_done = hits & top_k_mask[None, :]
    cand = top_lp / ((i + 1).astype(jnp.float32) ** lp)
    if early is True:
      cand = cand + (jnp.all(finished, axis=-1, keepdims=True)).astype(jnp.float32) * NEG
    cand = cand + (~improvable).astype(jnp.float32) * NEG
    cand = cand + (~just_done).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([scores, cand], axis=1)
    best = jax.lax.top_k(merged_scores, k)[1]
    seqs = _gather(jnp.concatenate([seqs, top_seqs], axis=1), best)
    scores = _gather(merged_scores, best)
    finished = _gather(jnp.concatenate([finished, just_done], axis=1), best)

    i = i + 1
    best_len = jnp.float32(n) if (early == "never" and lp > 0) else i.astype(jnp.float32)
    best_running = new_running_scores[:, :1] / best_len ** lp
    worst_done = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    improvable = improvable & jnp.any(best_running > worst_done, axis=-1, keepdims=True)
    done = ~jnp.any(improvable) | jnp.all(hits)
    if early is True:
      done = done | jnp.all(finished)

    def advance(cache):
      cache = reorder(cache, (parents + jnp.arange(batch)[:, None] * k).reshape(-1))
      tokens = new_running_seqs[:, :, i - 1].reshape(-1)
      return step(cache, tokens, i - 1)

    logits, cache = jax.lax.cond(done | (i >= n), lambda c: (logits, c), advance, cache)
    return (i, cache, logits, new_running_seqs, new_running_scores, seqs, scores, finished,
            improvable, done)

  carry = (jnp.int32(0), cache, first_logits, running_seqs, running_scores, seqs, scores,
           finished, improvable, jnp.bool_(False))
  carry = jax.lax.while_loop(cond, body, carry)
  seqs, scores = carry[5], carry[6]
  best = seqs[:, 0]
  lengths = _lengths(best, eos_id, carry[0])
  return best, scores[:, 0], lengths


def _lengths(tokens, eos_id, steps):
  """Generated length of each row: up to and including its first EOS, else the steps run."""
  n = tokens.shape[1]
  is_eos = (tokens == eos_id) & (jnp.arange(n)[None] < steps)
  first = jnp.argmax(is_eos, axis=1)
  return jnp.where(jnp.any(is_eos, axis=1), first + 1, steps)


def repeat_beams(tree, num_beams: int):
  """Each example's rows repeated num_beams times along axis 0 (beams of one example adjacent)."""
  return jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0), tree)


def reorder_rows(tree, rows):
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


# -- decoder-only driver ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "mesh", "cache_len", "max_new_tokens",
                                             "beams"))
def _decoder_only(model, mesh, cache_len, max_new_tokens, beams, params, tokens, lengths, eos_id):
  from llmjax import generate as gen
  from llmjax.model import unstack_layers
  params = unstack_layers(params)
  batch = tokens.shape[0]
  logits, cache = gen._prefill(model, mesh, cache_len, params, tokens, lengths)
  k = beams.num_beams
  cache, logits = repeat_beams(cache, k), repeat_beams(logits, k)
  start = jnp.repeat(lengths, k)

  def step(cache, tokens, index):
    out, cache = gen._apply(model, mesh, params, cache, tokens[:, None], (start + index)[:, None])
    return out[:, 0], cache

  return search(step, reorder_rows, cache, logits, batch, beams, max_new_tokens, eos_id)


def generate_beams(model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   num_beams: int = 4, length_penalty: float = 1.0,
                   early_stopping: bool | str = False, eos_id: int | None = None,
                   mesh=None, rules=None) -> list[list[int]]:
  """Each prompt's best beam-search continuation (token ids, cut after EOS), for decoder-only
  models; the KV cache of generate.py holds num_beams rows per prompt."""
  from llmjax import generate as gen
  beams = BeamConfig(int(num_beams), float(length_penalty), early_stopping)
  # Beams multiply the rows, which need not divide a mesh's batch axes: the search runs without
  # activation sharding constraints (jit places the arrays from the params' shardings).
  del mesh, rules
  batch = gen._prepare(model, prompts, max_new_tokens, None)
  best, _, lengths = _decoder_only(model, None, batch.cache_len, max_new_tokens, beams, params,
                                   batch.tokens, batch.lengths,
                                   jnp.int32(-1 if eos_id is None else eos_id))
  best, lengths = np.asarray(best), np.asarray(lengths)
  return [best[i, : lengths[i]].tolist() for i in range(batch.size)]
