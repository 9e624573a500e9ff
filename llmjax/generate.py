"""KV-cached text generation: prefill the prompts, then decode one token at a time.

Two drivers share the same jitted pieces and the same random stream (token i of a run is drawn
with `fold_in(key(seed), i)`), so they produce the same tokens:
- `generate`: the whole loop on the device (`lax.while_loop`), one dispatch per call; it stops
  early once every sequence has produced the end-of-sequence token.
- `stream_tokens`: a host loop of jitted decode steps that yields each step's tokens as soon as
  they exist (the CLI streams text with it, and stops on stop strings). It dispatches step i+1
  before it waits for token i, so the device never idles on the host.

Prompts of different lengths share one batch: each example writes its keys and values at its own
absolute positions in a preallocated per-layer cache, so no example ever attends to padding. The
cache is only as long as the generation needs (not the model's whole context) and carries the
same logical shardings as the parameters, so decoding runs unchanged on a device mesh.

Past the model's context (prompt + continuation longer than `max_seq_len`), each further token is
drawn from a forward pass over the sequence's last `max_seq_len` tokens, as nanoGPT's sample.py
does (see "past the context" below); the tokens that fit still come from the KV cache.

Decoding runs the model's per-layer path (see llmjax.model.transformer): the stacked layer weights
are split into per-layer arrays once per call (`decode_params`), and each layer has its own cache
arrays, which the decode step updates in place. This costs one extra copy of the layer weights
while a generation runs (callers that decode many times can split once and pass the result).

Command line (streams text; see README "Generate"):
  python -m llmjax.generate --workdir=runs/demo --prompt="ROMEO:" --max_new_tokens=200
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import sharding as shd
from llmjax.model import unstack_layers
from llmjax.model.attention import CACHE_AXES
from llmjax.sampling import Sampler, sample, sample_logits  # noqa: F401  (sample_logits: re-export)


class GenerateError(ValueError):
  """A request that cannot be served as given (too long, empty, ...): reported as one line."""


CACHE_BUCKET = 64  # cache and prompt lengths are rounded up to this, to reuse compiled programs


# -- placement -------------------------------------------------------------------------------------
# Inside the jitted functions `mesh` is a static (Mesh, logical rules) pair, or None on one device.
@functools.lru_cache(maxsize=None)
def default_rules() -> tuple:
  from llmjax import config as cfglib
  return shd.logical_rules(cfglib.default_config())


def _placement(mesh, rules):
  return None if mesh is None else (mesh, tuple(rules or default_rules()))


def _batch_shards(mesh) -> int:
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in shd.BATCH_AXES if a in mesh.shape)


def _fit_spec(spec: P, shape, mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. one MQA head over 2 devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def cache_shardings(cache_shapes, mesh, rules=None):
  """NamedShardings for the per-layer caches from their logical axes (CACHE_AXES)."""
  spec = nn.logical_to_mesh_axes(CACHE_AXES, rules or default_rules())
  return jax.tree.map(lambda s: NamedSharding(mesh, _fit_spec(spec, s.shape, mesh)), cache_shapes)


def cache_shapes(model, batch_size: int, length: int):
  """ShapeDtypeStructs of the KV cache: per layer ("layer_0", ...) keys and values
  [batch, kv_heads, length, head_dim] (CACHE_AXES)."""
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]

  def resize(s):
    shape = list(s.shape)
    shape[CACHE_AXES.index("length")] = length
    return jax.ShapeDtypeStruct(tuple(shape), s.dtype)
  return jax.tree.map(resize, shapes)


def init_cache(model, batch_size: int, length: int | None = None, mesh=None, rules=None):
  """A zeroed KV cache for `batch_size` sequences of up to `length` (default: the context) tokens."""
  shapes = cache_shapes(model, batch_size, length or model.cfg.max_seq_len)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if mesh is not None:
    cache = jax.device_put(cache, cache_shardings(shapes, mesh, rules))
  return cache


def _zero_cache(model, batch_size, length, mesh):
  """Inside jit: the cache is born on the device(s), already in its sharding."""
  shapes = cache_shapes(model, batch_size, length)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if mesh is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_shardings(shapes, *mesh))
  return cache


# -- the jitted pieces -----------------------------------------------------------------------------
@jax.jit
def decode_params(params):
  """The params split into per-layer weights, as decoding reads them (see module docstring).
  Passing these instead of the stacked params saves that split (a copy) on every call."""
  return unstack_layers(params)


def _apply(model, mesh, params, cache, tokens, positions):
  params = unstack_layers(params)  # a no-op for params from decode_params
  # Traced inside jit, where jax.set_mesh is not allowed: the abstract mesh is what flax's logical
  # activation constraints look up (under the legacy `with mesh:` they silently did nothing).
  scope = (contextlib.nullcontext() if mesh is None
           else jax.sharding.use_abstract_mesh(mesh[0].abstract_mesh))
  with nn.logical_axis_rules(() if mesh is None else mesh[1]), scope:
    logits, updates = model.apply({"params": params, "cache": cache}, tokens,
                                  positions=positions, decode=True, mutable=["cache"])
  return logits, updates["cache"]


def _prefill(model, mesh, cache_len, params, tokens, lengths):
  """Runs the padded prompts through the model; returns the logits after each prompt's last token."""
  batch, width = tokens.shape
  cache = _zero_cache(model, batch, cache_len, mesh)
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
  logits, cache = _apply(model, mesh, params, cache, tokens, positions)
  return logits[jnp.arange(batch), lengths - 1], cache


