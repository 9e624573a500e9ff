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


def text_documents(pattern: str) -> list[str]:
  """Each file matching `pattern` (a path or glob) is one document."""
  paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  paths = [p for p in paths if os.path.isfile(p)]
  if not paths:
    raise DataError(f"data.path={pattern!r} matches no file; give an existing text file or glob")
  docs = []
  for p in paths:
    try:
      docs.append(Path(p).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
      raise DataError(f"{p} is not UTF-8 text; convert it, or pretokenize it to a .bin/.npy "
                      "token array") from None
  if not any(docs):
    raise DataError(f"data.path={pattern!r}: every matching file is empty")
  return docs


def is_token_file(path: str) -> bool:
  return path.endswith(TOKEN_SUFFIXES)


def open_token_file(path: str, dtype: str = "uint16") -> np.ndarray:
  """A memory-mapped 1-D token array: corpora larger than RAM are read one window at a time."""
  if not os.path.isfile(path):
    raise DataError(f"token file {path!r} does not exist")
  if path.endswith(".npy"):
    tokens = np.load(path, mmap_mode="r")
  else:
    if os.path.getsize(path) == 0:
      raise DataError(f"token file {path!r} is empty")
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
  if tokens.ndim != 1 or tokens.size == 0:
    raise DataError(f"token file {path!r} must hold a non-empty 1-D array, got shape {tokens.shape}")
  return tokens


def write_token_file(path: str, tokens: np.ndarray, dtype: str = "uint16") -> None:
  """Writes a raw token array (nanoGPT's train.bin format) atomically."""
  tmp = f"{path}.tmp{os.getpid()}"
  np.asarray(tokens).astype(np.dtype(dtype)).tofile(tmp)
  os.replace(tmp, path)
