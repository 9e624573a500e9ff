"""Source/target rows for encoder-decoders: {"source", "target"} pairs and T5 span corruption.

Every row has two sides, each with its own segment ids (0 = padding) and positions restarting per
example, so several short pairs can share a row (data.packing) without seeing each other:

    encoder_inputs, encoder_segment_ids, encoder_positions   [batch, source_len]
    inputs (decoder_start + target[:-1]), targets, weights,
    segment_ids, positions                                   [batch, seq_len]

source_len is data.source_len (0: data.seq_len). Targets end with the tokenizer's EOS (decoding
stops there); sources do too, as in T5. Batches are a pure function of (seed, split, step): the
training pairs are shuffled per epoch with a permutation drawn from (seed, epoch) and packed in
that order, so a resumed run sees exactly the rows the uninterrupted one would have.

Span corruption (T5's pretraining objective) turns plain text into such rows: of a window of
tokens, noise_density of them, in spans of mean length mean_span, are replaced in the source by
one sentinel each; the target lists each sentinel followed by the tokens it hid.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from llmjax.data import formats
from llmjax.data.sources import DataError

ENCODER_FIELDS = ("encoder_inputs", "encoder_segment_ids", "encoder_positions")
DECODER_FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions")


def batch_fields(data_config) -> dict[str, tuple[int, np.dtype]]:
  """{name: (length, dtype)} of every array of a seq2seq batch row."""
  src = source_len(data_config)
  out = {k: (src, np.int32) for k in ENCODER_FIELDS}
  out.update({k: (data_config.seq_len, np.int32) for k in DECODER_FIELDS})
  out["weights"] = (data_config.seq_len, np.float32)
  return out


def source_len(data_config) -> int:
  return int(data_config.get("source_len", 0) or data_config.seq_len)


def _with_eos(ids, eos_id: int) -> list[int]:
  ids = list(ids)
  return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def _fit(ids: list[int], limit: int, truncate: str, where: str, side: str):
  """The ids cut to `limit` (keeping the final EOS), None to drop, or a DataError."""
  if len(ids) <= limit:
    return ids
  if truncate == "drop":
    return None
  if truncate in ("none",):
    raise DataError(f"{where}: the {side} has {len(ids)} tokens, more than {limit}; raise "
                    f"data.{'source_len' if side == 'source' else 'seq_len'} or set "
                    "data.truncate='right' or 'drop'")
  if truncate == "left":
    return ids[len(ids) - limit:]
  return ids[: limit - 1] + ids[-1:]


def pack(pairs: list[tuple[list[int], list[int]]], src_len: int, tgt_len: int, packing: bool,
         start_id: int) -> dict[str, np.ndarray]:
  """Rows from (source ids, target ids) pairs in order: first fit into the current row while both
  sides have room (packing), else one pair per row."""
  rows: list[list[tuple[list[int], list[int]]]] = []
  used = (src_len + 1, tgt_len + 1)
  for src, tgt in pairs:
    if packing and rows and used[0] + len(src) <= src_len and used[1] + len(tgt) <= tgt_len:
      rows[-1].append((src, tgt))
      used = (used[0] + len(src), used[1] + len(tgt))
    else:
      rows.append([(src, tgt)])
      used = (len(src), len(tgt))
  n = len(rows)
  out = {k: np.zeros((n, src_len), np.int32) for k in ENCODER_FIELDS}
  out.update({k: np.zeros((n, tgt_len), np.int32) for k in DECODER_FIELDS})
  out["weights"] = np.zeros((n, tgt_len), np.float32)
  for r, row in enumerate(rows):
    s = t = 0
    for seg, (src, tgt) in enumerate(row, 1):
      out["encoder_inputs"][r, s:s + len(src)] = src
      out["encoder_segment_ids"][r, s:s + len(src)] = seg
      out["encoder_positions"][r, s:s + len(src)] = np.arange(len(src))
      out["inputs"][r, t:t + len(tgt)] = [start_id] + tgt[:-1]
      out["targets"][r, t:t + len(tgt)] = tgt
      out["weights"][r, t:t + len(tgt)] = 1.0
      out["segment_ids"][r, t:t + len(tgt)] = seg
      out["positions"][r, t:t + len(tgt)] = np.arange(len(tgt))
      s, t = s + len(src), t + len(tgt)
  return out


class _Rows:
  """Rows of one split as a pure function of the step (epoch-shuffled for training)."""

  def __init__(self, pairs, data_config, seed: int, split: int, shuffle: bool, start_id: int):
    if not pairs:
      raise DataError("no source/target pairs left after truncation; check data.truncate and "
                      "the lengths")
    self.pairs, self.seed, self.split, self.shuffle = pairs, seed, split, shuffle
    self.src_len, self.tgt_len = source_len(data_config), data_config.seq_len
    self.packing, self.start_id = bool(data_config.packing), start_id

  @functools.lru_cache(maxsize=4)
  def epoch(self, e: int) -> dict[str, np.ndarray]:
    order = np.arange(len(self.pairs))
    if self.shuffle:
      order = np.random.default_rng([self.seed, self.split, e]).permutation(len(self.pairs))
    return pack([self.pairs[i] for i in order], self.src_len, self.tgt_len, self.packing,
                 self.start_id)

  def rows_per_epoch(self) -> int:
    # Packing can give a different row count per epoch; the first epoch's count is the period
    # (each epoch's own rows are still all used: indices wrap within the epoch).
    return len(self.epoch(0)["inputs"])

  def take(self, first: int, count: int) -> dict[str, np.ndarray]:
    per = self.rows_per_epoch()
    parts = []
    for g in range(first, first + count):
      e, i = divmod(g, per)
      rows = self.epoch(e)
      parts.append({k: v[i % len(v)] for k, v in rows.items()})
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


@dataclasses.dataclass
class Seq2SeqDataset:
  """Batches of source/target rows (see module docstring). `train`/`val` hold the target tokens
  (for the loop's token counts)."""
  train_rows: _Rows
  val_rows: _Rows
  tokenizer: object
  train: np.ndarray
  val: np.ndarray

  def batch(self, split: str, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    rows = batch_size // process_count
    source = self.train_rows if split == "train" else self.val_rows
    return source.take(step * batch_size + process_index * rows, rows)

  def steps_for_epochs(self, epochs: int, batch_size: int) -> int:
    """train.steps for `epochs` passes over the training rows (train.epochs)."""
    return max(1, epochs * self.train_rows.rows_per_epoch() // batch_size)


def tokenize_pairs(examples, tokenizer, data_config) -> list[tuple[list[int], list[int]]]:
  eos = tokenizer.eos_id
  truncate = data_config.get("truncate", "right")
  src_len, tgt_len = source_len(data_config), data_config.seq_len
  pairs = []
  for ex in examples:
    src = _fit(_with_eos(tokenizer.encode(ex.source), eos), src_len, truncate, ex.where, "source")
    tgt = _fit(_with_eos(tokenizer.encode(ex.target), eos), tgt_len, truncate, ex.where, "target")
    if src is not None and tgt is not None:
      pairs.append((src, tgt))
  return pairs


def read_pairs(path: str, data_config):
  """The seq2seq examples of a task file; anything else is a one-line error."""
  found = formats.read_examples(path, data_config.get("format", "auto"))
  if found.format != "seq2seq":
    raise DataError(f"{path}: holds {found.format} examples, but this run trains an "
                    "encoder-decoder on {\"source\", \"target\"} pairs; give a seq2seq file")
  return found.examples


def load_seq2seq_dataset(config, tokenizer=None, start_id: int = 0) -> Seq2SeqDataset:
  """The run's pairs from data.path (and data.val_path, else a val_fraction split)."""
  from llmjax.data.tokenizers import build_tokenizer
  d = config.data
  if not d.path or not formats.is_task_path(d.path):
    raise DataError(f"data.path={d.path!r}: the seq2seq objective reads {{\"source\", "
                    "\"target\"} pairs from a .jsonl/.parquet file or a datasets directory")
  train_ex = read_pairs(d.path, d)
  val_ex = read_pairs(d.val_path, d) if d.val_path else None
  if val_ex is None:
    n_val = max(1, int(len(train_ex) * d.val_fraction))
    if len(train_ex) < 2:
      raise DataError(f"{d.path}: one example cannot be split into train and validation; add "
                      "examples or set data.val_path")
    train_ex, val_ex = train_ex[:-n_val], train_ex[-n_val:]
  if tokenizer is None:
    corpus = "\n".join(f"{e.source}\n{e.target}" for e in train_ex + val_ex)
    tokenizer = build_tokenizer(d, corpus_text=corpus)
  if tokenizer.eos_id is None:
    raise DataError(f"data.tokenizer={d.tokenizer!r} has no end-of-sequence token, which "
                    "seq2seq targets need to end (and decoding to stop); use "
                    "data.tokenizer='sentencepiece' or an HF tokenizer with an EOS")
  seed = config.train.seed
  train_pairs = tokenize_pairs(train_ex, tokenizer, d)
  val_pairs = tokenize_pairs(val_ex, tokenizer, d)
  flat = lambda pairs: np.asarray([t for _, tgt in pairs for t in tgt], np.int32)  # noqa: E731
  return Seq2SeqDataset(_Rows(train_pairs, d, seed, 0, True, start_id),
                        _Rows(val_pairs, d, seed, 1, False, start_id), tokenizer,
                        flat(train_pairs), flat(val_pairs))


# -- span corruption -------------------------------------------------------------------------------
def _segment(rng, total: int, parts: int) -> np.ndarray:
  """`total` items split into `parts` positive lengths uniformly at random (T5's
  _random_segmentation)."""
  cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
  return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def noise_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a window, as T5 rounds them."""
  noise = int(np.round(length * density))
  noise = min(max(noise, 1), length - 1)
  spans = max(int(np.round(noise / mean_span)), 1)
  return noise, spans


def span_corrupt(tokens: np.ndarray, rng, sentinels, density: float = 0.15,
                 mean_span: float = 3.0, eos_id: int | None = None):
  """(source ids, target ids) for one window of tokens: each noise span becomes one sentinel
  (sentinels[0], sentinels[1], ... in order) in the source; the target is each sentinel followed
  by the tokens it replaced; both end with eos_id when given."""
  n = len(tokens)
  noise, spans = noise_counts(n, density, mean_span)
  spans = min(spans, noise, n - noise)
  noise_lens = _segment(rng, noise, spans)
  keep_lens = _segment(rng, n - noise, spans)
  src, tgt, pos = [], [], 0
  for i in range(spans):  # kept run, then noise span (T5 always starts with kept tokens)
    src.extend(tokens[pos:pos + keep_lens[i]].tolist())
    pos += keep_lens[i]
    src.append(int(sentinels[i]))
    tgt.append(int(sentinels[i]))
    tgt.extend(tokens[pos:pos + noise_lens[i]].tolist())
    pos += noise_lens[i]
  if eos_id is not None:
    src.append(eos_id)
    tgt.append(eos_id)
  return src, tgt


def window_for(src_len: int, tgt_len: int, density: float, mean_span: float) -> int:
  """The longest raw window whose corrupted source and target (with EOS) fit the row lengths."""
  for n in range(src_len * 2, 1, -1):
    noise, spans = noise_counts(n, density, mean_span)
    if n - noise + spans + 1 <= src_len and noise + spans + 1 <= tgt_len:
      return n
  raise DataError(f"no window fits data.source_len={src_len} and data.seq_len={tgt_len} for span "
                  "corruption; raise them")


def sentinel_ids(tokenizer, vocab_size: int, count: int) -> list[int]:
  """T5's <extra_id_i> tokens when the tokenizer has them; else the top `count` ids of the model's
  vocabulary, which must lie above the tokenizer's (set model.vocab_size)."""
  lookup = getattr(tokenizer, "token_id", None)  # HFTokenizer: a piece's id or None
  if lookup is not None:
    ids = [lookup(f"<extra_id_{i}>") for i in range(count)]
    if all(i is not None for i in ids):
      return ids
  ids = [vocab_size - 1 - i for i in range(count)]
  if ids[-1] < tokenizer.vocab_size:
    raise DataError(f"span corruption needs {count} sentinel ids above the tokenizer's "
                    f"{tokenizer.vocab_size} tokens: set model.vocab_size >= "
                    f"{tokenizer.vocab_size + count} (or use a tokenizer with <extra_id_N> tokens)")
  return ids


@dataclasses.dataclass
class SpanCorruptionDataset:
  """Span-corrupted windows of a token dataset, as seq2seq rows (one window per row)."""
  tokens: object          # a TokenDataset (train/val token arrays)
  sentinels: list
  data_config: object
  seed: int
  density: float
  mean_span: float
  start_id: int = 0

  def __post_init__(self):
    self.tokenizer = self.tokens.tokenizer
    self.train, self.val = self.tokens.train, self.tokens.val
    self.src_len, self.tgt_len = source_len(self.data_config), self.data_config.seq_len
    self.window = window_for(self.src_len, self.tgt_len, self.density, self.mean_span)
    noise, spans = noise_counts(self.window, self.density, self.mean_span)
    if spans > len(self.sentinels):
      raise DataError(f"a window of {self.window} tokens has {spans} noise spans but only "
                      f"{len(self.sentinels)} sentinels; raise train.span_sentinels")
    for split, arr in (("train", self.train), ("val", self.val)):
      if len(arr) < self.window + 1:
        raise DataError(f"the {split} split has {len(arr)} tokens, fewer than the span-corruption "
                        f"window of {self.window}; use more text or shorter rows")

  def batch(self, split: str, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    rows = batch_size // process_count
    tokens = getattr(self, split)
    rng = np.random.default_rng([self.seed, 1 if split == "val" else 0, step])
    starts = rng.integers(0, len(tokens) - self.window, size=batch_size)
    pairs = []
    for r in range(process_index * rows, (process_index + 1) * rows):
      row_rng = np.random.default_rng([self.seed, 1 if split == "val" else 0, step, r, 1])
      window = np.asarray(tokens[starts[r]:starts[r] + self.window])
      pairs.append(span_corrupt(window, row_rng, self.sentinels, self.density, self.mean_span,
                                self.tokenizer.eos_id))
    return pack(pairs, self.src_len, self.tgt_len, False, self.start_id)
