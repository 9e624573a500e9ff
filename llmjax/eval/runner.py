"""Evaluate a run on a file of examples: read, pick the task by format, score, summarize."""
from __future__ import annotations

from llmjax.eval import loading
from llmjax.eval.scoring import Scorer
from llmjax.eval.tasks import TASKS, Context, Options, TaskError, finite


def read(path: str, fmt: str | None):
  """(format, examples) of a task file (llmjax.data.formats: JSON Lines, Parquet, a datasets
  directory; errors are one-line DataErrors naming FILE:LINE)."""
  from llmjax.data import formats
  found = formats.read_examples(path, fmt or "auto")
  return found.format, found.examples


def parse_step(step):
  if step is None or isinstance(step, int) or step == "best":  # 'best': checkpoint.resolve_step
    return step
  try:
    return int(step)
  except ValueError:
    raise TaskError(f"--step={step} must be a checkpoint step number") from None


def evaluate_file(workdir: str, data: str, *, step=None, fmt: str | None = None,
                  options: Options | None = None, batch_size: int = 16) -> tuple[dict, list[dict]]:
  """-> (summary: {"step", "format", "examples", metrics...}, one prediction record per example)."""
  options = options or Options()
  fmt, examples = read(data, fmt)
  task = TASKS.get(fmt)
  if task is None:
    raise TaskError(f"--data={data} holds {fmt} examples, which llmjax.evaluate cannot evaluate; "
                    f"it evaluates {', '.join(sorted(TASKS))} data")
  run = loading.load(workdir, parse_step(step))
  family = run.model_config.family
  if task.families and family not in task.families:
    raise TaskError(f"--data={data} holds {fmt} examples, which need an encoder-decoder "
                    f"({', '.join(task.families)}), but {workdir} is a {family} model")
  if not task.families and family == "encoder_decoder":
    raise TaskError(f"--data={data} holds {fmt} examples, but {workdir} is an encoder-decoder: "
                    "evaluate it on {\"source\", \"target\"} (seq2seq) data")
  head = run.model_config.num_labels
  if task.needs_lm_head and head:
    raise TaskError(f"--data={data} holds {fmt} examples, which need a language-model head, but "
                    f"{workdir} is a classification model ({head} labels); evaluate it on "
                    "classification data")
  if not task.needs_lm_head and not head:
    raise TaskError(f"--data={data} holds {fmt} examples, which need a classification head, but "
                    f"{workdir} is a language model; fine-tune it on {fmt} data first "
                    "(README 'Fine-tune')")
  scorer = Scorer.from_run(run, batch_size)
  try:
    result = task.evaluate(Context(scorer, run, options, workdir=str(workdir)), examples)
  except ValueError as e:
    if isinstance(e, TaskError):
      raise
    raise TaskError(str(e)) from None  # e.g. an invalid sampler setting
  scorer.report_truncation()
  summary = {"step": run.step, "format": fmt, "examples": len(examples), **finite(result.metrics)}
  return summary, result.predictions
