"""Batched scoring of a loaded run on its mesh: log-likelihoods, rolling log-likelihoods, generation.

The task runner (`python -m llmjax.evaluate`) and the lm-evaluation-harness adapter
(`python -m llmjax.lm_eval`) both score through one `Scorer`, and split (context, continuation)
text the same way (`encode_pair`), so a multiple-choice task gives the same numbers through either.

Every forward pass runs on a fixed batch of `batch_size` rows (padded with weightless rows) and a
row width rounded up to a multiple of WIDTH_BUCKET, so a whole evaluation compiles only a handful
of programs. Parameters stay in the shardings the run was loaded with; rows are split over the
mesh's batch axes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llmjax import sharding as shd

WIDTH_BUCKET = 64


@functools.partial(jax.jit, static_argnames=("model",))
def _score_rows(model, params, inputs, targets, weights):
  """-> (sum of target log-probs over weighted positions [rows], whether every weighted target is
  the argmax [rows]). Log-softmax in float32 whatever the compute dtype."""
  logits = model.apply({"params": params}, inputs).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
  sums, greedy = jnp.sum(target_logp * weights, axis=-1), jnp.all(greedy, axis=-1)
  # Replicated results: every process can read them (a multi-host mesh splits the rows).
  return jax.lax.with_sharding_constraint((sums, greedy), P())


@functools.partial(jax.jit, static_argnames=("model",))
def _classify_rows(model, params, inputs, segment_ids, positions):
  """Label logits [rows, num_labels] of a classification model, replicated on every process."""
  logits = model.apply({"params": params}, inputs, segment_ids=segment_ids, positions=positions)
  return jax.lax.with_sharding_constraint(logits.astype(jnp.float32), P())


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of a context and its continuation, split as lm-evaluation-harness splits them:
  trailing spaces of the context move to the continuation, the pair is encoded as one string, and
  the continuation is what follows the context's own encoding. (Encoding the two halves
  separately would score token boundaries the model never saw in training.)"""
  spaces = len(context) - len(context.rstrip(" "))
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = list(tokenizer.encode(context + continuation))
  head = list(tokenizer.encode(context)) if context else []
  return whole[: len(head)], whole[len(head):]


@dataclasses.dataclass
class Counts:
  """Requests that had to be cut to fit the model's context (reported, never silent)."""
  truncated_contexts: int = 0
  truncated_prompts: int = 0


