"""Task metrics: pure functions of predictions and references, on the host. Nothing downloads.

Scales follow each metric's usual convention: exact match, token F1, accuracy, macro-F1 and ROUGE
are fractions in [0, 1]; BLEU and chrF are on sacrebleu's 0-100 scale.

Text metrics take `predictions: list[str]` and `references: list[list[str]]` (one or more
references per prediction; an example scores against its best reference, as SQuAD does), and are
listed by name in TEXT_METRICS, which `python -m llmjax.evaluate --metrics=...` chooses from.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Callable, Hashable, Sequence

# -- SQuAD-style answer normalization --------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower case, no punctuation, no articles (a, an, the), single spaces: the SQuAD v1.1 rule."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_one(prediction: str, references: Sequence[str]) -> float:
  """1.0 if the normalized prediction equals some normalized reference."""
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(r) for r in references))


def token_f1_one(prediction: str, references: Sequence[str]) -> float:
  """The best token-overlap F1 against the references, on normalized whitespace tokens. When
  either side has no tokens, F1 is 1 if both have none, else 0 (as the SQuAD v2 script)."""
  pred = normalize_answer(prediction).split()
  best = 0.0
  for reference in references:
    ref = normalize_answer(reference).split()
    if not pred or not ref:
      best = max(best, float(pred == ref))
      continue
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common:
      precision, recall = common / len(pred), common / len(ref)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


def _mean(values: Sequence[float]) -> float:
  return float(sum(values) / len(values)) if values else float("nan")


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  return _mean([exact_match_one(p, r) for p, r in zip(predictions, references, strict=True)])


def token_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  return _mean([token_f1_one(p, r) for p, r in zip(predictions, references, strict=True)])


# -- sacrebleu: BLEU and chrF ----------------------------------------------------------------------
def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
  """sacrebleu wants one stream per reference position; None marks a missing reference (examples
  may have different numbers of references)."""
  most = max((len(r) for r in references), default=1)
  return [[r[i] if i < len(r) else None for r in references] for i in range(most)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]],
         tokenize: str = "13a") -> float:
  """Corpus BLEU (sacrebleu defaults: 4-grams, exponential smoothing). `tokenize`: '13a' (the
  WMT default), 'intl' (splits on Unicode punctuation and symbols: for text not in Latin script),
  or any other sacrebleu tokenizer name."""
  import sacrebleu
  return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references),
                                     tokenize=tokenize).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus chrF (character 6-grams, beta 2), sacrebleu's implementation."""
  import sacrebleu
  return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


# -- rouge-score: ROUGE-1/2/L ----------------------------------------------------------------------
def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]],
          rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
          use_stemmer: bool = False) -> dict[str, float]:
  """Mean per-example ROUGE F-measure for each type (best reference per example), as
  rouge-score computes it (its default tokenizer: lower case, ASCII letters and digits)."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
  sums = dict.fromkeys(rouge_types, 0.0)
  for prediction, refs in zip(predictions, references, strict=True):
    scores = scorer.score_multi(list(refs), prediction)
    for kind in rouge_types:
      sums[kind] += scores[kind].fmeasure
  n = len(predictions)
  return {kind: (total / n if n else float("nan")) for kind, total in sums.items()}


def _rouge_one(kind: str) -> Callable:
  return lambda predictions, references: rouge(predictions, references, (kind,))[kind]


# name -> (predictions, references) -> float
TEXT_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "bleu": bleu,
    "bleu_intl": lambda p, r: bleu(p, r, tokenize="intl"),
    "chrf": chrf,
    "rouge1": _rouge_one("rouge1"),
    "rouge2": _rouge_one("rouge2"),
    "rougeL": _rouge_one("rougeL"),
}


def text_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                 names: Sequence[str]) -> dict[str, float]:
  unknown = [n for n in names if n not in TEXT_METRICS]
  if unknown:
    raise ValueError(f"unknown text metric {unknown[0]!r}; choose from {', '.join(TEXT_METRICS)}")
  rouge_names = [n for n in names if n.startswith("rouge")]
  out = {}
  if rouge_names:  # one scorer pass for all ROUGE types
    out.update(rouge(predictions, references, tuple(rouge_names)))
  for name in names:
    if name not in out:
      out[name] = TEXT_METRICS[name](predictions, references)
  return {name: out[name] for name in names}


# -- classification --------------------------------------------------------------------------------
def accuracy(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
  return _mean([float(p == y) for p, y in zip(predictions, labels, strict=True)])


def confusion_matrix(predictions: Sequence[Hashable], labels: Sequence[Hashable],
                     classes: Sequence[Hashable]) -> list[list[int]]:
  """counts[i][j]: examples whose true label is classes[i] and prediction classes[j]."""
  index = {c: i for i, c in enumerate(classes)}
  counts = [[0] * len(classes) for _ in classes]
  for p, y in zip(predictions, labels, strict=True):
    counts[index[y]][index[p]] += 1
  return counts


def macro_f1(predictions: Sequence[Hashable], labels: Sequence[Hashable],
             classes: Sequence[Hashable] | None = None) -> float:
  """The unweighted mean of per-class F1 over `classes` (default: every class that occurs as a
  label or a prediction, as scikit-learn's f1_score(average='macro')). A class with no true and
  no predicted example scores 0."""
  if classes is None:
    classes = sorted(set(labels) | set(predictions), key=repr)
  counts = confusion_matrix(predictions, labels, classes)
  scores = []
  for i in range(len(classes)):
    tp = counts[i][i]
    predicted = sum(row[i] for row in counts)
    actual = sum(counts[i])
    scores.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
  return _mean(scores)


# -- language modelling ----------------------------------------------------------------------------
def perplexity(loss: float) -> float:
  """exp(mean token cross-entropy in nats), capped so a diverged model gives a large finite value."""
  return math.exp(min(loss, 80.0))


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
  """Summed cross-entropy in nats over the UTF-8 bytes of the text it covers, in bits per byte:
  comparable across tokenizers (the Pile / lm-evaluation-harness word_perplexity family)."""
  return total_nats / (math.log(2) * max(total_bytes, 1))