@functools.partial(jax.jit, static_argnames=("model", "mesh", "sampler", "cache_len"))
def prefill(model, mesh, sampler, cache_len, params, tokens, lengths, key, sampling):
  """-> (first sampled token [batch], its logits [batch, vocab], the filled cache).

  `sampler` is Sampler.static, `sampling` Sampler.dynamic()."""
  logits, cache = _prefill(model, mesh, cache_len, params, tokens, lengths)
  return sample(jax.random.fold_in(key, 0), logits, sampler, sampling), logits, cache


@functools.partial(jax.jit, static_argnames=("model", "mesh", "sampler"), donate_argnames=("cache",))
def decode_step(model, mesh, sampler, params, cache, token, position, key, index, sampling):
  """Feeds `token` (at `position`) and samples token number `index`. The cache is donated, so
  XLA updates it in place instead of copying it every step. Pass `decode_params(params)`: stacked
  params would be split (copied) on every step."""
  logits, cache = _apply(model, mesh, params, cache, token[:, None], position[:, None])
  logits = logits[:, 0]
  return sample(jax.random.fold_in(key, index), logits, sampler, sampling), logits, cache


@functools.partial(jax.jit, static_argnames=("model", "mesh", "sampler", "cache_len",
                                             "max_new_tokens", "return_logits"))
def _generate_on_device(model, mesh, sampler, cache_len, max_new_tokens, return_logits,
                        params, tokens, lengths, key, eos_id, sampling):
  """The whole generation as one program: prefill, then a while_loop of decode steps that ends
  after max_new_tokens or once every sequence has emitted eos_id (-1: never)."""
  params = unstack_layers(params)  # once, outside the loop: the loop body reads per-layer arrays
  logits, cache = _prefill(model, mesh, cache_len, params, tokens, lengths)
  batch = tokens.shape[0]
  first = sample(jax.random.fold_in(key, 0), logits, sampler, sampling)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  record = None
  if return_logits:
    record = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), logits.dtype).at[:, 0].set(logits)

  def cond(carry):
    i, _, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, token, position, out, record, done = carry
    logits, cache = _apply(model, mesh, params, cache, token[:, None], position[:, None])
    logits = logits[:, 0]
    token = sample(jax.random.fold_in(key, i), logits, sampler, sampling)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    if record is not None:
      record = jax.lax.dynamic_update_slice(record, logits[:, None], (0, i, 0))
    return i + 1, cache, token, position + 1, out, record, done | (token == eos_id)

  carry = (jnp.int32(1), cache, first, lengths, out, record, first == eos_id)
  steps, _, _, _, out, record, _ = jax.lax.while_loop(cond, body, carry)
  return out, steps, record


