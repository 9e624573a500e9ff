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
flags.DEFINE_bool("allow_corpus_change", False, "Resume even though data.path/data.val_path hold "
                  "another corpus than the checkpoint was trained on (refused without it).")
FLAGS = flags.FLAGS


def fail(message: str, status: int = 2) -> None:
  print(f"llmjax: error: {message}", file=sys.stderr)
  sys.exit(status)


def evaluate_mode(config, argv) -> None:
  """--mode=eval: the run's own config; a given --config only contributes mesh.*,
  train.eval_batches (another device layout) and data.path/val_path/token_dtype (another corpus);
  any other --config.* given is named in a warning."""
  import json
  from llmjax import evaluate
  explicit = {a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")}
  result = evaluate.evaluate_checkpoint(FLAGS.workdir, FLAGS.step, override=config,
                                        explicit=explicit)
  print(evaluate.format_result(result), flush=True)
  print(json.dumps(result, sort_keys=True), flush=True)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
  from llmjax import workdir as workdir_lib
  try:
    workdir_lib.check_not_empty(FLAGS.workdir)
  except workdir_lib.WorkdirError as e:
    fail(str(e))
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
      evaluate_mode(config, sys.argv)
      return
    # Multi-host runs must initialize the distributed runtime before anything touches devices.
    distributed.apply_flags(config, FLAGS.coordinator_address, FLAGS.num_processes,
                            FLAGS.process_id)
    cfglib.validate(config)         # schema and sizes, before anything reads the config
    from llmjax import cpu_processes
    worker = cpu_processes.join(config)  # issue 12: a local worker is pinned before JAX starts
    configure_cpu_devices(config)   # must precede the first JAX operation
    if worker is None and _launch_cpu_processes(config):  # this process only launched workers
      return
    distributed.initialize(config)
    cfglib.validate(config, num_devices=jax.device_count(),
                    num_slices=shd.num_slices(config, jax.devices()))
    from llmjax import loop
    loop.train(config, FLAGS.workdir, allow_corpus_change=FLAGS.allow_corpus_change)
  except (cfglib.ConfigError, DataError, CheckpointError, FileNotFoundError,
          workdir_lib.WorkdirError) as e:
    fail(str(e))
  except NonFiniteError as e:
    fail(str(e), status=1)


def _launch_cpu_processes(config) -> bool:
  """mesh.cpu_processes (llmjax/cpu_processes.py), outside a worker: when more than one process
  is asked for on a CPU host, launches them as this same command, waits, and exits with their
  status. False: train in this process."""
  from llmjax import cpu_processes
  count = cpu_processes.choose(config)
  if count <= 1:
    return False
  why = cpu_processes.why_not(config)
  if why:
    print(f"llmjax: mesh.cpu_processes={config.mesh.cpu_processes} ignored: {why}; training in "
          "one process", file=sys.stderr, flush=True)
    return False
  # the sizes the workers will see, checked once here: a bad batch is one line, not N
  cfglib.validate(config, num_devices=count * max(config.mesh.cpu_devices, 1))
  status = cpu_processes.launch(count)
  if status:
    sys.exit(status if status > 0 else 1)
  return True


def _config_arg(argv) -> str:
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _last_error_line(text: str) -> str:
  """The exception line at the end of a traceback that ml_collections folds into its message."""
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  return lines[-1] if lines else text


def parse_flags(argv):
  """absl flag parsing, with a bad --config file or --config.* override reported as one line
  (exit 2): a missing file, a syntax error, get_config() failing (e.g. an unknown :variant)."""
  spec = _config_arg(argv)
  # grad_accum_steps is an int field; 'auto' is its documented spelling of 0 (see llmjax/memory.py)
  argv = [a.replace("--config.train.grad_accum_steps=auto", "--config.train.grad_accum_steps=0")
          if a == "--config.train.grad_accum_steps=auto" else a for a in argv]
  try:
    parsed = FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Error whilst parsing config file" in text:  # get_config raised: show its own message
      fail(f"--config={spec}: {_last_error_line(text)}")
    fail(text.splitlines()[0])
  except SyntaxError as e:
    fail(f"--config file {e.filename}, line {e.lineno}: syntax error ({e.msg}); fix the file")
  except (AttributeError, KeyError) as e:
    schema = cfglib.flatten(cfglib.default_config())
    for arg in argv[1:]:
      if arg.startswith("--config.") and "=" in arg:
        name = arg[len("--config."):].split("=", 1)[0]
        if name not in schema:
          fail(cfglib.unknown_key_message(name, schema))
    fail(f"--config={spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  except Exception as e:  # noqa: BLE001 - the config file's own code failed while loading
    fail(f"--config={spec}: {type(e).__name__}: {_last_error_line(str(e))}")
  value = _CONFIG.value
  if value is not None and type(value).__name__ == "_ErrorConfig":
    # ml_collections defers a missing/unreadable file to the first access; say it now
    path = spec.split(":", 1)[0]
    fail(f"--config file {path!r} does not exist or cannot be read; pass an experiment file, "
         "e.g. --config=experiments/shakespeare_char.py")
  return parsed


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
