"""Token datasets and batches that are a pure function of (seed, split, step).

A batch never depends on what was drawn before it, so a resumed run sees exactly the batches the
uninterrupted run would have seen, the iterator's whole state is the step number, and each process
materializes only its own rows of the global batch (multi-host input).
"""
from __future__ import annotations

import dataclasses
import glob
import zlib

import numpy as np

from llmjax.data import shards, sources
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
  vocab_size: int | None = None  # set for token files: every batch is checked against it
  max_token_id: int | None = None  # known for prepared corpora: checked against the model's vocab

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
    window = read_windows(getattr(self, split), starts, self.seq_len + 1)
    if self.vocab_size is not None and window.size and (
        window.max() >= self.vocab_size or window.min() < 0):
      bad = int(window.max()) if window.max() >= self.vocab_size else int(window.min())
      raise sources.DataError(
          f"the {split} tokens hold id {bad} (batch {step}), outside the tokenizer's vocabulary of "
          f"{self.vocab_size} ids: the token file was written with another tokenizer; use the "
          "tokenizer it was made with")
    return rows_from_windows(window, self.eos_id)


def read_windows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
  """[len(starts), length] int32 token windows; sharded corpora read only these bytes."""
  if hasattr(tokens, "windows"):
    return tokens.windows(starts, length)
  return np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int32)


def rows_from_windows(window: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray]:
  out = {"inputs": window[:, :-1], "targets": window[:, 1:]}
  if eos_id is not None:
    out.update(packed_segments(out["inputs"], eos_id))
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


def _encode_documents(tokenizer, docs: list[str], field: str = "data.path") -> np.ndarray:
  """Concatenates documents, separated by EOS when the tokenizer has one, else by a blank line."""
  try:
    return _encode(tokenizer, docs)
  except ValueError as e:  # a character outside a restored char vocabulary
    raise sources.DataError(
        f"{field}: {e}; this run's tokenizer cannot encode the corpus: use the corpus it was "
        "built from, or start a new run (new --workdir) on this one") from None


def _encode(tokenizer, docs: list[str]) -> np.ndarray:
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
  # -- prepared corpora and mixtures (llmjax.data.prepare): memory-mapped shards --
  if data_config.get("mixture", ""):
    from llmjax.data import mixture
    return mixture.load_mixture(data_config, seed, tokenizer)
  if shards.is_prepared_dir(path):
    return load_prepared(path, data_config, seed, tokenizer)
  from llmjax.data import formats
  if formats.is_task_path(path):
    from llmjax.data.task_data import load_task_dataset
    return load_task_dataset(data_config, seed, tokenizer, **task_options)
  vocab_check = None
  if path and sources.is_token_file(path):
    if tokenizer is None and data_config.tokenizer == "char":
      raise sources.DataError(
          f"data.path={path!r} is a token file, but data.tokenizer='char' builds its vocabulary "
          "from text; use the tokenizer the file was written with (data.tokenizer='byte', "
          "'sentencepiece' with data.tokenizer_path, or 'hf'), or give a text corpus")
    if tokenizer is None:
      tokenizer = build_tokenizer(data_config, corpus_text=None)
    tokens = (shards.open_token_glob(path, data_config.token_dtype) if glob.has_magic(path)
              else sources.open_token_file(path, data_config.token_dtype))
    sources.check_token_ids(tokens, tokenizer.vocab_size, path)
    vocab_check = tokenizer.vocab_size
    if data_config.val_path:
      val = sources.open_token_file(data_config.val_path, data_config.token_dtype,
                                    field="data.val_path")
      sources.check_token_ids(val, tokenizer.vocab_size, data_config.val_path, "data.val_path")
      train = tokens
    else:
      train, val = _split_tokens(tokens, data_config.val_fraction)
  else:
    docs = sources.text_documents(path) if path else sources.embedded_documents()
    val_docs = (sources.text_documents(data_config.val_path, field="data.val_path")
                if data_config.val_path else None)
    if tokenizer is None:
      tokenizer = build_tokenizer(data_config, corpus_text="\n\n".join(docs + (val_docs or [])))
    tokens = _encode_documents(tokenizer, docs, f"data.path={path!r}" if path else "the corpus")
    if val_docs is not None:
      train, val = tokens, _encode_documents(tokenizer, val_docs,
                                             f"data.val_path={data_config.val_path!r}")
    else:
      train, val = _split_tokens(tokens, data_config.val_fraction)
  eos = tokenizer.eos_id if data_config.packing else None
  if data_config.packing and eos is None:
    raise sources.DataError(f"data.packing=True needs a tokenizer with an end-of-document token; "
                            f"'{tokenizer.kind}' has none (use data.tokenizer='sentencepiece')")
  return TokenDataset(train=train, val=val, tokenizer=tokenizer, seq_len=data_config.seq_len,
                      seed=seed, eos_id=eos, vocab_size=vocab_check)


def load_prepared(path: str, data_config, seed: int, tokenizer=None) -> TokenDataset:
  """A directory written by `python -m llmjax.data.prepare`: only the manifest is read here."""
  manifest = shards.read_manifest(path)
  tokenizer = shards.run_tokenizer(path, manifest, data_config, tokenizer)
  eos = tokenizer.eos_id if data_config.packing else None
  if data_config.packing and eos is None:
    raise sources.DataError(f"data.packing=True needs a tokenizer with an end-of-document token; "
                            f"{path} was prepared with '{tokenizer.kind}', which has none")
  return TokenDataset(train=shards.open_split(path, manifest, "train"),
                      val=shards.open_split(path, manifest, "val"), tokenizer=tokenizer,
                      seq_len=data_config.seq_len, seed=seed, eos_id=eos,
                      max_token_id=manifest["max_token_id"])


def corpus_fingerprint(dataset: TokenDataset) -> int:
  """A cheap checksum of the token arrays' heads and sizes (to spot a changed corpus on resume)."""
  h = zlib.crc32(np.asarray(dataset.train[:4096]).tobytes())
  return zlib.crc32(np.asarray([len(dataset.train), len(dataset.val)]).tobytes(), h)
