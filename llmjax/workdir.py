"""Owning a run directory: one training process per workdir, and never a stranger's files.

`claim(workdir)` is called by process 0 before training touches the directory. It
  * refuses an empty --workdir (an unset shell variable would otherwise train into the current
    directory);
  * refuses a directory that is not an llmjax run but holds a file llmjax writes (config.json,
    metrics.jsonl, ...), naming that file, so a stranger's file is never overwritten;
  * takes an exclusive lock, `<workdir>/.llmjax.lock`, held until the process exits. The lock is an
    advisory `flock` on that file: the kernel drops it when its holder dies (even by SIGKILL), so a
    stale lock file left by a dead process never blocks a rerun. The file records the holder's pid
    and host, which a refused second run reports.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".llmjax.lock"
MARKER_FILE = ".llmjax-run"  # written into every directory llmjax creates a run in
CONFIG_FILE = "config.json"
# Files and directories a training run overwrites, trims or prunes at the top of its workdir
# (tensorboard/ only gains new event files, so it is not on the list).
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "tokenizer.json", "tokenizer.model", "hf_tokenizer.json",
             "hf_tokenizer_config.json", "sample.txt", "loss.png", "checkpoints")
_CONFIG_SECTIONS = {"model", "data", "optim", "train"}

_held: dict[str, object] = {}  # resolved workdir -> open lock file (kept open = lock held)


class WorkdirError(RuntimeError):
  """A workdir that cannot be used: reported as one line, exit status 2."""


def check_not_empty(workdir: str | None, flag: str = "--workdir") -> None:
  if workdir is None or not str(workdir).strip():
    raise WorkdirError(f"{flag} is empty (an unset shell variable?); pass the run directory, "
                       f"e.g. {flag}=runs/my_run")


def is_llmjax_config(path: Path) -> bool:
  """Whether `path` is a config.json written by llmjax (a resolved run config)."""
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and _CONFIG_SECTIONS <= set(data)


def is_run_dir(workdir: Path) -> bool:
  return (workdir / MARKER_FILE).exists() or is_llmjax_config(workdir / CONFIG_FILE)


def check_ours(workdir: Path) -> None:
  """Refuses a directory that is not an llmjax run but holds a file a run would write."""
  if not workdir.is_dir() or is_run_dir(workdir):
    return
  for name in RUN_FILES:
    if (workdir / name).exists():
      raise WorkdirError(f"--workdir {workdir} is not an llmjax run directory but holds {name}, "
                         f"which training would overwrite; choose a new or empty --workdir")


def mark(workdir: Path) -> None:
  marker = workdir / MARKER_FILE
  if not marker.exists():
    tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
    tmp.write_text("This directory is an llmjax run (config.json, checkpoints/, metrics).\n")
    os.replace(tmp, marker)


def _holder(path: Path) -> str:
  try:
    info = json.loads(path.read_text())
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"
  except (OSError, ValueError):
    return "another process"


def lock(workdir: Path) -> None:
  """Takes the workdir's exclusive lock for the life of this process (idempotent)."""
  key = str(workdir.resolve())
  if key in _held:
    return
  path = workdir / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirError(f"--workdir {workdir} is in use by {_holder(path)}; wait for that run to "
                       "finish (or stop it), or choose another --workdir") from None
  except OSError as e:  # a filesystem without locks: say so rather than run unprotected silently
    os.close(fd)
    raise WorkdirError(f"cannot lock --workdir {workdir} ({e.strerror}); use a directory on a "
                       "filesystem that supports file locks") from None
  info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
  os.ftruncate(fd, 0)
  os.pwrite(fd, info.encode() + b"\n", 0)
  _held[key] = fd  # never closed: the kernel releases the lock when the process exits


def holds(workdir: str | Path) -> bool:
  """Whether this process already holds the lock of `workdir`."""
  return bool(str(workdir).strip()) and str(Path(workdir).resolve()) in _held


def release(workdir: Path) -> None:
  if not str(workdir).strip():
    return
  fd = _held.pop(str(Path(workdir).resolve()), None)
  if fd is not None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def claim(workdir: str | Path) -> Path:
  """Checks, creates, locks and marks a training workdir. Returns it as a Path."""
  check_not_empty(str(workdir))
  path = Path(workdir)
  check_ours(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {path} ({e.strerror}); choose a writable "
                       "directory") from None
  lock(path)
  check_ours(path)  # the directory may have been filled between the first check and the lock
  mark(path)
  return path