# -- host-side drivers -----------------------------------------------------------------------------
def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class _Batch:
  tokens: jax.Array     # [padded batch, width] right-padded prompts
  lengths: jax.Array    # [padded batch]
  size: int             # the caller's batch size (rows past it pad the batch for the mesh)
  cache_len: int


def _check(prompts, max_new_tokens: int) -> None:
  if not prompts:
    raise GenerateError("no prompts given")
  if max_new_tokens < 1:
    raise GenerateError(f"max_new_tokens={max_new_tokens} must be at least 1")
  if min(len(p) for p in prompts) < 1:
    raise GenerateError("every prompt needs at least one token")


def _cached_count(model, prompts, max_new_tokens: int) -> int:
  """How many of the new tokens the KV cache serves: all of them when prompt + continuation fit
  the context; otherwise those drawn before the longest sequence fills it (0 for a prompt already
  longer than the context). The rest slide the window (see "past the context" below)."""
  context = model.cfg.max_seq_len
  # The last sampled token is never fed back, so it needs no cache slot.
  return max(0, min(max_new_tokens, context - max(len(p) for p in prompts) + 1))


def _pad_rows(prompts, width: int, mesh):
  """Right-padded [rows, width] tokens and [rows] lengths, rows rounded up to the mesh's batch
  shards (filler rows repeat the first prompt), placed on the mesh."""
  rows = _round_up(len(prompts), _batch_shards(mesh))
  padded = np.zeros((rows, width), np.int32)
  lens = np.ones(rows, np.int32)
  for i, p in enumerate(prompts):
    padded[i, : len(p)] = p
    lens[i] = len(p)
  for i in range(len(prompts), rows):  # filler rows for an even split over the mesh
    padded[i], lens[i] = padded[0], lens[0]
  tokens, lens = jnp.asarray(padded), jnp.asarray(lens)
  if mesh is not None:
    tokens = jax.device_put(tokens, shd.batch_sharding(mesh, 2))
    lens = jax.device_put(lens, shd.batch_sharding(mesh, 1))
  return tokens, lens


def _prepare(model, prompts, max_new_tokens: int, mesh) -> _Batch:
  """`mesh`: a Mesh or None (the caller's, not the placement pair). The request must fit the
  context (callers cut it with _cached_count)."""
  _check(prompts, max_new_tokens)
  context = model.cfg.max_seq_len
  needed = max(len(p) for p in prompts) + max_new_tokens - 1
  assert needed <= context, (needed, context)
  cache_len = min(context, _round_up(needed, CACHE_BUCKET))
  width = min(cache_len, _round_up(max(len(p) for p in prompts), CACHE_BUCKET))
  tokens, lens = _pad_rows(prompts, width, mesh)
  return _Batch(tokens, lens, len(prompts), cache_len)


class Generation(list):
  """Each prompt's continuation (a list of token-id lists, cut after its EOS), plus `.logits`
  [batch, steps, vocab] (the logits each token was drawn from) when asked for."""

  def __init__(self, tokens, logits: np.ndarray | None = None):
    super().__init__(tokens)
    self.logits = logits

  @property
  def tokens(self) -> list[list[int]]:
    return list(self)


