"""`python -m llmjax.lm_eval --workdir=RUN --tasks=NAMES`: lm-evaluation-harness tasks on a run.

    python -m llmjax.lm_eval --workdir=runs/ft --tasks=my_task --include_path=tasks/ \
        [--num_fewshot=N] [--limit=N] [--output_path=results.json] [--step=N] [--batch_size=16]

Prints lm-eval's results table on stderr and one JSON line {task: {metric: value}} on stdout;
--output_path also writes lm-eval's full results (with per-sample log-likelihoods and
predictions), atomically, never over an existing file unless --overwrite. Needs the "eval" extra
(`pip install -e .[eval]`). Tasks under --include_path are found without indexing lm-eval's
~15,000 built-in task files; those are indexed only when a requested task is not found there
(most built-in tasks download their data from the Hugging Face Hub).
"""
from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A run directory (training run or HF import).")
flags.DEFINE_string("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma-separated.")
flags.DEFINE_string("include_path", None, "A directory of extra lm-eval task YAML files.")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: the task's).")
flags.DEFINE_float("limit", None, "Evaluate only this many examples per task (< 1: a fraction).")
flags.DEFINE_string("output_path", None, "Write lm-eval's full results JSON here.")
flags.DEFINE_bool("overwrite", False, "Allow --output_path to replace an existing file.")
flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
flags.DEFINE_integer("seed", 0, "Seed for sampled generation and lm-eval's few-shot sampling.")
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f"llmjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _task_manager(names: list[str]):
  """Only the --include_path tasks when they cover every name; else lm-eval's built-ins too."""
  from lm_eval.tasks import TaskManager
  if FLAGS.include_path:
    local = TaskManager(include_path=FLAGS.include_path, include_defaults=False)
    if all(n in local.all_tasks for n in names):
      return local
  manager = TaskManager(include_path=FLAGS.include_path)
  missing = [n for n in names if n not in manager.all_tasks]
  if missing:
    where = f" or in {FLAGS.include_path}" if FLAGS.include_path else ""
    fail(f"unknown lm-eval task {missing[0]!r}: not among lm-eval's tasks{where}; "
         "list them with `lm-eval ls tasks`, or pass --include_path=DIR with its YAML")
  return manager


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _summary(results: dict) -> dict:
  """{task: {metric: value}} with lm-eval's 'acc,none' keys shortened to 'acc'."""
  out = {}
  for task, metrics in results.get("results", {}).items():
    row = {}
    for key, value in metrics.items():
      name, _, filt = key.partition(",")
      if name == "alias" or not isinstance(value, (int, float)):
        continue
      if isinstance(value, float) and not math.isfinite(value):
        continue
      row[name if filt in ("", "none") else f"{name},{filt}"] = value
    out[task] = row
  return out


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
  if not FLAGS.workdir:
    fail("--workdir is required: a training run or an imported model")
  if not FLAGS.tasks:
    fail("--tasks is required: comma-separated lm-eval task names")
  if FLAGS.include_path and not os.path.isdir(FLAGS.include_path):
    fail(f"--include_path={FLAGS.include_path} is not a directory")
  if FLAGS.output_path and os.path.exists(FLAGS.output_path) and not FLAGS.overwrite:
    fail(f"--output_path={FLAGS.output_path} exists; choose another path or pass --overwrite")
  if FLAGS.batch_size < 1:
    fail(f"--batch_size={FLAGS.batch_size} must be at least 1")
  limit = FLAGS.limit
  if limit is not None:
    if limit <= 0:
      fail(f"--limit={limit} must be positive")
    limit = int(limit) if limit >= 1 else limit
  step = None
  if FLAGS.step is not None:
    try:
      step = int(FLAGS.step)
    except ValueError:
      fail(f"--step={FLAGS.step} must be a checkpoint step number")
  logging.set_verbosity(logging.WARNING)
  try:
    import lm_eval
  except ImportError:
    fail("lm-evaluation-harness is not installed; pip install -e .[eval]")
  from lm_eval.utils import handle_non_serializable, make_table

  from llmjax.checkpoint import CheckpointError
  from llmjax.data import DataError
  from llmjax.eval import harness, loading
  from llmjax.eval.scoring import Scorer

  manager = _task_manager(FLAGS.tasks)
  try:
    run = loading.load(FLAGS.workdir, step)
    model = harness.LlmjaxLM(scorer=Scorer.from_run(run, FLAGS.batch_size), seed=FLAGS.seed)
    results = lm_eval.simple_evaluate(
        model=model, tasks=FLAGS.tasks, num_fewshot=FLAGS.num_fewshot, limit=limit,
        task_manager=manager, log_samples=bool(FLAGS.output_path), random_seed=FLAGS.seed,
        numpy_random_seed=FLAGS.seed, fewshot_random_seed=FLAGS.seed, torch_random_seed=FLAGS.seed)
  except (harness.RequestError, CheckpointError, DataError, FileNotFoundError) as e:
    fail(str(e))
  model.scorer.report_truncation()
  print(make_table(results), file=sys.stderr)
  if FLAGS.output_path:
    results["llmjax"] = {"workdir": FLAGS.workdir, "step": run.step}
    _write_atomically(FLAGS.output_path, json.dumps(results, indent=2, default=handle_non_serializable,
                                                   ensure_ascii=False))
  print(json.dumps({"step": run.step, **_summary(results)}), flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
