"""Decoding for encoder-decoder models: greedy, sampling and beam search.

Per request, the encoder runs once over the (right-padded) sources; the prefill call feeds the
decoder start token and projects the encoder output into every layer's cross-attention keys and
values, which stay in the cache (llmjax.model.attention.CrossAttention); each decoding step then
feeds one token, attends over the decoder's own KV cache (written at the token's position) and
over those cached source keys/values. Nothing about the source is recomputed after the prefill.

Greedy and sampling use llmjax.sampling (token i drawn with fold_in(key(seed), i), as in
llmjax.generate); beam search is llmjax.beam_search over the same step function.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import beam_search as bs
from llmjax.generate import cut_at_eos
from llmjax.model.encoder_decoder import unstack_decoder
from llmjax.sampling import Sampler, sample

CACHE_BUCKET = 64  # source widths and cache lengths round up to this (fewer recompilations)


class Seq2SeqError(ValueError):
  """A request an encoder-decoder cannot serve as given: reported as one line."""


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class _Sources:
  tokens: jax.Array        # [batch, width] right-padded
  segment_ids: jax.Array   # [batch, width]: 1 for real tokens, 0 for padding
  size: int
  cache_len: int


def _prepare(model, sources: Sequence[Sequence[int]], max_new_tokens: int) -> _Sources:
  if not sources:
    raise Seq2SeqError("no sources given")
  if max_new_tokens < 1:
    raise Seq2SeqError(f"max_new_tokens={max_new_tokens} must be at least 1")
  if min(len(s) for s in sources) < 1:
    raise Seq2SeqError("every source needs at least one token")
  cfg = model.cfg
  longest = max(len(s) for s in sources)
  learned = cfg.position == "learned"
  if learned and longest > cfg.max_seq_len:
    raise Seq2SeqError(f"a source has {longest} tokens but the model's learned positions cover "
                       f"{cfg.max_seq_len}; shorten it")
  if learned and max_new_tokens > cfg.max_seq_len:
    raise Seq2SeqError(f"max_new_tokens={max_new_tokens} exceeds the model's {cfg.max_seq_len} "
                       "learned target positions; lower it")
  width = _round_up(longest, CACHE_BUCKET)
  if learned:
    width = min(width, cfg.max_seq_len)
  tokens = np.zeros((len(sources), width), np.int32)
  segments = np.zeros((len(sources), width), np.int32)
  for i, s in enumerate(sources):
    tokens[i, : len(s)] = s
    segments[i, : len(s)] = 1
  cache_len = _round_up(max_new_tokens, CACHE_BUCKET)
  return _Sources(jnp.asarray(tokens), jnp.asarray(segments), len(sources), cache_len)


def _zero_cache(model, batch: int, cache_len: int):
  """The decoder's self-attention caches ("decoder"/"layer_i"/"attn"); the cross-attention keys
  and values are added by the prefill call."""
  cfg = model.cfg
  dtype = cfg.compute_dtype
  shape = (batch, cfg.kv_heads, cache_len, cfg.dim_per_head)
  layer = lambda: {"attn": {"cached_key": jnp.zeros(shape, dtype),  # noqa: E731
                            "cached_value": jnp.zeros(shape, dtype)}}
  return {"decoder": {f"layer_{i}": layer() for i in range(cfg.num_layers)}}


def _prefill(model, cache_len, params, src, src_seg):
  """Encodes the sources and feeds the decoder start token: -> (logits [batch, vocab], cache)."""
  batch = src.shape[0]
  encoded = model.apply({"params": params}, src, None, src_seg, method="encode")
  start = jnp.full((batch, 1), model.cfg.decoder_start_id, jnp.int32)
  positions = jnp.zeros((batch, 1), jnp.int32)
  logits, updates = model.apply({"params": params, "cache": _zero_cache(model, batch, cache_len)},
                                start, encoded, positions, None, src_seg, decode=True,
                                method="decode", mutable=["cache"])
  return logits[:, 0], updates["cache"]


def _step(model, params, cache, tokens, position, src_seg):
  """Feeds `tokens` [batch] at `position` [batch]: -> (next logits [batch, vocab], cache)."""
  logits, updates = model.apply({"params": params, "cache": cache}, tokens[:, None], None,
                                position[:, None], None, src_seg, decode=True, method="decode",
                                mutable=["cache"])
  return logits[:, 0], updates["cache"]


@functools.partial(jax.jit, static_argnames=("model", "sampler", "cache_len", "max_new_tokens"))
def _sample_on_device(model, sampler, cache_len, max_new_tokens, params, src, src_seg, key,
                      eos_id, sampling):
  params = unstack_decoder(params)
  logits, cache = _prefill(model, cache_len, params, src, src_seg)
  batch = src.shape[0]
  first = sample(jax.random.fold_in(key, 0), logits, sampler, sampling)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, token, out, done = carry
    logits, cache = _step(model, params, cache, token, jnp.full((batch,), i, jnp.int32), src_seg)
    token = sample(jax.random.fold_in(key, i), logits, sampler, sampling)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    return i + 1, cache, token, out, done | (token == eos_id)

  steps, _, _, out, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), cache, first, out, first == eos_id))
  return out, steps


@functools.partial(jax.jit, static_argnames=("model", "cache_len", "max_new_tokens", "beams"))
def _beams_on_device(model, cache_len, max_new_tokens, beams, params, src, src_seg, eos_id):
  params = unstack_decoder(params)
  logits, cache = _prefill(model, cache_len, params, src, src_seg)
  k = beams.num_beams
  batch = src.shape[0]
  cache, logits, seg = bs.repeat_beams(cache, k), bs.repeat_beams(logits, k), jnp.repeat(src_seg, k, 0)

  def step(cache, tokens, index):
    return _step(model, params, cache, tokens, jnp.full(tokens.shape, index + 1, jnp.int32), seg)

  def reorder(cache, rows):
    # Beams of one example share the source: its cross-attention keys/values need no reordering.
    return {"decoder": {name: {"attn": bs.reorder_rows(layer["attn"], rows),
                               "cross_attn": layer["cross_attn"]}
                        for name, layer in cache["decoder"].items()}}

  return bs.search(step, reorder, cache, logits, batch, beams, max_new_tokens, eos_id)


def generate(model, params, sources: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampler: Sampler | None = None, seed: int = 0, eos_id: int | None = None,
             num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, **sampling) -> list[list[int]]:
  """Each source's output token ids (without the decoder start token, cut after EOS).

  num_beams > 1 runs beam search (the sampler is then not used); otherwise greedy
  (temperature 0) or sampling per `sampler` / temperature=, top_k=, top_p= keywords."""
  if int(num_beams) < 1:
    raise Seq2SeqError(f"num_beams={num_beams} must be at least 1")
  batch = _prepare(model, sources, max_new_tokens)
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  if num_beams > 1:
    beams = bs.BeamConfig(int(num_beams), float(length_penalty), early_stopping)
    best, _, lengths = _beams_on_device(model, batch.cache_len, max_new_tokens, beams, params,
                                        batch.tokens, batch.segment_ids, eos)
    best, lengths = np.asarray(best), np.asarray(lengths)
    return [best[i, : lengths[i]].tolist() for i in range(batch.size)]
  sampler = sampler or Sampler(**sampling)
  out, steps = _sample_on_device(model, sampler.static, batch.cache_len, max_new_tokens, params,
                                 batch.tokens, batch.segment_ids, jax.random.key(seed), eos,
                                 sampler.dynamic())
  out = np.asarray(out)[: batch.size, : int(steps)]
  return [cut_at_eos(row.tolist(), eos_id) for row in out]


def recompute_generate(model, params, sources: Sequence[Sequence[int]], max_new_tokens: int,
                       eos_id: int | None = None) -> list[list[int]]:
  """Greedy decoding WITHOUT caches: every step re-runs the encoder and the whole decoder prefix.
  The reference the cached path is checked against (tests) and timed against (benchmarks)."""
  batch = _prepare(model, sources, max_new_tokens)
  out = _recompute(model, max_new_tokens, params, batch.tokens, batch.segment_ids)
  return [cut_at_eos(row.tolist(), eos_id) for row in np.asarray(out)[: batch.size]]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _recompute(model, max_new_tokens, params, src, src_seg):
  batch = src.shape[0]
  tokens = jnp.full((batch, max_new_tokens + 1), model.cfg.decoder_start_id, jnp.int32)

  def body(i, tokens):
    logits = model.apply({"params": params}, src, tokens[:, :-1], encoder_segment_ids=src_seg)
    nxt = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
    return tokens.at[:, i + 1].set(nxt)

  return jax.lax.fori_loop(0, max_new_tokens, body, tokens)[:, 1:]
