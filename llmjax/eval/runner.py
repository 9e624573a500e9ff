"""Evaluate a run on a file of examples: read, pick the task by format, score, summarize."""
from __future__ import annotations

import json
import types

from llmjax.eval import loading
from llmjax.eval.scoring import Scorer
from llmjax.eval.tasks import TASKS, Context, Options, TaskError, finite


def _read(path: str, fmt: str | None):
  """(format, examples, where) -- provisional JSON Lines reader until llmjax.data.formats lands."""
  from llmjax.data import DataError
  try:
    lines = open(path, encoding="utf-8").read().splitlines()
  except FileNotFoundError:
    raise DataError(f"--data={path} does not exist") from None
  rows, where = [], []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
    rows.append(row)
    where.append(f"{path}:{n}")
  if not rows:
    raise DataError(f"{path} holds no examples")
  keys = set(rows[0])
  found = ("multiple_choice" if {"prompt", "choices", "answer"} <= keys else
           "prompt_completion" if {"prompt", "completion"} <= keys else
           "classification" if {"text", "label"} <= keys else "text" if "text" in keys else None)
  fmt = fmt or found
  if fmt is None:
    raise DataError(f"{where[0]}: cannot tell the format from keys {sorted(keys)}")
  return fmt, [types.SimpleNamespace(**r) for r in rows], where


def parse_step(step):
  if step is None or isinstance(step, int):
    return step
  try:
    return int(step)
  except ValueError:
    raise TaskError(f"--step={step} must be a checkpoint step number") from None


def evaluate_file(workdir: str, data: str, *, step=None, fmt: str | None = None,
                  options: Options | None = None, batch_size: int = 16) -> tuple[dict, list[dict]]:
  """-> (summary: {"step", "format", "examples", metrics...}, one prediction record per example)."""
  options = options or Options()
  fmt, examples, where = _read(data, fmt)
  task = TASKS.get(fmt)
  if task is None:
    raise TaskError(f"--data={data} holds {fmt} examples, which llmjax.evaluate cannot evaluate; "
                    f"it evaluates {', '.join(sorted(TASKS))} data")
  run = loading.load(workdir, parse_step(step))
  scorer = Scorer.from_run(run, batch_size)
  try:
    result = task.evaluate(Context(scorer, run, options, where=lambda i: where[i]), examples)
  except ValueError as e:
    if isinstance(e, TaskError):
      raise
    raise TaskError(str(e)) from None  # e.g. an invalid sampler setting
  scorer.report_truncation()
  summary = {"step": run.step, "format": fmt, "examples": len(examples), **finite(result.metrics)}
  return summary, result.predictions
