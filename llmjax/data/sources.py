"""Where tokens come from: the embedded corpus, text files or globs, or pretokenized arrays on disk."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

TOKEN_SUFFIXES = (".bin", ".npy")


class DataError(ValueError):
  """A missing, empty or unreadable corpus: reported as one line by main."""


def embedded_documents() -> list[str]:
  """The prose of Python's documentation topics (~465 KB of English), shipped with every Python.

  It needs no network and no download, so the default job works on any fresh machine.
  """
  from pydoc_data.topics import topics
  return [topics[name] for name in sorted(topics)]


def text_documents(pattern: str, field: str = "data.path") -> list[str]:
  """Each file matching `pattern` (a path or glob) is one document. `field` names the config
  field in errors."""
  paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  paths = [p for p in paths if os.path.isfile(p)]
  if not paths:
    raise DataError(f"{field}={pattern!r} matches no file; give an existing text file or glob")
  docs = []
  for p in paths:
    try:
      docs.append(Path(p).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
      raise DataError(f"{p} is not UTF-8 text; convert it, or pretokenize it to a .bin/.npy "
                      "token array") from None
  if not any(docs):
    raise DataError(f"{field}={pattern!r}: every matching file is empty")
  return docs


def is_token_file(path: str) -> bool:
  return path.endswith(TOKEN_SUFFIXES)


def open_token_file(path: str, dtype: str = "uint16", field: str = "data.path") -> np.ndarray:
  """A memory-mapped 1-D token array: corpora larger than RAM are read one window at a time."""
  if not os.path.isfile(path):
    raise DataError(f"{field}={path!r}: token file does not exist")
  if path.endswith(".npy"):
    try:
      tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
      raise DataError(f"{field}={path!r} is not a readable .npy array ({e}); rewrite it with "
                      "numpy.save") from None
  else:
    size, itemsize = os.path.getsize(path), np.dtype(dtype).itemsize
    if size == 0:
      raise DataError(f"token file {path!r} is empty")
    if size % itemsize:
      raise DataError(f"{field}={path!r} has {size} bytes, not a multiple of {itemsize} "
                      f"(data.token_dtype={dtype!r}): the file is truncated or has another "
                      "dtype; set data.token_dtype to the dtype it was written with")
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
  if tokens.ndim != 1 or tokens.size == 0:
    raise DataError(f"token file {path!r} must hold a non-empty 1-D array, got shape {tokens.shape}")
  return tokens


# Token files up to this many tokens are scanned whole for their largest id (about a second per
# GB); beyond it, SAMPLE_CHUNKS evenly spaced chunks are (and every batch is checked as it is cut).
FULL_SCAN_TOKENS = 1 << 28
SAMPLE_CHUNKS, CHUNK = 64, 1 << 20


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str, field: str = "data.path"):
  """Refuses a token array holding ids outside [0, vocab_size) (a .bin written with another
  tokenizer would train on garbage and NaN losses). Whole for moderate files, sampled for huge
  ones; `TokenDataset.batch` checks every batch it cuts, so nothing out of range ever trains."""
  n = len(tokens)
  if n <= FULL_SCAN_TOKENS:
    spans = [(i, min(i + (1 << 24), n)) for i in range(0, n, 1 << 24)]
  else:
    starts = np.linspace(0, n - CHUNK, SAMPLE_CHUNKS).astype(np.int64)
    spans = [(int(s), int(s) + CHUNK) for s in starts]
  hi, lo = -1, 0
  for a, b in spans:
    chunk = np.asarray(tokens[a:b])
    hi, lo = max(hi, int(chunk.max())), min(lo, int(chunk.min()))
  if hi >= vocab_size or lo < 0:
    bad = hi if hi >= vocab_size else lo
    raise DataError(f"{field}={path!r} holds token id {bad}, outside the tokenizer's vocabulary "
                    f"of {vocab_size} ids: it was written with another tokenizer (or "
                    "data.token_dtype is wrong); use the tokenizer it was made with")


def write_token_file(path: str, tokens: np.ndarray, dtype: str = "uint16") -> None:
  """Writes a raw token array (nanoGPT's train.bin format) atomically."""
  tmp = f"{path}.tmp{os.getpid()}"
  np.asarray(tokens).astype(np.dtype(dtype)).tofile(tmp)
  os.replace(tmp, path)
