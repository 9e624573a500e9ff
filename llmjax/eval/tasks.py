"""The task runner's registry: how each example format is evaluated.

A task is registered under the data format it evaluates (`llmjax.data.formats`: text,
prompt_completion, multiple_choice, classification, ...). `evaluate(ctx, examples)` returns the
metrics and one prediction record per example. New formats (e.g. seq2seq) add an entry here; the
runner (`python -m llmjax.evaluate`) never branches on the format.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Sequence

import numpy as np

from llmjax.eval import metrics as M
from llmjax.eval.scoring import Scorer, document_prefix, encode_pair, encode_text


class TaskError(ValueError):
  """Data the run cannot evaluate as given: reported as one line, exit status 2."""


@dataclasses.dataclass
class Options:
  metrics: Sequence[str] | None = None   # None: the task's defaults
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: Sequence[str] = ()
  num_beams: int = 1                     # issue 11: beam search (seq2seq generation)


@dataclasses.dataclass
class Context:
  scorer: Scorer
  run: Any            # llmjax.runs.LoadedRun
  options: Options
  workdir: str = ""   # the run directory (its saved label mapping, ...)


@dataclasses.dataclass
class Result:
  metrics: dict
  predictions: list[dict]


@dataclasses.dataclass(frozen=True)
class Task:
  fmt: str
  evaluate: Callable[[Context, Sequence[Any]], Result]
  metrics: tuple[str, ...]            # what --metrics may choose from
  default_metrics: tuple[str, ...]
  needs_lm_head: bool = True          # False: needs a classification head instead
  # issue 11: the model families the task runs on; None: those that take plain token inputs
  # (every family but 'encoder_decoder').
  families: tuple[str, ...] | None = None


TASKS: dict[str, Task] = {}


def register(fmt: str, metrics: Sequence[str], default_metrics: Sequence[str] | None = None,
             needs_lm_head: bool = True, families: Sequence[str] | None = None):
  def wrap(fn):
    TASKS[fmt] = Task(fmt, fn, tuple(metrics), tuple(default_metrics or metrics), needs_lm_head,
                      tuple(families) if families else None)
    return fn
  return wrap


def chosen_metrics(task: Task, requested: Sequence[str] | None) -> tuple[str, ...]:
  if not requested:
    return task.default_metrics
  unknown = [m for m in requested if m not in task.metrics]
  if unknown:
    raise TaskError(f"--metrics: {unknown[0]!r} is not a metric of {task.fmt} data; choose from "
                    f"{', '.join(task.metrics)}")
  return tuple(requested)


def _where(example, i: int) -> str:
  """FILE:LINE of an example read by llmjax.data.formats, else its 1-based position."""
  return getattr(example, "source", "") or f"example {i + 1}"


def _encode(ctx: Context, ex, text: str, i: int, bos: bool = True) -> list[int]:
  """`text`'s ids as fine-tuning encodes it (with the tokenizer's BOS unless bos=False)."""
  from llmjax.data.chat import encode_plain
  try:
    if bos:
      return encode_text(ctx.scorer.tokenizer, text)
    return encode_plain(ctx.scorer.tokenizer, text)
  except ValueError as e:  # e.g. a character a char tokenizer never saw
    raise TaskError(f"{_where(ex, i)}: cannot encode with this run's tokenizer: {e}") from None


def _pick(metrics: dict, names: Sequence[str]) -> dict:
  return {n: metrics[n] for n in names}


# -- language modelling ----------------------------------------------------------------------------
@register("text", metrics=("loss", "perplexity", "bits_per_byte"))
def evaluate_text(ctx: Context, examples) -> Result:
  """Every token of every document scored given all preceding text that fits the context. The
  first token is scored after BOS or EOS (`document_prefix`); a tokenizer with neither (char,
  byte) leaves it unscored, and its bytes are not counted."""
  scorer, tokenizer = ctx.scorer, ctx.scorer.tokenizer
  prefix = document_prefix(tokenizer)
  requests, spans, counts, sizes = [], [], [], []
  for i, ex in enumerate(examples):  # every document's windows go into one batched call
    ids = _encode(ctx, ex, ex.text, i, bos=False)
    windows, n = scorer.rolling_requests(ids, prefix)
    spans.append((len(requests), len(requests) + len(windows)))
    requests.extend(windows)
    counts.append(n)
    scored_text = ex.text if prefix is not None else tokenizer.decode(ids[1:])
    sizes.append(len(scored_text.encode("utf-8")))
  results = scorer.loglikelihood(requests) if requests else []
  records = []
  for i, ((a, b), n, size) in enumerate(zip(spans, counts, sizes)):
    nll = -sum(ll for ll, _ in results[a:b])
    records.append({"index": i, "nll": nll, "tokens": n, "bytes": size})
  nats = sum(r["nll"] for r in records)
  tokens, nbytes = sum(counts), sum(sizes)
  if tokens == 0:
    raise TaskError("no token to score: every document is shorter than two tokens")
  loss = nats / tokens
  all_metrics = {"loss": loss, "perplexity": M.perplexity(loss),
                 "bits_per_byte": M.bits_per_byte(nats, nbytes)}
  out = _pick(all_metrics, chosen_metrics(TASKS["text"], ctx.options.metrics))
  out.update(tokens=tokens, bytes=nbytes)
  return Result(out, records)


# -- multiple choice -------------------------------------------------------------------------------
@register("multiple_choice", metrics=("acc", "acc_norm", "acc_bytes"))
def evaluate_multiple_choice(ctx: Context, examples) -> Result:
  """Log-likelihood of each choice given the prompt (prompt + choice, no separator: put a leading
  space in the choices when the text needs one). acc takes the highest sum; acc_norm divides by
  the choice's length in characters and acc_bytes by its UTF-8 bytes (lm-evaluation-harness's
  acc_norm and acc_bytes), so longer choices are not penalized for their length."""
  requests, spans = [], []
  for i, ex in enumerate(examples):
    if not 0 <= ex.answer < len(ex.choices):
      raise TaskError(f"{_where(ex, i)}: answer {ex.answer} is out of range for "
                      f"{len(ex.choices)} choices (0-based)")
    start = len(requests)
    for choice in ex.choices:
      try:
        requests.append(encode_pair(ctx.scorer.tokenizer, ex.prompt, choice))
      except ValueError as e:
        raise TaskError(f"{_where(ex, i)}: cannot encode with this run's tokenizer: {e}") from None
      if not requests[-1][1]:
        raise TaskError(f"{_where(ex, i)}: choice {choice!r} encodes to no tokens")
      prefix = document_prefix(ctx.scorer.tokenizer)
      if not requests[-1][0] and prefix is not None:  # an empty prompt: condition on BOS/EOS
        requests[-1] = ([prefix], requests[-1][1])
    spans.append((start, len(requests)))
  results = ctx.scorer.loglikelihood(requests)
  hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
  records = []
  for i, (ex, (a, b)) in enumerate(zip(examples, spans)):
    lls = np.asarray([ll for ll, _ in results[a:b]])
    chars = np.asarray([float(len(c)) for c in ex.choices])
    nbytes = np.asarray([float(len(c.encode("utf-8"))) for c in ex.choices])
    picks = {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / chars)),
             "acc_bytes": int(np.argmax(lls / nbytes))}
    for name, pick in picks.items():
      hits[name].append(float(pick == ex.answer))
    records.append({"index": i, "prediction": picks["acc"], "prediction_norm": picks["acc_norm"],
                    "answer": ex.answer, "correct": picks["acc"] == ex.answer,
                    "loglikelihoods": lls.tolist(),
                    "greedy": [g for _, g in results[a:b]]})
  all_metrics = {name: float(np.mean(v)) for name, v in hits.items()}
  return Result(_pick(all_metrics, chosen_metrics(TASKS["multiple_choice"], ctx.options.metrics)),
                records)


# -- prompt / completion ---------------------------------------------------------------------------
@register("prompt_completion", metrics=tuple(M.TEXT_METRICS),
          default_metrics=("exact_match", "f1", "bleu", "rougeL"))
def evaluate_prompt_completion(ctx: Context, examples) -> Result:
  """Generates a completion for each prompt (greedy, or sampled with a seed; stopped at EOS and
  the --stop strings) and scores it against the reference completion."""
  prompts = [_encode(ctx, ex, ex.prompt, i) for i, ex in enumerate(examples)]
  return _generate_and_score(ctx, "prompt_completion", prompts, [ex.completion for ex in examples],
                             [ex.prompt for ex in examples], ctx.options.stop)


def _generate_and_score(ctx: Context, fmt: str, prompts: list[list[int]], references: list[str],
                        shown: list[str], stop: Sequence[str]) -> Result:
  o = ctx.options
  names = chosen_metrics(TASKS[fmt], o.metrics)
  texts = ctx.scorer.generate(prompts, o.max_new_tokens, stop=stop, temperature=o.temperature,
                              top_k=o.top_k, top_p=o.top_p, seed=o.seed)
  refs = [[r] for r in references]
  records = [{"index": i, "prompt": p, "prediction": text, "reference": ref[0],
              "exact_match": M.exact_match_one(text, ref), "f1": M.token_f1_one(text, ref)}
             for i, (p, text, ref) in enumerate(zip(shown, texts, refs))]
  return Result(M.text_metrics(texts, refs, names), records)


# -- chat ------------------------------------------------------------------------------------------
@register("chat", metrics=tuple(M.TEXT_METRICS), default_metrics=("exact_match", "f1", "bleu", "rougeL"))
def evaluate_chat(ctx: Context, examples) -> Result:
  """The last message of each chat must be the assistant's: the model writes that turn, given
  every earlier message rendered with the run's chat template and its generation prompt (as
  fine-tuning rendered them), and the reply is scored against it like a completion. With no EOS
  token (char/byte tokenizers) the default template ends a turn with a newline, which is then
  where replies stop unless --stop says otherwise."""
  from llmjax.data.chat import ChatFormatter, encode_plain
  formatter = ChatFormatter(ctx.scorer.tokenizer)
  prompts, references, shown = [], [], []
  for i, ex in enumerate(examples):
    role, content = ex.messages[-1]
    if role != "assistant" or len(ex.messages) < 2:
      raise TaskError(f"{_where(ex, i)}: a chat to evaluate must end with an assistant message "
                      "(the reference reply) after at least one other message")
    text = formatter.render(ex.messages[:-1], add_generation_prompt=True)
    try:
      prompts.append(encode_plain(ctx.scorer.tokenizer, text))
    except ValueError as e:
      raise TaskError(f"{_where(ex, i)}: cannot encode with this run's tokenizer: {e}") from None
    references.append(content)
    shown.append(text)
  stop = ctx.options.stop
  if not stop and ctx.scorer.tokenizer.eos_id is None and formatter.is_default:
    stop = ["\n"]
  return _generate_and_score(ctx, "chat", prompts, references, shown, stop)


# -- classification --------------------------------------------------------------------------------
@register("classification", metrics=("accuracy", "macro_f1", "confusion_matrix"),
          needs_lm_head=False)
def evaluate_classification(ctx: Context, examples) -> Result:
  """The run's classification head on each text, encoded and laid out as fine-tuning did
  (llmjax.data.task_data.Encoder, the run's data.truncate; over-long texts are cut rather than
  dropped, so every example gets a prediction). Labels are the run's saved mapping; macro-F1
  averages per-label F1 over the labels that occur as references or predictions."""
  import copy

  from llmjax.data import task_data
  labels = task_data.read_labels(ctx.workdir)
  if not labels:
    raise TaskError(f"{ctx.workdir} has no {task_data.LABELS_FILE}: it was not fine-tuned for "
                    "classification by llmjax")
  data_config = copy.deepcopy(ctx.run.config.data)
  if data_config.truncate not in ("left", "right"):
    data_config.truncate = "right"
  encoder = task_data.Encoder(ctx.scorer.tokenizer, data_config, classification=True)
  stats = task_data.EncodeStats()
  tokenized = []
  for i, ex in enumerate(examples):
    if ex.label not in labels:
      raise TaskError(f"{_where(ex, i)}: label {ex.label!r} was never seen in training; the run "
                      f"knows {', '.join(labels)}")
    try:
      t = encoder.encode(ex, stats, labels[ex.label])
    except ValueError as e:
      raise TaskError(f"{_where(ex, i)}: cannot encode with this run's tokenizer: {e}") from None
    if t is None:
      raise TaskError(f"{_where(ex, i)}: the text encodes to no tokens")
    tokenized.append(t)
  if stats.truncated:
    print(f"llmjax: note: {stats.truncated} texts were longer than data.seq_len="
          f"{data_config.seq_len} and were cut ({data_config.truncate})", file=sys.stderr)
  logits = ctx.scorer.classify(tokenized, data_config.seq_len)
  names = list(labels)
  predicted = [names[int(k)] for k in np.argmax(logits, axis=-1)]
  truth = [ex.label for ex in examples]
  all_metrics = {"accuracy": M.accuracy(predicted, truth), "macro_f1": M.macro_f1(predicted, truth),
                 "confusion_matrix": {"labels": names,
                                      "counts": M.confusion_matrix(predicted, truth, names)}}
  records = [{"index": i, "prediction": p, "label": y, "correct": p == y,
              "logits": [float(v) for v in row]}
             for i, (p, y, row) in enumerate(zip(predicted, truth, logits))]
  return Result(_pick(all_metrics, chosen_metrics(TASKS["classification"], ctx.options.metrics)),
                records)


def finite(metrics: dict) -> dict:
  """JSON has no NaN: metrics that are undefined (e.g. no examples) become null."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


# issue 11: encoder-decoder tasks register themselves here.
from llmjax.eval import seq2seq_task  # noqa: E402,F401
