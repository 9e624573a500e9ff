"""Mixtures of prepared corpora: `data.mixture='data/web:0.7,data/code:0.3'`.

Every row of global batch `step` draws its source by weight and its window within that source from
generators seeded by (seed, split, step): a batch is a pure function of (seed, step) like a single
corpus's, so resumption is exact and each process reads only its own rows. Validation batches mix
the same way ('val'), and each source also has its own validation split ('val/<name>'), which the
loop reports as per-source losses.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from llmjax.data import batches, shards
from llmjax.data.sources import DataError


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'dirA:0.7,dirB:0.3' -> [(dirA, 0.7), (dirB, 0.3)] (weights are normalized later)."""
  out = []
  for item in spec.split(","):
    item = item.strip()
    path, sep, weight = item.rpartition(":")
    try:
      w = float(weight)
    except ValueError:
      w = None
    if not sep or not path or w is None or not np.isfinite(w) or w <= 0:
      raise DataError(f"data.mixture={spec!r}: {item!r} is not DIR:WEIGHT with a positive weight; "
                      "write e.g. 'data/web:0.7,data/code:0.3'")
    if not shards.is_prepared_dir(path):
      raise DataError(f"data.mixture: {path} is not a prepared corpus directory (no "
                      f"{shards.MANIFEST}); make it with `python -m llmjax.data.prepare "
                      f"--output={path} ...`")
    out.append((path, w))
  if len({p for p, _ in out}) != len(out):
    raise DataError(f"data.mixture={spec!r} names a directory twice; give each once")
  return out


def source_names(paths: list[str]) -> list[str]:
  """Short metric names: the directory's base name (its index too where two share one)."""
  names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
  return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


@dataclasses.dataclass
class MixtureDataset:
  sources: list            # TokenDataset per source
  names: list[str]
  weights: np.ndarray      # normalized
  tokenizer: object
  seq_len: int
  seed: int = 0
  eos_id: int | None = None
  max_token_id: int | None = None

  @property
  def train(self):  # the concatenated sources (sizes, logging, a fingerprint): never read whole
    return _concat([s.train for s in self.sources])

  @property
  def val(self):
    return _concat([s.val for s in self.sources])

  def source_rows(self, split: str, step: int, batch_size: int):
    """(source index per row, window start per row) of the whole global batch."""
    split_id = batches.SPLITS[split]
    rng = np.random.default_rng([self.seed, split_id, step, 0])
    choice = rng.choice(len(self.sources), size=batch_size, p=self.weights)
    starts = np.empty(batch_size, np.int64)
    for i, source in enumerate(self.sources):
      rows = np.flatnonzero(choice == i)
      n = len(getattr(source, split)) - self.seq_len - 1
      starts[rows] = np.random.default_rng([self.seed, split_id, step, 1 + i]).integers(
          0, n, size=len(rows))
    return choice, starts

  def batch(self, split: str, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """Rows of global batch `step` owned by this process; split 'val/<name>' is one source's
    validation data alone."""
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    if split.startswith("val/"):
      return self.sources[self.names.index(split[4:])].batch("val", step, batch_size,
                                                             process_index, process_count)
    rows = batch_size // process_count
    lo, hi = process_index * rows, (process_index + 1) * rows
    choice, starts = self.source_rows(split, step, batch_size)
    window = np.empty((rows, self.seq_len + 1), np.int32)
    for i, source in enumerate(self.sources):
      mine = np.flatnonzero(choice[lo:hi] == i)
      if len(mine):
        window[mine] = batches.read_windows(getattr(source, split), starts[lo:hi][mine],
                                            self.seq_len + 1)
    return batches.rows_from_windows(window, self.eos_id)


def _concat(arrays):
  files, counts = [], []
  for a in arrays:
    files += a.files
    counts += a.counts
  return shards.ShardedTokens(files, counts, arrays[0].dtype)


def load_mixture(data_config, seed: int, tokenizer=None) -> MixtureDataset:
  spec = parse_mixture(data_config.mixture)
  if data_config.path:
    raise DataError(f"set either data.path ({data_config.path}) or data.mixture, not both")
  loaded = []
  for path, _ in spec:
    ds = batches.load_prepared(path, data_config, seed, tokenizer)
    tokenizer = ds.tokenizer  # every later source must match the first one's tokenizer
    loaded.append(ds)
  dtypes = {str(ds.train.dtype) for ds in loaded}
  if len(dtypes) > 1:
    raise DataError(f"data.mixture: the sources were written as {', '.join(sorted(dtypes))}; "
                    "prepare them with the same tokenizer")
  weights = np.asarray([w for _, w in spec], np.float64)
  return MixtureDataset(
      sources=loaded, names=source_names([p for p, _ in spec]), weights=weights / weights.sum(),
      tokenizer=tokenizer, seq_len=data_config.seq_len, seed=seed, eos_id=loaded[0].eos_id,
      max_token_id=max(ds.max_token_id for ds in loaded))
