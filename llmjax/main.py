"""Command-line entry point: python -m llmjax.main --config=experiments/X.py --workdir=DIR.

Configuration problems are reported as one line and exit status 2, never as a traceback.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llmjax import config as cfglib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "An experiment file under experiments/ (optionally file.py:VARIANT).",
    lock_config=False)
flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, metrics, samples. "
                    "Running again with the same workdir resumes.")
flags.DEFINE_string("coordinator_address", "", "Multi-host: host:port of process 0 "
                    "(= --config.mesh.distributed.coordinator_address; TPU pods and SLURM need none).")
flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes (0 = detected).")
flags.DEFINE_integer("process_id", -1, "Multi-host: this process's rank (-1 = detected).")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train, or evaluate a checkpoint of --workdir without training (--step).")
flags.DEFINE_string("step", None, "--mode=eval: the checkpoint step to evaluate, a number or 'best' "
                    "(default: latest).")
FLAGS = flags.FLAGS


def fail(message: str, status: int = 2) -> None:
  print(f"llmjax: error: {message}", file=sys.stderr)
  sys.exit(status)


def evaluate_mode(config) -> None:
  """--mode=eval: the run's own config; a given --config only contributes mesh.* and
  train.eval_batches (to evaluate on another device layout)."""
  import json
  from llmjax import evaluate
  result = evaluate.evaluate_checkpoint(FLAGS.workdir, FLAGS.step, override=config)
  print(evaluate.format_result(result), flush=True)
  print(json.dumps(result, sort_keys=True), flush=True)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
  if _CONFIG.value is None and FLAGS.mode == "train":
    fail("--config is required, e.g. --config=experiments/shakespeare_char.py")
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  import jax
  from llmjax.data import DataError
  from llmjax.checkpoint import CheckpointError
  from llmjax import distributed
  from llmjax import sharding as shd
  from llmjax.train import NonFiniteError
  from llmjax.cpu_devices import configure_cpu_devices
  try:
    if FLAGS.mode == "eval":
      evaluate_mode(config)
      return
    # Multi-host runs must initialize the distributed runtime before anything touches devices.
    distributed.apply_flags(config, FLAGS.coordinator_address, FLAGS.num_processes,
                            FLAGS.process_id)
    cfglib.validate(config)         # schema and sizes, before anything reads the config
    configure_cpu_devices(config)   # must precede the first JAX operation
    distributed.initialize(config)
    cfglib.validate(config, num_devices=jax.device_count(),
                    num_slices=shd.num_slices(config, jax.devices()))
    from llmjax import loop
    loop.train(config, FLAGS.workdir)
  except (cfglib.ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
    fail(str(e))
  except NonFiniteError as e:
    fail(str(e), status=1)


def parse_flags(argv):
  """absl flag parsing, with bad --config.* overrides reported as one line (exit 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except (AttributeError, KeyError):
    schema = cfglib.flatten(cfglib.default_config())
    for arg in argv[1:]:
      if arg.startswith("--config.") and "=" in arg:
        name = arg[len("--config."):].split("=", 1)[0]
        if name not in schema:
          fail(cfglib.unknown_key_message(name, schema))
    raise


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