class Scorer:
  """A model with its params on a mesh, scoring in fixed-size batches."""

  def __init__(self, model, params, tokenizer, mesh, rules, batch_size: int = 16):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be at least 1")
    shards = math.prod(mesh.shape[a] for a in shd.BATCH_AXES if a in mesh.shape)
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.mesh, self.rules = mesh, tuple(rules)
    self.batch_size = -(-batch_size // shards) * shards  # rows split evenly over the mesh
    self.context = model.cfg.max_seq_len
    self.counts = Counts()

  @classmethod
  def from_run(cls, run, batch_size: int = 16) -> "Scorer":
    """From a llmjax.runs.LoadedRun."""
    return cls(run.model, run.params, run.tokenizer, run.mesh, shd.logical_rules(run.config),
               batch_size)

  # -- log-likelihood ------------------------------------------------------------------------------
  def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                    ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would produce exactly the
    continuation) for each (context ids, continuation ids). A pair longer than the context keeps
    its last max_seq_len + 1 tokens (the context's start is cut, as lm-evaluation-harness does).
    An empty context is allowed when the continuation has two or more tokens (its first token
    is then unscored: nothing precedes it)."""
    rows = []
    for context, continuation in requests:
      if not continuation:
        raise ValueError("a continuation needs at least one token")
      seq = list(context) + list(continuation)
      if len(seq) > self.context + 1:
        self.counts.truncated_contexts += 1
        seq = seq[-(self.context + 1):]
      scored = min(len(continuation), len(seq) - 1)
      if scored < 1:
        raise ValueError("a request with no context needs a continuation of two or more tokens")
      rows.append((seq, scored))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    # Longest first: rows of similar width share a batch, so little of it is padding.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start: start + self.batch_size]
      sums, greedy = self._score_batch([rows[i] for i in chunk])
      for i, s, g in zip(chunk, sums, greedy):
        out[i] = (float(s), bool(g))
    return out  # type: ignore[return-value]

  def _score_batch(self, rows):
    width = min(self.context, -(-max(len(seq) - 1 for seq, _ in rows) // WIDTH_BUCKET) * WIDTH_BUCKET)
    inputs = np.zeros((self.batch_size, width), np.int32)
    targets = np.zeros((self.batch_size, width), np.int32)
    weights = np.zeros((self.batch_size, width), np.float32)
    for r, (seq, scored) in enumerate(rows):
      n = len(seq) - 1
      inputs[r, :n], targets[r, :n] = seq[:-1], seq[1:]
      weights[r, n - scored: n] = 1.0
    place = lambda x: jax.device_put(x, shd.batch_sharding(self.mesh, x.ndim))
    with shd.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      sums, greedy = _score_rows(self.model, self.params, place(inputs), place(targets),
                                 place(weights))
    return np.asarray(sums)[: len(rows)], np.asarray(greedy)[: len(rows)]

  def rolling_requests(self, tokens: Sequence[int], prefix: int | None
                       ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """The (context, continuation) requests that score a whole token sequence of any length, and
    how many tokens they score: disjoint windows of the context, each predicting the next
    max_seq_len tokens given as much preceding text as fits. With a `prefix` token (EOS: how
    training separates documents) the first token is scored given it; without one the first
    token is not scored."""
    seq = ([prefix] if prefix is not None else []) + list(tokens)
    requests = []
    for a in range(1, len(seq), self.context):
      b = min(a + self.context, len(seq))
      requests.append((seq[max(0, b - 1 - self.context): a], seq[a:b]))
    return requests, max(len(seq) - 1, 0)

  def rolling_loglikelihood(self, tokens: Sequence[int], prefix: int | None) -> tuple[float, int]:
    """(sum of log-probs, number of tokens scored) of a whole sequence (see rolling_requests)."""
    requests, n = self.rolling_requests(tokens, prefix)
    return sum(ll for ll, _ in self.loglikelihood(requests)), n

  # -- classification ------------------------------------------------------------------------------
  def classify(self, examples: Sequence, seq_len: int) -> np.ndarray:
    """Label logits [len(examples), num_labels] of tokenized examples (llmjax.data.task_data's
    Tokenized), laid out one per row exactly as training lays them out (llmjax.data.packing)."""
    from llmjax.data import packing
    out = []
    for start in range(0, len(examples), self.batch_size):
      rows = [[i] for i in range(start, min(start + self.batch_size, len(examples)))]
      n = len(rows)
      rows += [[]] * (self.batch_size - n)  # empty rows: one compiled batch shape
      built = packing.build_rows(examples, rows, seq_len)
      place = lambda x: jax.device_put(np.asarray(x, np.int32), shd.batch_sharding(self.mesh, 2))
      with shd.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        logits = _classify_rows(self.model, self.params, place(built["inputs"]),
                                place(built["segment_ids"]), place(built["positions"]))
      out.append(np.asarray(logits)[:n])
    return np.concatenate(out) if out else np.zeros((0, self.model.cfg.num_labels), np.float32)

  # -- generation ----------------------------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop=(),
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               use_eos: bool = True) -> list[str]:
    """Each prompt's continuation as text, cut before the first stop string or EOS. Greedy by
    default; with a temperature, batch i draws with seed `seed + i` (so a given seed and
    batch_size reproduce the same text). Prompts too long for the context keep their end."""
    from llmjax import generate as gen
    from llmjax.sampling import Sampler
    sampler = Sampler(temperature, top_k, top_p)
    max_new_tokens = min(max_new_tokens, self.context)
    eos_id = self.tokenizer.eos_id if use_eos else None
    fitted = []
    for ids in prompts:
      ids = list(ids) or ([eos_id] if eos_id is not None else [])
      if not ids:
        raise ValueError("an empty prompt needs a tokenizer with an end-of-sequence token")
      kept = gen.fit_prompt(ids, self.context, max_new_tokens, truncate=True)
      self.counts.truncated_prompts += len(kept) < len(ids)
      fitted.append(kept)
    texts = []
    for b, start in enumerate(range(0, len(fitted), self.batch_size)):
      chunk = fitted[start: start + self.batch_size]
      padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # one compiled batch shape
      out = gen.generate(self.model, self.params, padded, max_new_tokens, sampler=sampler,
                         seed=seed + b, eos_id=eos_id, mesh=self.mesh, rules=self.rules)
      for ids in out.tokens[: len(chunk)]:
        stream = gen.TextStream(self.tokenizer, stop, eos_id)
        for t in ids:
          stream.add(t)
          if stream.stopped:
            break
        stream.finish()
        texts.append(stream.text)
    return texts

  def report_truncation(self, file=sys.stderr) -> None:
    c = self.counts
    if c.truncated_contexts:
      print(f"llmjax: note: {c.truncated_contexts} scored requests were longer than the context "
            f"of {self.context} tokens; their contexts were cut from the left", file=file)
    if c.truncated_prompts:
      print(f"llmjax: note: {c.truncated_prompts} prompts were cut from the left to fit the "
            f"context of {self.context} tokens with the requested max_new_tokens", file=file)