def generate(model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampler: Sampler | None = None, seed: int = 0, eos_id: int | None = None,
             mesh=None, rules=None, return_logits: bool = False, **sampling) -> Generation:
  """Continuations of token-id prompts, generated entirely on the device.

  `sampler` (or temperature=, top_k=, top_p= keywords) picks tokens; `mesh` runs on a device mesh
  (params should already carry their shardings, e.g. from llmjax.runs.load_run) with the logical
  axis `rules` of the run (default: the default config's). Prompt + continuation may be longer
  than the model's context: past it, each token sees the last `max_seq_len` tokens (see below).
  """
  sampler = sampler or Sampler(**sampling)
  _check(prompts, max_new_tokens)
  placement = _placement(mesh, rules)
  key, eos = jax.random.key(seed), jnp.int32(-1 if eos_id is None else eos_id)
  cached = _cached_count(model, prompts, max_new_tokens)
  if cached < max_new_tokens:
    params = decode_params(params)  # split once for both programs below
  rows = [[] for _ in prompts]
  logits = []
  if cached:
    batch = _prepare(model, prompts, cached, mesh)
    out, steps, record = _generate_on_device(
        model, placement, sampler.static, batch.cache_len, cached, return_logits, params,
        batch.tokens, batch.lengths, key, eos, sampler.dynamic())
    steps = int(steps)
    rows = np.asarray(out)[: len(prompts), :steps].tolist()
    if record is not None:
      logits.append(np.asarray(record)[: len(prompts), :steps])
  done = [eos_id is not None and eos_id in row for row in rows]
  if cached < max_new_tokens and not all(done):
    tokens, lengths, width = _window_rows(model, prompts, rows, max_new_tokens, mesh)
    out, steps, record = _slide_on_device(
        model, placement, sampler.static, cached, max_new_tokens, return_logits, params, tokens,
        lengths, key, eos, _padded_flags(done, tokens.shape[0], mesh), sampler.dynamic())
    steps = int(steps)
    for row, new in zip(rows, np.asarray(out)[: len(prompts), : steps - cached].tolist()):
      row.extend(new)
    if record is not None:
      logits.append(np.asarray(record)[: len(prompts), : steps - cached])
  tokens = [cut_at_eos(row, eos_id) for row in rows]
  return Generation(tokens, np.concatenate(logits, axis=1) if return_logits else None)


def cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
  if eos_id is not None and eos_id in ids:
    return ids[: ids.index(eos_id) + 1]
  return ids


def stream_tokens(model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  sampler: Sampler | None = None, seed: int = 0, eos_id: int | None = None,
                  mesh=None, rules=None, **sampling) -> Iterator[np.ndarray]:
  """Yields every sequence's next token ([batch] ints) once per decoding step, as soon as it is
  known; stops after max_new_tokens or when every sequence has produced eos_id. The tokens equal
  `generate`'s for the same arguments (also past the context). Closing the generator early stops
  the decoding."""
  sampler = sampler or Sampler(**sampling)
  _check(prompts, max_new_tokens)
  key = jax.random.key(seed)
  static, dynamic = sampler.static, sampler.dynamic()
  placement = _placement(mesh, rules)
  params = decode_params(params)
  cached = _cached_count(model, prompts, max_new_tokens)
  rows = [[] for _ in prompts]
  done = np.zeros(len(prompts), bool)

  def emit(host):
    nonlocal done
    for row, t in zip(rows, host.tolist()):
      row.append(t)
    if eos_id is not None:
      done |= host == eos_id
    return host

  if cached:
    batch = _prepare(model, prompts, cached, mesh)
    token, _, cache = prefill(model, placement, static, batch.cache_len, params, batch.tokens,
                              batch.lengths, key, dynamic)
    position = batch.lengths
    for i in range(1, cached + 1):
      if i < cached:  # queue the next step before waiting for this token
        upcoming, _, cache = decode_step(model, placement, static, params, cache, token, position,
                                         key, jnp.int32(i), dynamic)
        position = position + 1
      yield emit(np.asarray(token)[: batch.size])
      if done.all():
        return
      if i < cached:
        token = upcoming
    del cache
  if cached == max_new_tokens:
    return
  tokens, lengths, _ = _window_rows(model, prompts, rows, max_new_tokens, mesh)
  token, _, tokens = window_step(model, placement, static, params, tokens, lengths, key,
                                 jnp.int32(cached), dynamic)
  for i in range(cached + 1, max_new_tokens + 1):
    if i < max_new_tokens:  # as above: the next window is queued before this token is read
      upcoming, _, tokens = window_step(model, placement, static, params, tokens, lengths, key,
                                        jnp.int32(i), dynamic)
    yield emit(np.asarray(token)[: len(prompts)])
    if done.all():
      return
    if i < max_new_tokens:
      token = upcoming


