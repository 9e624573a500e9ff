"""Task datasets: examples -> tokens with explicit per-token loss weights -> rows -> batches.

Loss weights are an array carried with the batch (never a sentinel token value). data.train_on:
  completion  the completion (prompt/completion) or every assistant turn (chat), including the
              EOS / end-of-turn tokens that close it, and nothing of the prompt (default)
  all         every token
  last_turn   the last assistant turn only (= completion for prompt/completion data)
Plain {"text"} examples train on every token. An example with no trainable token is dropped and
counted; if every example is, loading fails naming the first. Over-long examples are cut
(data.truncate=right|left), dropped ('drop') or rejected ('none': one line naming the first).

Batches are a pure function of (seed, split, step): epoch e shuffles the training examples with a
permutation drawn from (seed, e), packs them into rows (llmjax.data.packing), and the row stream
runs through the epochs one after another, so step s holds rows [s*B, (s+1)*B) of that stream.
Resuming at any step, mid-epoch too, rebuilds exactly the same batch; each process materializes
only its own rows. Validation rows are in file order, once; rows past the end are empty (weight 0).

Classification datasets (objective `classification`) give one example per row and labels [batch]
(int32 ids, -1 on empty rows) with label_weights [batch]; string labels map to ids in sorted order
(numeric labels numerically), and the mapping is saved with the run (labels.json).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from llmjax.data import formats as fm
from llmjax.data import packing
from llmjax.data.chat import ChatFormatter, encode_plain
from llmjax.data.sources import DataError

LABELS_FILE = "labels.json"
SPLITS = {"train": 0, "val": 1}


@dataclasses.dataclass
class Tokenized:
  tokens: np.ndarray          # int32 [L]
  weights: np.ndarray         # float32 [L]: weights[j] = weight of predicting tokens[j]
  source: str = ""
  label: int = -1             # classification: the label id


@dataclasses.dataclass
class EncodeStats:
  examples: int = 0
  truncated: int = 0
  dropped_long: int = 0
  dropped_untrained: int = 0
  first_untrained: str = ""

  def describe(self, split: str) -> str:
    kept = self.examples - self.dropped_long - self.dropped_untrained
    return (f"{split}: {kept:,} of {self.examples:,} examples kept ({self.truncated:,} truncated, "
            f"{self.dropped_long:,} dropped as too long, {self.dropped_untrained:,} dropped with "
            "no trainable token)")


def bos_prefix(tokenizer) -> list[int]:
  """The ids the tokenizer puts before any text by itself (e.g. Llama's BOS), found by encoding."""
  full, plain = tokenizer.encode("a"), encode_plain(tokenizer, "a")
  for k in range(len(full) - len(plain) + 1):
    if full[k:k + len(plain)] == plain:
      return [int(i) for i in full[:k]]
  return []


class Encoder:
  """Turns typed examples into Tokenized sequences under data.train_on / data.truncate."""

  def __init__(self, tokenizer, data_config, classification: bool = False):
    self.tokenizer = tokenizer
    self.train_on = data_config.train_on
    self.truncate = data_config.truncate
    self.max_tokens = data_config.seq_len + 1  # L tokens fill L-1 positions
    self.classification = classification
    self.bos = bos_prefix(tokenizer)
    self.eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    self._chat = None

  @property
  def chat(self) -> ChatFormatter:
    if self._chat is None:
      self._chat = ChatFormatter(self.tokenizer)
    return self._chat

  def _enc(self, text: str) -> list[int]:
    return encode_plain(self.tokenizer, text)

  def pieces(self, ex) -> list[tuple[list[int], float]]:
    """(token ids, weight) pieces of an example, before truncation."""
    all_on = self.train_on == "all"
    if isinstance(ex, fm.TextExample):
      return [(self.bos, 0.0), (self._enc(ex.text) + self.eos, 1.0)]
    if isinstance(ex, fm.PromptCompletion):
      return [(self.bos + self._enc(ex.prompt), 1.0 if all_on else 0.0),
              (self._enc(ex.completion) + self.eos, 1.0)]
    if isinstance(ex, fm.MultipleChoiceExample):  # trained as prompt -> the right choice
      return [(self.bos + self._enc(ex.prompt), 1.0 if all_on else 0.0),
              (self._enc(ex.choices[ex.answer]) + self.eos, 1.0)]
    if isinstance(ex, fm.ChatExample):
      text, spans = self.chat.assistant_spans(ex.messages, ex.source)
      last_turn = max((s[2] for s in spans), default=-1)
      out, pos = [], 0
      for start, end, turn in spans:
        out.append((self._enc(text[pos:start]), 1.0 if all_on else 0.0))
        on = all_on or self.train_on == "completion" or turn == last_turn
        out.append((self._enc(text[start:end]), 1.0 if on else 0.0))
        pos = end
      out.append((self._enc(text[pos:]), 1.0 if all_on else 0.0))
      return out
    if isinstance(ex, fm.ClassificationExample):
      return [(self.bos + self._enc(ex.text), 0.0)]
    raise DataError(f"{getattr(ex, 'source', '?')}: {type(ex).__name__} examples cannot be "
                    "trained with this objective")

  def encode(self, ex, stats: EncodeStats, label: int = -1) -> Tokenized | None:
    stats.examples += 1
    pieces = self.pieces(ex)
    tokens = np.asarray([t for ids, _ in pieces for t in ids], np.int32)
    weights = np.asarray([w for ids, w in pieces for _ in ids], np.float32)
    if len(tokens) > self.max_tokens:
      if self.truncate == "none":
        raise DataError(f"{ex.source}: the example has {len(tokens)} tokens, more than "
                        f"data.seq_len+1={self.max_tokens}; raise data.seq_len or set "
                        "data.truncate=right|left|drop")
      if self.truncate == "drop":
        stats.dropped_long += 1
        return None
      stats.truncated += 1
      keep = slice(None, self.max_tokens) if self.truncate == "right" else slice(-self.max_tokens, None)
      tokens, weights = tokens[keep], weights[keep]
    if self.classification:
      if len(tokens) == 0:
        stats.dropped_untrained += 1
        stats.first_untrained = stats.first_untrained or ex.source
        return None
      return Tokenized(tokens, np.zeros_like(weights), ex.source, label)
    if len(tokens) < 2 or weights[1:].sum() <= 0:
      stats.dropped_untrained += 1
      stats.first_untrained = stats.first_untrained or ex.source
      return None
    return Tokenized(tokens, weights, ex.source)


def label_ids(labels) -> dict[str, int]:
  """Sorted label strings -> ids (numerically when every label is an integer)."""
  unique = set(labels)
  numeric = all(s.lstrip("-").isdigit() for s in unique)
  ordered = sorted(unique, key=(lambda s: int(s)) if numeric else None)
  return {s: i for i, s in enumerate(ordered)}


def _encode_split(encoder, examples, split: str, labels: dict | None) -> tuple[list, EncodeStats]:
  stats = EncodeStats()
  out = []
  for ex in examples:
    label = -1
    if labels is not None:
      if not isinstance(ex, fm.ClassificationExample):
        raise DataError(f"{ex.source}: train.objective=classification needs {{\"text\", "
                        "\"label\"}} examples")
      if ex.label not in labels:
        raise DataError(f"{ex.source}: label {ex.label!r} never occurs in the training data "
                        f"(labels: {', '.join(labels)}); fix the example or add training examples")
      label = labels[ex.label]
    item = encoder.encode(ex, stats, label)
    if item is not None:
      out.append(item)
  if not out:
    first = stats.first_untrained or (examples[0].source if examples else split)
    raise DataError(f"{first}: no {split} example has a trainable token after data.truncate="
                    f"{encoder.truncate} / data.train_on={encoder.train_on} (this is the first "
                    "such example); check the data, data.train_on or data.seq_len")
  return out, stats


class TaskDataset:
  """The dataset interface of llmjax.data (batch(split, step, ...), tokenizer, train, val)."""

  def __init__(self, train: list, val: list, tokenizer, seq_len: int, seed: int, pack: bool,
               stats: dict, labels: dict | None = None, format: str = ""):
    self.examples = {"train": train, "val": val}
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.seed = seed
    self.pack = pack and labels is None  # classification: one example per row
    self.stats = stats
    self.labels = labels
    self.format = format
    self.lengths = {k: np.asarray([len(e.tokens) - 1 for e in v], np.int64)
                    for k, v in self.examples.items()}
    self._epoch_rows: dict[int, list] = {}
    self._val_rows = packing.assign_rows(self.lengths["val"], np.arange(len(val)), seq_len, self.pack)
    # token arrays, for logging and bits-per-byte estimates (the TokenDataset attributes)
    self.train = np.concatenate([e.tokens for e in train])
    self.val = np.concatenate([e.tokens for e in val])

  @property
  def num_labels(self) -> int:
    return len(self.labels) if self.labels else 0

  # -- epochs ----------------------------------------------------------------------------------
  def epoch_rows(self, epoch: int) -> list:
    """Rows of training epoch `epoch`: a permutation from (seed, epoch), then packing."""
    if epoch not in self._epoch_rows:
      order = np.random.default_rng([self.seed, SPLITS["train"], epoch]).permutation(
          len(self.examples["train"]))
      if len(self._epoch_rows) > 4:
        self._epoch_rows.pop(next(iter(self._epoch_rows)))
      self._epoch_rows[epoch] = packing.assign_rows(self.lengths["train"], order, self.seq_len,
                                                    self.pack)
    return self._epoch_rows[epoch]

  def rows_per_epoch(self, epoch: int = 0) -> int:
    return len(self.epoch_rows(epoch))

  def steps_for_epochs(self, epochs: int, batch_size: int) -> int:
    """Steps that cover `epochs` full passes (the last batch may start the next epoch)."""
    rows = sum(self.rows_per_epoch(e) for e in range(epochs))
    return max(-(-rows // batch_size), 1)

  def _train_rows(self, start: int, count: int) -> list:
    """Rows [start, start+count) of the endless stream epoch 0, epoch 1, ..."""
    out, epoch, offset = [], 0, start
    while True:
      n = self.rows_per_epoch(epoch)
      if offset < n:
        break
      offset -= n
      epoch += 1
    while len(out) < count:
      rows = self.epoch_rows(epoch)
      take = rows[offset:offset + count - len(out)]
      out += take
      offset = 0
      epoch += 1
    return out

  def epoch_of(self, step: int, batch_size: int) -> float:
    """Fractional epoch reached after `step` steps (for logs)."""
    rows, epoch = step * batch_size, 0
    while rows >= self.rows_per_epoch(epoch):
      rows -= self.rows_per_epoch(epoch)
      epoch += 1
    return epoch + rows / self.rows_per_epoch(epoch)

  # -- batches ---------------------------------------------------------------------------------
  def num_batches(self, split: str, batch_size: int) -> int:
    """Batches that hold the whole split once (validation)."""
    rows = len(self._val_rows) if split == "val" else self.rows_per_epoch(0)
    return max(-(-rows // batch_size), 1)

  def batch(self, split: str, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    per = batch_size // process_count
    first = step * batch_size + process_index * per
    if split == "train":
      rows = self._train_rows(first, per)
    else:
      rows = [self._val_rows[i] if i < len(self._val_rows) else [] for i in range(first, first + per)]
    examples = self.examples[split]
    out = packing.build_rows(examples, rows, self.seq_len)
    if self.labels is not None:
      labels = np.asarray([examples[r[0]].label if r else -1 for r in rows], np.int32)
      return {"inputs": out["inputs"], "segment_ids": out["segment_ids"],
              "positions": out["positions"], "labels": labels,
              "label_weights": (labels >= 0).astype(np.float32)}
    return out

  def efficiency(self) -> float:
    return packing.efficiency(self.lengths["train"], self.epoch_rows(0), self.seq_len)

  def summary(self) -> str:
    mode = "packed" if self.pack else "one example per row"
    parts = [f"{self.format} examples, {len(self.examples['train']):,} train / "
             f"{len(self.examples['val']):,} val; {self.rows_per_epoch(0):,} rows per epoch "
             f"({mode}), packing efficiency {self.efficiency():.1%}"]
    parts += [s.describe(k) for k, s in self.stats.items()]
    if self.labels:
      parts.append(f"{len(self.labels)} labels: {', '.join(self.labels)}")
    return "; ".join(parts)

  def save(self, directory) -> None:
    """Writes what a run needs to reuse this data's meaning (the label mapping), atomically."""
    if self.labels is None:
      return
    path = Path(directory) / LABELS_FILE
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"labels": list(self.labels)}, indent=2))
    os.replace(tmp, path)


def read_labels(directory) -> dict | None:
  path = Path(directory) / LABELS_FILE
  if not path.exists():
    return None
  return {s: i for i, s in enumerate(json.loads(path.read_text())["labels"])}


def _split_off(examples: list, fraction: float, seed: int):
  order = np.random.default_rng([seed, 7]).permutation(len(examples))
  n_val = max(int(len(examples) * fraction), 1)
  if len(examples) < 2:
    raise DataError(f"{examples[0].source}: one example cannot be split into train and val; "
                    "add examples or set data.val_path")
  val = set(order[:n_val].tolist())
  return ([e for i, e in enumerate(examples) if i not in val],
          [e for i, e in enumerate(examples) if i in val])


def load_task_dataset(data_config, seed: int, tokenizer=None, classification: bool = False,
                      labels: dict | None = None) -> TaskDataset:
  """Reads data.path (and data.val_path, or splits off data.val_fraction), builds the tokenizer if
  none is given (from the examples' text), and encodes everything up front."""
  train_set = fm.read_examples(data_config.path, data_config.format)
  if data_config.val_path:
    val_set = fm.read_examples(data_config.val_path, data_config.format)
    if val_set.format != train_set.format:
      raise DataError(f"data.val_path={data_config.val_path} holds {val_set.format} examples but "
                      f"data.path holds {train_set.format}; use the same format")
    train_ex, val_ex = train_set.examples, val_set.examples
  else:
    train_ex, val_ex = _split_off(train_set.examples, data_config.val_fraction, seed)
  if tokenizer is None:
    from llmjax.data.tokenizers import build_tokenizer
    tokenizer = build_tokenizer(data_config, corpus_text=_corpus_text(train_ex + val_ex))
  if classification:
    if train_set.format != "classification":
      raise DataError(f"{data_config.path}: train.objective=classification needs "
                      f"{{\"text\", \"label\"}} examples, got {train_set.format}")
    if labels is None:
      labels = label_ids([e.label for e in train_ex])
  encoder = Encoder(tokenizer, data_config, classification=classification)
  train, train_stats = _encode_split(encoder, train_ex, "train", labels if classification else None)
  val, val_stats = _encode_split(encoder, val_ex, "val", labels if classification else None)
  return TaskDataset(train, val, tokenizer, data_config.seq_len, seed, data_config.packing,
                     {"train": train_stats, "val": val_stats},
                     labels if classification else None, train_set.format)


def _corpus_text(examples) -> str:
  """Every string of the examples plus the default chat template's words (char vocabularies)."""
  parts = ["User: Assistant: Tool: \n"]
  for ex in examples:
    for field in dataclasses.fields(ex):
      value = getattr(ex, field.name)
      if field.name == "source":
        continue
      if isinstance(value, str):
        parts.append(value)
      elif isinstance(value, tuple):
        parts += [v if isinstance(v, str) else " ".join(v) for v in value]
  return "\n".join(parts)
