"""Background prefetch of host batches, so the device never waits on reading and slicing tokens.

A thread assembles the host (numpy) rows of the next `depth` steps while the current step runs;
batches stay a pure function of the step (the thread only computes them earlier). It also measures
what the input costs: `host_ms` (time to assemble one batch, on the background thread) and
`wait_ms` (time the training loop actually blocked waiting for one), averaged since the last read.
"""
from __future__ import annotations

import queue
import threading
import time


class Prefetcher:
  def __init__(self, make_batch, start: int, stop: int, depth: int = 2):
    self._make, self._next_step = make_batch, start
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._host_s = self._wait_s = 0.0
    self._host_n = self._wait_n = 0
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, args=(start, stop), daemon=True,
                                    name="llmjax-prefetch")
    self._thread.start()

  def _run(self, start: int, stop: int) -> None:
    for step in range(start, stop):
      if self._stop.is_set():
        return
      t0 = time.perf_counter()
      try:
        item = (step, self._make(step), None)
      except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        item = (step, None, e)
      with self._lock:
        self._host_s += time.perf_counter() - t0
        self._host_n += 1
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return

  def get(self, step: int):
    """The batch of `step` (steps must be asked for in order)."""
    if step != self._next_step:
      raise ValueError(f"prefetcher expected step {self._next_step}, was asked for {step}")
    t0 = time.perf_counter()
    got, batch, error = self._queue.get()
    with self._lock:
      self._wait_s += time.perf_counter() - t0
      self._wait_n += 1
    if error is not None:
      raise error
    assert got == step, (got, step)
    self._next_step += 1
    return batch

  def stats(self) -> dict:
    """Mean ms per batch since the last call: assembling it (host_ms) and waiting for it (wait_ms)."""
    with self._lock:
      out = {"data_host_ms": 1e3 * self._host_s / max(self._host_n, 1),
             "data_wait_ms": 1e3 * self._wait_s / max(self._wait_n, 1)}
      self._host_s = self._wait_s = 0.0
      self._host_n = self._wait_n = 0
    return out

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
