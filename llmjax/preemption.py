"""SIGTERM / SIGINT as a request to stop cleanly: finish the step, checkpoint, wait, exit 0.

Preemptible TPUs and spot GPUs send SIGTERM some seconds before the machine goes away; Ctrl-C sends
SIGINT. The first such signal only sets a flag that the training loop reads between steps, so the
step in flight completes and its state is saved. The handler then restores the default action, so
a second signal kills the process at once (the OS default for SIGINT/SIGTERM): that cannot corrupt
earlier checkpoints because Orbax only ever renames complete checkpoint directories into place.
"""
from __future__ import annotations

import signal
import sys
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)
MULTI_PROCESS_CHECK_EVERY = 10  # steps between the processes' agreement on a stop (see requested)


class StopRequest:
  """Context manager that installs the handlers (main thread only) and restores the old ones."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    self.signal_name = signal.Signals(signum).name
    for sig in SIGNALS:  # a second signal takes the default action: terminate immediately
      signal.signal(sig, signal.SIG_DFL)
    print(f"llmjax: {self.signal_name} received: finishing the current step and saving a "
          "checkpoint; send it again to abort immediately (earlier checkpoints stay valid)",
          file=sys.stderr, flush=True)

  def requested(self, step: int | None = None) -> bool:
    """Whether to stop now. On several processes all must agree, or the save would deadlock:
    any process that saw a signal stops them all, through a tiny all-gather that is a blocking
    host round trip (~3 ms on a loaded 2-core host; issue 12), so it runs only every
    MULTI_PROCESS_CHECK_EVERY steps (`step` given) and a signal is honoured a few steps later."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    if step is not None and step % MULTI_PROCESS_CHECK_EVERY:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))
