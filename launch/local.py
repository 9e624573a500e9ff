#!/usr/bin/env python3
"""Run N cooperating JAX processes on this machine, each with its own fake CPU devices.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      python -m llmjax.main --config=experiments/shakespeare_char.py --workdir=runs/mp

Every process gets XLA_FLAGS=--xla_force_host_platform_device_count=K and the flags
--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I appended to the command, so
`jax.distributed.initialize` joins them into one job of N*K devices (CPU collectives go over gloo).
This is how the multi-host code paths (per-process input, process-0-only logging, collective
checkpointing) are exercised without a cluster. Output lines are prefixed with [pI]. The exit
status is the first non-zero status of any process. --dry-run prints the commands and exits.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(command: list[str], num_processes: int, devices: int, port: int):
  """[(env additions, argv)] for each process."""
  out = []
  for rank in range(num_processes):
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    argv = command + [f"--coordinator_address=127.0.0.1:{port}",
                      f"--num_processes={num_processes}", f"--process_id={rank}"]
    out.append((env, argv))
  return out


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  parser.add_argument("--timeout", type=float, default=0, help="seconds before all are killed (0 = none)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="-- then the command, e.g. python -m llmjax.main --config=...")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --, e.g. -- python -m llmjax.main --config=...")
  if command[0] == "python":
    command = [sys.executable] + command[1:]
  port = args.port or free_port()
  plan = commands(command, args.num_processes, args.devices_per_process, port)
  if args.dry_run:
    for env, cmd in plan:
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
    return 0

  procs = []
  for rank, (env, cmd) in enumerate(plan):
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    thread = threading.Thread(target=_pump, args=(proc.stdout, f"[p{rank}]"), daemon=True)
    thread.start()
    procs.append((proc, thread))
  status, start = 0, time.monotonic()
  try:
    while [proc.poll() for proc, _ in procs].count(None):  # poll all: any() stops at the first
      failed = [proc.returncode for proc, _ in procs if proc.returncode]
      if failed:  # one failed process would leave the others waiting on collectives forever
        status = failed[0]
        break
      if args.timeout and time.monotonic() - start > args.timeout:
        status = 124
        break
      time.sleep(0.2)
    status = status or next((proc.returncode for proc, _ in procs if proc.returncode), 0)
  except KeyboardInterrupt:
    status = 130
  finally:
    for proc, thread in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      thread.join(timeout=5)
  if status:
    print(f"launch/local.py: a process exited with status {status}", file=sys.stderr)
  return status


if __name__ == "__main__":
  sys.exit(main())
