"""Prepared token directories (written by `python -m llmjax.data.prepare`) and globs of token files,
read as one virtual 1-D token array over memory-mapped shards.

A prepared directory holds manifest.json, the tokenizer (tokenizer.json [+ tokenizer.model]) and
train/NNNNN.bin, val/NNNNN.bin shards of raw uint16/uint32 tokens. Opening one reads only the
manifest: shards are mapped on first touch, so start-up time and memory do not grow with the corpus,
and a batch reads just its own windows from the page cache.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from llmjax.data.sources import DataError

MANIFEST = "manifest.json"
FORMAT = "llmjax.tokens/1"


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 over the files the tokenizer saves itself as (spec + model files): two tokenizers with
  the same fingerprint encode every text the same way."""
  h = hashlib.sha256()
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save(tmp)
    for name in sorted(os.listdir(tmp)):
      h.update(name.encode() + b"\0" + Path(tmp, name).read_bytes() + b"\0")
  return h.hexdigest()[:16]


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ShardedTokens:
  """A read-only 1-D token array over many files: len(), slices and integer-array indexing, like the
  single memory-mapped array it stands in for. Slices are lazy views; np.asarray materializes."""

  def __init__(self, files: list[str], counts: list[int], dtype: str, lo: int = 0,
               hi: int | None = None, _maps: dict | None = None):
    self.files, self.counts, self.dtype = list(files), [int(c) for c in counts], np.dtype(dtype)
    self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
    self.lo, self.hi = lo, int(self.offsets[-1]) if hi is None else hi
    self._maps = {} if _maps is None else _maps  # shared between views

  def __len__(self) -> int:
    return self.hi - self.lo

  @property
  def shape(self) -> tuple[int]:
    return (len(self),)

  ndim = 1

  def _shard(self, i: int) -> np.ndarray:
    m = self._maps.get(i)
    if m is None:
      path = self.files[i]
      m = np.load(path, mmap_mode="r") if path.endswith(".npy") else np.memmap(
          path, dtype=self.dtype, mode="r", shape=(self.counts[i],))
      if m.shape != (self.counts[i],):
        raise DataError(f"{path} holds {m.size} tokens, the manifest says {self.counts[i]}; "
                        "the shard is damaged: prepare the corpus again")
      self._maps[i] = m
    return m

  def _read(self, start: int, length: int) -> np.ndarray:
    """Tokens [start, start+length) of the whole (un-viewed) array."""
    i = int(np.searchsorted(self.offsets, start, side="right")) - 1
    parts = []
    while length > 0:
      off = start - int(self.offsets[i])
      take = min(length, self.counts[i] - off)
      parts.append(self._shard(i)[off:off + take])
      start, length, i = start + take, length - take, i + 1
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
    """[len(starts), length] int32 windows: reads only those bytes (a window may span shards)."""
    out = np.empty((len(starts), length), np.int32)
    for r, s in enumerate(np.asarray(starts, np.int64)):
      if s < 0 or s + length > len(self):
        raise IndexError(f"window [{s}, {s + length}) is outside 0..{len(self)}")
      out[r] = self._read(self.lo + int(s), length)
    return out

  def __getitem__(self, key):
    if isinstance(key, slice):
      lo, hi, step = key.indices(len(self))
      if step != 1:
        return np.asarray(self)[key]
      return ShardedTokens(self.files, self.counts, self.dtype, self.lo + lo,
                           self.lo + max(hi, lo), self._maps)
    if isinstance(key, (int, np.integer)):
      key = int(key) + (len(self) if key < 0 else 0)
      return self._read(self.lo + key, 1)[0]
    idx = np.asarray(key, np.int64)
    flat = idx.reshape(-1) + self.lo
    shard = np.searchsorted(self.offsets, flat, side="right") - 1
    out = np.empty(flat.shape, self.dtype)
    for i in np.unique(shard):
      sel = shard == i
      out[sel] = self._shard(int(i))[flat[sel] - self.offsets[i]]
    return out.reshape(idx.shape)

  def __array__(self, dtype=None, copy=None):
    data = self._read(self.lo, len(self)) if len(self) else np.empty(0, self.dtype)
    return np.asarray(data, dtype) if dtype is not None else np.asarray(data)

  def max(self) -> int:
    return max(int(self._shard(i).max()) for i in range(len(self.files)) if self.counts[i])


