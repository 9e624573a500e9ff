"""Tokenized examples -> fixed-length rows: packed (several examples per row) or padded (one).

An example is a token sequence t[0..L) with per-token weights w (w[j]: weight of predicting t[j]).
It fills L-1 positions of a row: inputs t[:-1], targets t[1:], weights w[1:], one segment id
(1, 2, ... within the row; 0 is padding) and positions 0..L-2 that restart per example. The model
never attends across segment ids, so packed examples cannot see each other (tested).

`assign_rows` decides which examples share a row: first-fit over the examples in their (shuffled)
order with a few rows open at once; it is pure numpy on lengths, so every process computes the
same assignment and materializes only its own rows.
"""
from __future__ import annotations

import numpy as np

OPEN_ROWS = 8  # rows kept open for first-fit: enough to fill gaps, keeps the order nearly kept


def assign_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int, pack: bool) -> list[list[int]]:
  """Rows as lists of example indices (taken in `order`). lengths: positions each example fills
  (tokens - 1), each <= seq_len."""
  if not pack:
    return [[int(i)] for i in order]
  rows: list[list[int]] = []
  free: list[int] = []       # free positions of the open rows
  open_ids: list[int] = []   # their indices in `rows`
  for i in order:
    n = int(lengths[i])
    for k, space in enumerate(free):
      if n <= space:
        rows[open_ids[k]].append(int(i))
        free[k] -= n
        break
    else:
      rows.append([int(i)])
      open_ids.append(len(rows) - 1)
      free.append(seq_len - n)
      if len(open_ids) > OPEN_ROWS:  # close the oldest open row
        open_ids.pop(0)
        free.pop(0)
  return rows


def build_rows(examples, rows: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
  """Materializes rows: inputs, targets, segment_ids, positions int32 and weights float32, all
  [len(rows), seq_len]. examples[i] has `.tokens` and `.weights` (same length)."""
  n = len(rows)
  out = {"inputs": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
         "weights": np.zeros((n, seq_len), np.float32),
         "segment_ids": np.zeros((n, seq_len), np.int32),
         "positions": np.zeros((n, seq_len), np.int32)}
  for r, members in enumerate(rows):
    pos = 0
    for seg, i in enumerate(members, 1):
      tokens, weights = examples[i].tokens, examples[i].weights
      k = len(tokens) - 1
      out["inputs"][r, pos:pos + k] = tokens[:-1]
      out["targets"][r, pos:pos + k] = tokens[1:]
      out["weights"][r, pos:pos + k] = weights[1:]
      out["segment_ids"][r, pos:pos + k] = seg
      out["positions"][r, pos:pos + k] = np.arange(k)
      pos += k
  return out


def efficiency(lengths: np.ndarray, rows: list[list[int]], seq_len: int) -> float:
  """Share of row positions that hold a real token."""
  if not rows:
    return 0.0
  used = sum(int(lengths[i]) for row in rows for i in row)
  return used / (len(rows) * seq_len)
