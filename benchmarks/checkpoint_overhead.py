"""How long a checkpoint save blocks the training loop (async vs synchronous Orbax saves), and
what the in-step non-finite guard costs.

  python benchmarks/checkpoint_overhead.py [--config.model.num_layers=4 ...] > /dev/null
  -> prints a table and writes benchmarks/checkpoint_overhead.json

Uses experiments/shakespeare_char.py (4 layers, 128 wide) unless overridden with --set KEY=VALUE.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from llmjax import sharding as shd  # noqa: E402


def _config(overrides):
  from llmjax.experiment import load_config, override
  config = override(load_config("shakespeare_char"), overrides)
  config.train.progress = False
  return config


def time_saves(config, async_save: bool, saves: int) -> list[float]:
  from llmjax import loop
  config.train.async_checkpointing = async_save
  config.train.keep_checkpoints = 2
  with tempfile.TemporaryDirectory() as workdir:
    run = loop.Run(config, workdir)
    state = run.initial_state()
    blocked = []
    with shd.use_mesh(run.mesh):
      for i in range(saves):
        state, m = run.train_step(state, run.batch("train", i))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        run.save(state, i + 1)
        blocked.append(time.perf_counter() - t0)
        for _ in range(3):  # some training while the background save runs
          state, m = run.train_step(state, run.batch("train", i))
        jax.block_until_ready(state)
    run.checkpointer.close()
  return blocked[1:]  # the first save includes Orbax's one-time setup


def _unguarded(state, grads, loss, params, opt_state, policy, halt_after):
  """The update without the non-finite guard (what the step cost before it)."""
  from llmjax.train import TrainState
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    nonfinite_skipped=state.nonfinite_skipped,
                    nonfinite_streak=state.nonfinite_streak), True


def time_steps(config, guard: bool, steps: int) -> float:
  from llmjax import loop
  from llmjax import train as trainlib
  original = trainlib.guarded_update
  if not guard:
    trainlib.guarded_update = _unguarded
  try:
    return _time_steps(loop, config, steps)
  finally:
    trainlib.guarded_update = original


def _time_steps(loop, config, steps: int) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    run = loop.Run(config, workdir)
    state = run.initial_state()
    with shd.use_mesh(run.mesh):
      state, _ = run.train_step(state, run.batch("train", 0))
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      for i in range(steps):
        state, _ = run.train_step(state, run.batch("train", i))
      jax.block_until_ready(state)
    run.checkpointer.close()
  return (time.perf_counter() - t0) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
  parser.add_argument("--saves", type=int, default=6)
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()
  results = {"device": jax.devices()[0].device_kind, "overrides": args.set}
  for mode in ((True, False) if args.saves > 0 else ()):
    blocked = time_saves(_config(args.set), mode, args.saves)
    results[f"{'async' if mode else 'sync'}_save_blocks_ms"] = 1e3 * statistics.median(blocked)
  for guard in (True, False, True, False):  # interleaved: the machine is shared
    key = f"step_ms_{'with' if guard else 'without'}_nonfinite_guard"
    results[key] = min(results.get(key, 1e9), 1e3 * time_steps(_config(args.set), guard, args.steps))
  for k, v in results.items():
    print(f"{k:28s} {v:.2f}" if isinstance(v, float) else f"{k:28s} {v}", file=sys.stderr)
  out = Path(__file__).with_suffix(".json")
  out.write_text(json.dumps(results, indent=2))
  print(json.dumps(results))


if __name__ == "__main__":
  main()