def is_prepared_dir(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(directory: str) -> dict:
  path = Path(directory) / MANIFEST
  try:
    manifest = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"cannot read {path} ({e}); prepare the corpus again") from None
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path} is format {manifest.get('format')!r}, this llmjax reads {FORMAT!r}; "
                    "prepare the corpus again with this version")
  return manifest


def open_split(directory: str, manifest: dict, split: str) -> ShardedTokens:
  shards = manifest["splits"][split]["shards"]
  if not shards:
    raise DataError(f"{directory} has no {split} tokens; prepare it with a larger corpus"
                    + (" or a larger --val_fraction" if split == "val" else ""))
  files = [os.path.join(directory, s["file"]) for s in shards]
  return ShardedTokens(files, [s["tokens"] for s in shards], manifest["dtype"])


def open_token_glob(pattern: str, dtype: str) -> ShardedTokens:
  """Every .bin/.npy file matching `pattern`, in sorted order, as one token array."""
  files = sorted(f for f in globlib.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(f))
  if not files:
    raise DataError(f"data.path={pattern!r} matches no token file; give an existing .bin/.npy "
                    "glob or a prepared directory")
  counts = []
  for f in files:
    if f.endswith(".npy"):
      arr = np.load(f, mmap_mode="r")
      if arr.ndim != 1:
        raise DataError(f"token file {f} must hold a 1-D array, got shape {arr.shape}")
      if np.dtype(arr.dtype) != np.dtype(dtype) and files[0].endswith(".npy"):
        dtype = str(arr.dtype)
      counts.append(arr.size)
    else:
      size = os.path.getsize(f)
      if size % np.dtype(dtype).itemsize:
        raise DataError(f"token file {f} has {size} bytes, not a whole number of {dtype} tokens; "
                        "set data.token_dtype to the dtype it was written with")
      counts.append(size // np.dtype(dtype).itemsize)
  kept = [(f, c) for f, c in zip(files, counts) if c]
  if not kept:
    raise DataError(f"data.path={pattern!r}: every matching token file is empty")
  return ShardedTokens([f for f, _ in kept], [c for _, c in kept], dtype)


def run_tokenizer(directory: str, manifest: dict, data_config, tokenizer=None):
  """The tokenizer a run on `directory` uses: the one saved with the corpus, after checking that the
  run's (restored from its workdir, or named by data.tokenizer/tokenizer_path) is the same."""
  from llmjax.data.tokenizers import build_tokenizer, load_tokenizer
  want = manifest["tokenizer"]
  described = f"{want['kind']} tokenizer with {want['vocab_size']} ids, fingerprint {want['fingerprint']}"
  if data_config.tokenizer != want["kind"]:
    raise DataError(f"data.tokenizer={data_config.tokenizer!r} but {directory} was prepared with "
                    f"the {described}; set --config.data.tokenizer={want['kind']} (the corpus "
                    "brings its own tokenizer) or prepare the corpus again with yours")
  source = "the run's tokenizer"
  if tokenizer is None and data_config.tokenizer_path:
    tokenizer, source = build_tokenizer(data_config, None), f"data.tokenizer_path={data_config.tokenizer_path}"
  if tokenizer is not None:
    got = tokenizer_fingerprint(tokenizer)
    if got != want["fingerprint"]:
      raise DataError(f"tokenizer mismatch: {source} ({tokenizer.kind}, {tokenizer.vocab_size} ids, "
                      f"fingerprint {got}) is not the one {directory} was prepared with "
                      f"({described}); use that corpus's tokenizer or prepare it again with yours")
    return tokenizer
  return load_tokenizer(directory)


def check_max_token_id(dataset, vocab_size: int) -> None:
  """A prepared corpus records its largest token id: one that the model cannot embed is an error at
  start, not NaN losses later."""
  max_id = getattr(dataset, "max_token_id", None)
  if max_id is not None and max_id >= vocab_size:
    raise DataError(f"the corpus holds token id {max_id} but model.vocab_size={vocab_size}; set "
                    f"--config.model.vocab_size to at least {max_id + 1} (or 0: the tokenizer's size)")
