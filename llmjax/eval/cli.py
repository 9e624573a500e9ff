"""`python -m llmjax.evaluate --workdir=RUN --data=test.jsonl`: task metrics of a run on a data file.

    python -m llmjax.evaluate --workdir=runs/ft --data=test.jsonl [--output=predictions.jsonl]
        [--metrics=exact_match,f1] [--step=N|best] [--max_new_tokens=64] [--temperature=0 --seed=0]
        [--stop=STRING ...] [--batch_size=16] [--format=...]

The format of the examples (text, prompt_completion, multiple_choice, classification, ...)
follows from their keys, or from --format; each is evaluated as its entry in
llmjax.eval.tasks.TASKS says. Prints one JSON line of metrics on stdout; --output writes one JSON
line per example (the prediction and its scores), atomically, and never over an existing file
unless --overwrite. Runs batched on the run's mesh (or data parallel over this machine's devices
when that mesh does not fit).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A run directory (training run or HF import).")
flags.DEFINE_string("data", None, "The examples: a JSON Lines file (see README 'Evaluate').")
flags.DEFINE_string("format", None, "The examples' format (default: from their keys).")
flags.DEFINE_string("output", None, "Write per-example predictions here (JSON Lines).")
flags.DEFINE_bool("overwrite", False, "Allow --output to replace an existing file.")
flags.DEFINE_list("metrics", None, "Metrics to report (default: the format's usual ones).")
flags.DEFINE_string("step", None, "Checkpoint step to evaluate, or 'best' (train.keep_best's); "
                    "default: the latest.")
flags.DEFINE_integer("max_new_tokens", 64, "Generation: tokens per completion (at most).")
flags.DEFINE_float("temperature", 0.0, "Generation: 0 is greedy; > 0 samples (with --seed).")
flags.DEFINE_integer("top_k", 0, "Generation: keep only the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Generation: nucleus mass (1: all).")
flags.DEFINE_integer("seed", 0, "Generation: seed of the sampler.")
flags.DEFINE_multi_string("stop", [], "Generation: stop a completion at this string; repeatable.")
flags.DEFINE_integer("batch_size", 16, "Rows per forward pass / generation batch.")
flags.DEFINE_integer("num_beams", 1, "seq2seq generation: beam search with this many beams.")
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f"llmjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def write_jsonl_atomically(path: str, records) -> None:
  """All or nothing: a crash mid-write leaves no half file under `path`."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_flags() -> None:
  if not FLAGS.workdir:
    fail("--workdir is required: a training run or an imported model")
  if not FLAGS.data:
    fail("--data is required: a JSON Lines file of examples")
  if FLAGS.output and os.path.exists(FLAGS.output) and not FLAGS.overwrite:
    fail(f"--output={FLAGS.output} exists; choose another path or pass --overwrite")
  if FLAGS.batch_size < 1:
    fail(f"--batch_size={FLAGS.batch_size} must be at least 1")
  if FLAGS.num_beams < 1:
    fail(f"--num_beams={FLAGS.num_beams} must be at least 1 (1: no beam search)")
  if FLAGS.max_new_tokens < 1:
    fail(f"--max_new_tokens={FLAGS.max_new_tokens} must be at least 1")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
  _check_flags()
  logging.set_verbosity(logging.WARNING)
  from llmjax.checkpoint import CheckpointError
  from llmjax.config import ConfigError
  from llmjax.data import DataError
  from llmjax.eval import runner
  from llmjax.eval.tasks import Options, TaskError
  from llmjax.generate import GenerateError
  options = Options(metrics=FLAGS.metrics, max_new_tokens=FLAGS.max_new_tokens,
                    temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                    seed=FLAGS.seed, stop=FLAGS.stop, num_beams=FLAGS.num_beams)
  try:
    summary, predictions = runner.evaluate_file(
        FLAGS.workdir, FLAGS.data, step=FLAGS.step, fmt=FLAGS.format, options=options,
        batch_size=FLAGS.batch_size)
  except (TaskError, DataError, ConfigError, CheckpointError, GenerateError,
          FileNotFoundError) as e:
    fail(str(e))
  if FLAGS.output:
    write_jsonl_atomically(FLAGS.output, predictions)
  print(json.dumps(summary), flush=True)


def run():
  app.run(main)