# -- past the context: a sliding window ------------------------------------------------------------
# Once a sequence is longer than the model's context, each next token is drawn from a forward pass
# over the sequence's last `max_seq_len` tokens at positions 0..max_seq_len-1, as nanoGPT's
# sample.py does. The window is recomputed for every token, for learned and rotary positions
# alike: a rolling KV cache would keep keys computed while older tokens were still in view, so past
# the first layer it would not equal the window's own forward pass. Recomputing costs a forward
# over the window per token (the tokens that fit the context still come from the KV cache).
def _window_rows(model, prompts, rows, max_new_tokens: int, mesh):
  """Every sequence so far (prompt + tokens generated) in a buffer wide enough for the whole
  generation -> (tokens [rows, width], lengths [rows], width)."""
  width = max(model.cfg.max_seq_len, max(len(p) for p in prompts) + max_new_tokens)
  tokens, lengths = _pad_rows([list(p) + list(r) for p, r in zip(prompts, rows)], width, mesh)
  return tokens, lengths - len(rows[0]), width  # lengths of the prompts alone


def _padded_flags(flags, rows: int, mesh):
  flags = np.asarray(list(flags) + [True] * (rows - len(flags)), bool)  # filler rows: done
  out = jnp.asarray(flags)
  return out if mesh is None else jax.device_put(out, shd.batch_sharding(mesh, 1))


def _window_logits(model, mesh, params, tokens, known):
  """Logits after each sequence's last known token (`known` [rows] tokens so far), from its
  window of the last max_seq_len tokens (the whole sequence while it is shorter)."""
  context = model.cfg.max_seq_len
  start = jnp.maximum(known - context, 0)
  windows = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (context,)))(tokens, start)
  logits, _ = _prefill(model, mesh, context, params, windows, known - start)
  return logits


def _window_sample(model, mesh, sampler, params, tokens, lengths, key, index, sampling):
  """Draws token number `index` (each sequence holds its prompt + `index` tokens) and appends it."""
  known = lengths + index
  logits = _window_logits(model, mesh, params, tokens, known)
  token = sample(jax.random.fold_in(key, index), logits, sampler, sampling)
  tokens = jax.vmap(lambda row, t, at: jax.lax.dynamic_update_slice(row, t[None], (at,)))(
      tokens, token, known)
  return token, logits, tokens


@functools.partial(jax.jit, static_argnames=("model", "mesh", "sampler"), donate_argnames=("tokens",))
def window_step(model, mesh, sampler, params, tokens, lengths, key, index, sampling):
  """One sliding-window step for streaming: -> (token [rows], its logits, tokens with it written).
  `lengths` are the prompts' lengths; `tokens` hold prompt + `index` generated tokens per row."""
  return _window_sample(model, mesh, sampler, params, tokens, lengths, key, index, sampling)


@functools.partial(jax.jit, static_argnames=("model", "mesh", "sampler", "first", "max_new_tokens",
                                             "return_logits"))
def _slide_on_device(model, mesh, sampler, first, max_new_tokens, return_logits, params, tokens,
                     lengths, key, eos_id, done, sampling):
  """Tokens number first..max_new_tokens-1 by sliding windows, as one program (a while_loop that
  also ends once every sequence has emitted eos_id). -> (tokens [rows, n], steps, logits or None)."""
  params = unstack_layers(params)
  rows, count = tokens.shape[0], max_new_tokens - first
  out = jnp.zeros((rows, count), jnp.int32)
  record = None
  if return_logits:
    record = jnp.zeros((rows, count, model.cfg.vocab_size), jnp.dtype(model.cfg.logits_dtype))

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tokens, out, record, done = carry
    token, logits, tokens = _window_sample(model, mesh, sampler, params, tokens, lengths, key, i,
                                           sampling)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i - first))
    if record is not None:
      record = jax.lax.dynamic_update_slice(record, logits[:, None].astype(record.dtype),
                                            (0, i - first, 0))
    return i + 1, tokens, out, record, done | (token == eos_id)

  steps, _, out, record, _ = jax.lax.while_loop(cond, body, (jnp.int32(first), tokens, out, record,
                                                             done))
  return out, steps, record


