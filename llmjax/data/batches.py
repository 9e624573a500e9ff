"""Token datasets and batches that are a pure function of (seed, split, step).

A batch never depends on what was drawn before it, so a resumed run sees exactly the batches the
uninterrupted run would have seen, the iterator's whole state is the step number, and each process
materializes only its own rows of the global batch (multi-host input).
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from llmjax.data import sources
from llmjax.data.tokenizers import build_tokenizer

SPLITS = {"train": 0, "val": 1}


@dataclasses.dataclass
class TokenDataset:
  train: np.ndarray          # 1-D token arrays (in memory or memory-mapped)
  val: np.ndarray
  tokenizer: object
  seq_len: int
  seed: int = 0
  eos_id: int | None = None  # set when packing: segment ids restart after each EOS

  def __post_init__(self):
    for split, tokens in (("train", self.train), ("val", self.val)):
      if len(tokens) < self.seq_len + 2:
        raise sources.DataError(
            f"the {split} split has {len(tokens)} tokens, fewer than data.seq_len+2="
            f"{self.seq_len + 2}; use a larger corpus or a shorter data.seq_len")

  def window_starts(self, split: str, step: int, batch_size: int) -> np.ndarray:
    tokens = getattr(self, split)
    rng = np.random.default_rng([self.seed, SPLITS[split], step])
    return rng.integers(0, len(tokens) - self.seq_len - 1, size=batch_size)

  def batch(self, split: str, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of global batch `step`, where this process owns rows lo..hi.

    Returns int32 arrays: inputs and targets [rows, seq_len] (targets are inputs shifted by one),
    plus segment_ids and positions when packing documents.
    """
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    rows = batch_size // process_count
    starts = self.window_starts(split, step, batch_size)[process_index * rows:(process_index + 1) * rows]
    tokens = getattr(self, split)
    window = np.asarray(tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int32)
    out = {"inputs": window[:, :-1], "targets": window[:, 1:]}
    if self.eos_id is not None:
      out.update(packed_segments(out["inputs"], self.eos_id))
    return out


def packed_segments(inputs: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """Segment ids (a new document starts after each EOS) and positions that restart with them."""
  is_eos = inputs == eos_id
  starts = np.zeros_like(is_eos)
  starts[:, 1:] = is_eos[:, :-1]
  segment_ids = np.cumsum(starts, axis=1).astype(np.int32) + 1
  idx = np.arange(inputs.shape[1])
  last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  positions = (idx - last_start).astype(np.int32)
  return {"segment_ids": segment_ids, "positions": positions}


def _split_tokens(tokens: np.ndarray, val_fraction: float):
  n_val = max(int(len(tokens) * val_fraction), 1)
  return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def _encode_documents(tokenizer, docs: list[str]) -> np.ndarray:
  """Concatenates documents, separated by EOS when the tokenizer has one, else by a blank line."""
  if tokenizer.eos_id is not None:
    parts = []
    for doc in docs:
      parts.append(tokenizer.encode_array(doc))
      parts.append(np.asarray([tokenizer.eos_id], np.int32))
    return np.concatenate(parts)
  return tokenizer.encode_array("\n\n".join(docs))


def load_dataset(data_config, seed: int, tokenizer=None, **task_options):
  """Builds the tokenizer (unless given, e.g. restored from a run) and the train/val token arrays;
  task files (JSON Lines, Parquet, HF datasets dirs) give a TaskDataset instead (task_options:
  see llmjax.data.task_data.load_task_dataset, e.g. classification=True, labels=...)."""
  path = data_config.path
  from llmjax.data import formats
  if formats.is_task_path(path):
    from llmjax.data.task_data import load_task_dataset
    return load_task_dataset(data_config, seed, tokenizer, **task_options)
  if path and sources.is_token_file(path):
    if tokenizer is None:
      tokenizer = build_tokenizer(data_config, corpus_text=None)
    tokens = sources.open_token_file(path, data_config.token_dtype)
    if data_config.val_path:
      train, val = tokens, sources.open_token_file(data_config.val_path, data_config.token_dtype)
    else:
      train, val = _split_tokens(tokens, data_config.val_fraction)
  else:
    docs = sources.text_documents(path) if path else sources.embedded_documents()
    val_docs = sources.text_documents(data_config.val_path) if data_config.val_path else None
    if tokenizer is None:
      tokenizer = build_tokenizer(data_config, corpus_text="\n\n".join(docs + (val_docs or [])))
    tokens = _encode_documents(tokenizer, docs)
    if val_docs is not None:
      train, val = tokens, _encode_documents(tokenizer, val_docs)
    else:
      train, val = _split_tokens(tokens, data_config.val_fraction)
  eos = tokenizer.eos_id if data_config.packing else None
  if data_config.packing and eos is None:
    raise sources.DataError(f"data.packing=True needs a tokenizer with an end-of-document token; "
                            f"'{tokenizer.kind}' has none (use data.tokenizer='sentencepiece')")
  return TokenDataset(train=train, val=val, tokenizer=tokenizer, seq_len=data_config.seq_len,
                      seed=seed, eos_id=eos)


def corpus_fingerprint(dataset: TokenDataset) -> int:
  """A cheap checksum of the token arrays' heads and sizes (to spot a changed corpus on resume)."""
  h = zlib.crc32(np.asarray(dataset.train[:4096]).tobytes())
  return zlib.crc32(np.asarray([len(dataset.train), len(dataset.val)]).tobytes(), h)
