"""A split's stream of tokens cut into fixed-size shards as `python -m llmjax.data.prepare` writes
them: appended to a temporary file, renamed when full, resumable from what progress.json recorded.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from llmjax.data.sources import DataError

PROGRESS = "progress.json"  # the prepare run's record of finished shards (written by prepare.py)
# Test-only: pretend the disk holds only this many more bytes of shards (the disk-full path).
_TEST_DISK_BYTES = "LLMJAX_TEST_PREPARE_DISK_BYTES"


class ShardWriter:
  """One split's stream of tokens cut into fixed-size shards, written as they arrive.

  The shard being filled is the file NNNNN.bin.tmp, appended to and renamed to NNNNN.bin when it
  holds `shard_tokens` tokens, so memory stays at one work unit's tokens however large shards and
  corpora are, and every token is written once. At each save the file is synced and progress.json
  records how many of its tokens are valid; a rerun truncates it there and goes on with the next
  work unit (a crash past that point left only tokens that the rerun writes again, identically).
  """

  def __init__(self, out: Path, split: str, shard_tokens: int, dtype: str, state: dict | None):
    self.dir, self.split, self.size, self.dtype = out / split, split, shard_tokens, np.dtype(dtype)
    self.dir.mkdir(parents=True, exist_ok=True)
    state = state or {"shards": [], "pending": 0, "pending_docs": 0, "pending_max": -1}
    self.shards = state["shards"]
    self.filled, self.docs, self.max = state["pending"], state["pending_docs"], state["pending_max"]
    tmp, final = self._tmp(), self._final()
    if not tmp.exists() and final.exists() and self.filled:
      os.replace(final, tmp)  # renamed by a run that stopped before it could save its progress
    if self.filled and (not tmp.exists() or tmp.stat().st_size < self.filled * self.dtype.itemsize):
      raise DataError(f"{tmp} is shorter than {PROGRESS} says; delete {out} and start again")
    self.file = open(tmp, "r+b" if tmp.exists() else "wb")
    self.file.truncate(self.filled * self.dtype.itemsize)  # drops what a crash left past the save
    self.file.seek(self.filled * self.dtype.itemsize)

  def _final(self) -> Path:
    return self.dir / f"{len(self.shards):05d}.bin"

  def _tmp(self) -> Path:
    return self.dir / f"{len(self.shards):05d}.bin.tmp"

  def state(self) -> dict:
    return {"shards": self.shards, "pending": self.filled, "pending_docs": self.docs,
            "pending_max": self.max}

  def add(self, tokens: np.ndarray, ends: np.ndarray) -> bool:
    """Appends one work unit's tokens (and its document end offsets); returns whether a shard
    was finished."""
    finished = False
    while len(tokens):
      take = min(self.size - self.filled, len(tokens))
      part = tokens[:take]
      _write_bytes(self.file, part.tobytes(), sync=False)
      self.filled += take
      self.docs += int((ends <= take).sum())
      self.max = max(self.max, int(part.max()))
      tokens, ends = tokens[take:], ends[ends > take] - take
      if self.filled == self.size:
        self._finish_shard()
        finished = True
    return finished

  def sync(self) -> None:
    self.file.flush()
    os.fsync(self.file.fileno())

  def finish(self) -> None:
    """Closes the last, shorter shard (if any tokens are left)."""
    if self.filled:
      self._finish_shard()
    self.file.close()
    self._tmp().unlink(missing_ok=True)

  def _finish_shard(self) -> None:
    self.sync()
    self.file.close()
    name = f"{self.split}/{len(self.shards):05d}.bin"
    os.replace(self._tmp(), self._final())
    self.shards.append({"file": name, "tokens": self.filled, "documents": self.docs,
                        "max_token_id": self.max})
    self.filled, self.docs, self.max = 0, 0, -1
    self.file = open(self._tmp(), "wb")


def _write_bytes(f, data: bytes, sync: bool = True) -> None:
  """Writes (and syncs); the test-only byte budget stands in for a disk that fills up."""
  budget = os.environ.get(_TEST_DISK_BYTES)
  if budget is not None:
    left = int(budget)
    if len(data) > left:
      f.write(data[:left])
      f.flush()
      raise OSError(errno.ENOSPC, "No space left on device (simulated)")
    os.environ[_TEST_DISK_BYTES] = str(left - len(data))
  f.write(data)
  if sync:
    f.flush()
    os.fsync(f.fileno())