# -- text ------------------------------------------------------------------------------------------
def encode_prompt(tokenizer, text: str, context: int, max_new_tokens: int,
                  truncate: bool = False) -> list[int]:
  """Token ids of a text prompt that leave room for max_new_tokens (left-truncated if asked)."""
  ids = list(tokenizer.encode(text))
  return fit_prompt(ids, context, max_new_tokens, truncate)


def fit_prompt(ids: list[int], context: int, max_new_tokens: int, truncate: bool = False) -> list[int]:
  room = context - max_new_tokens + 1
  if room < 1:
    raise GenerateError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {context} tokens; lower --max_new_tokens")
  if len(ids) > room:
    if not truncate:
      raise GenerateError(
          f"the prompt has {len(ids)} tokens but the model's context of {context} tokens leaves "
          f"room for {room} with max_new_tokens={max_new_tokens}; shorten it, lower "
          "--max_new_tokens, or pass --truncate_prompt to keep its last tokens")
    ids = ids[-room:]
  return ids


class TextStream:
  """Turns a growing list of token ids into text chunks that are safe to print: it holds back an
  incomplete UTF-8 character and any tail that could still become a stop string. It stops (and
  drops) at the first stop string or end-of-sequence token."""

  def __init__(self, tokenizer, stop: Sequence[str] = (), eos_id: int | None = None):
    self.tokenizer, self.stop, self.eos_id = tokenizer, [s for s in stop if s], eos_id
    self.ids: list[int] = []
    self.text = ""        # what has been emitted so far
    self.stopped = False

  def add(self, token: int) -> str:
    """The new printable text after `token` ('' once stopped)."""
    if self.stopped:
      return ""
    if self.eos_id is not None and int(token) == self.eos_id:
      self.stopped = True
      return self._emit(self.tokenizer.decode(self.ids))
    self.ids.append(int(token))
    text = self.tokenizer.decode(self.ids)
    cuts = [at for at in (text.find(s) for s in self.stop) if at >= 0]
    if cuts:
      self.stopped = True
      return self._emit(text[: min(cuts)])
    safe = len(text) - (1 if text.endswith("\ufffd") else 0)  # maybe half a UTF-8 character
    hold = max((len(s) - 1 for s in self.stop), default=0)
    return self._emit(text[: max(safe - hold, 0)])

  def finish(self) -> str:
    """Whatever was held back, once no more tokens will come."""
    return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids))

  def _emit(self, text: str) -> str:
    if len(text) <= len(self.text) or not text.startswith(self.text):
      return ""  # the decoded text changed under us (rare with sentencepiece); wait for more
    chunk, self.text = text[len(self.text):], text
    return chunk


def generate_text(model, params, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                  stop: Sequence[str] = (), seed: int = 0, mesh=None, rules=None,
                  use_eos: bool = True,
                  truncate_prompt: bool = False, **sampling) -> list[str]:
  """Each prompt's continuation as text, ending before the first stop string or EOS."""
  ids = [encode_prompt(tokenizer, p, model.cfg.max_seq_len, max_new_tokens, truncate_prompt)
         for p in prompts]
  eos_id = tokenizer.eos_id if use_eos else None
  streams = [TextStream(tokenizer, stop, eos_id) for _ in prompts]
  for step in stream_tokens(model, params, ids, max_new_tokens, seed=seed, eos_id=eos_id,
                            mesh=mesh, rules=rules, **sampling):
    for s, t in zip(streams, step):
      s.add(t)
    if all(s.stopped for s in streams):
      break
  for s in streams:
    s.finish()
  return [s.text for s in streams]


def sample_text(model, params, tokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
  """Prompt text in, prompt + continuation text out (used for the end-of-training sample)."""
  ids = tokenizer.encode(prompt) or [0]
  out = generate(model, params, [ids], max_new_tokens, temperature=temperature, top_k=top_k,
                 seed=seed, eos_id=tokenizer.eos_id).tokens[0]
  if tokenizer.eos_id is not None and out and out[-1] == tokenizer.eos_id:
    out = out[:-1]
  return prompt + tokenizer.decode(out)


if __name__ == "__main__":
  from llmjax.generate_cli import run
  run()
