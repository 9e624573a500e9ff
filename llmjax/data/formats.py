"""Task examples from JSON Lines, Parquet or a local Hugging Face `datasets` directory.

One example per line (row). Its format follows from its keys, or is forced by `data.format`:

    text               {"text": str}                                  language modelling
    prompt_completion  {"prompt": str, "completion": str}             SFT / generation tasks
    chat               {"messages": [{"role": str, "content": str}, ...]}
    classification     {"text": str, "label": str | int}
    multiple_choice    {"prompt": str, "choices": [str, ...], "answer": int | str}

Extra keys are allowed and ignored. Detection picks the format whose required keys are all present
and which requires the most of them ({"text", "label"} is classification, not text); one file holds
one format. Other issues add formats with `register_format` (preference: prompt/chosen/rejected;
seq2seq: source/target).

`read_examples(path, format)` -> ExampleSet(format, examples). Every problem is a one-line
`DataError` starting with `FILE:LINE:` (Parquet / datasets rows count from 1 like lines).

`batch_fields(data_config)` says which arrays the data layer's batches carry, so the objectives'
`batch_spec` and the batches always agree.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmjax.data.sources import DataError

TRAIN_ON = ("completion", "all", "last_turn")
TRUNCATE = ("right", "left", "drop", "none")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CHAT_ROLES = ("system", "user", "assistant", "tool")


# -- example types ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextExample:
  text: str
  source: str = ""            # "FILE:LINE", for error messages


@dataclasses.dataclass(frozen=True)
class PromptCompletion:
  prompt: str
  completion: str
  source: str = ""


@dataclasses.dataclass(frozen=True)
class ChatExample:
  messages: tuple             # of (role, content) pairs
  source: str = ""


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
  text: str
  label: str                  # always a string: int labels are kept as their decimal text
  source: str = ""


@dataclasses.dataclass(frozen=True)
class MultipleChoiceExample:
  prompt: str
  choices: tuple
  answer: int                 # index into choices
  source: str = ""


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
  name: str
  keys: tuple                 # required keys (all present -> candidate)
  parse: Callable             # (record: dict, where: str) -> example; raises DataError


FORMATS: dict[str, ExampleFormat] = {}


def register_format(name: str, keys: tuple, parse: Callable) -> None:
  """Adds an example format (detected when all `keys` are present)."""
  FORMATS[name] = ExampleFormat(name, tuple(keys), parse)


def _string(record: dict, key: str, where: str) -> str:
  value = record[key]
  if not isinstance(value, str):
    raise DataError(f"{where}: key {key!r} must be a string, got {type(value).__name__}; "
                    "fix the example")
  return value


def _text(record, where):
  return TextExample(_string(record, "text", where), where)


def _prompt_completion(record, where):
  return PromptCompletion(_string(record, "prompt", where), _string(record, "completion", where),
                          where)


def _chat(record, where):
  messages = record["messages"]
  if not isinstance(messages, (list, tuple)) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} "
                    "objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    if m["role"] not in CHAT_ROLES:
      raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; use one of "
                      f"{', '.join(CHAT_ROLES)}")
    if not isinstance(m["content"], str):
      raise DataError(f"{where}: messages[{i}].content must be a string, got "
                      f"{type(m['content']).__name__}")
    out.append((m["role"], m["content"]))
  return ChatExample(tuple(out), where)


def _classification(record, where):
  label = record["label"]
  if isinstance(label, bool) or not isinstance(label, (str, int, np.integer)):
    raise DataError(f"{where}: 'label' must be a string or an integer, got "
                    f"{type(label).__name__}")
  return ClassificationExample(_string(record, "text", where), str(label), where)


def _multiple_choice(record, where):
  choices = record["choices"]
  if (not isinstance(choices, (list, tuple)) or len(choices) < 2
      or not all(isinstance(c, str) for c in choices)):
    raise DataError(f"{where}: 'choices' must be a list of at least two strings")
  answer = record["answer"]
  if isinstance(answer, str) and not answer.lstrip("-").isdigit():
    if answer not in choices:
      raise DataError(f"{where}: 'answer' {answer!r} is not one of the choices; give its index "
                      "(0-based) or the exact choice text")
    answer = list(choices).index(answer)
  elif isinstance(answer, bool) or not isinstance(answer, (int, np.integer, str)):
    raise DataError(f"{where}: 'answer' must be a choice index, got {type(answer).__name__}")
  answer = int(answer)
  if not 0 <= answer < len(choices):
    raise DataError(f"{where}: 'answer' {answer} is out of range for {len(choices)} choices "
                    f"(0..{len(choices) - 1})")
  return MultipleChoiceExample(_string(record, "prompt", where), tuple(choices), answer, where)


@dataclasses.dataclass(frozen=True)
class Seq2SeqExample:
  """Issue 11: translation / summarization pairs for encoder-decoders (llmjax/data/seq2seq.py)."""
  source: str
  target: str
  where: str = ""


def _seq2seq(record, where):
  return Seq2SeqExample(_string(record, "source", where), _string(record, "target", where), where)


register_format("text", ("text",), _text)
register_format("prompt_completion", ("prompt", "completion"), _prompt_completion)
register_format("chat", ("messages",), _chat)
register_format("classification", ("text", "label"), _classification)
register_format("multiple_choice", ("prompt", "choices", "answer"), _multiple_choice)
register_format("seq2seq", ("source", "target"), _seq2seq)


def detect_format(record: dict, where: str) -> str:
  """The format whose required keys are all present, preferring the one that requires most."""
  candidates = [f for f in FORMATS.values() if all(k in record for k in f.keys)]
  if not candidates:
    expected = "; ".join(f"{f.name}: {', '.join(f.keys)}" for f in FORMATS.values())
    raise DataError(f"{where}: keys {sorted(record)} match no example format ({expected}); "
                    "rename the keys or set data.format")
  best = max(len(f.keys) for f in candidates)
  top = [f.name for f in candidates if len(f.keys) == best]
  if len(top) > 1:
    raise DataError(f"{where}: keys {sorted(record)} fit several formats ({', '.join(top)}); "
                    "set data.format")
  return top[0]


# -- reading ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExampleSet:
  format: str
  examples: list
  path: str


def is_hf_dataset_dir(path: str | os.PathLike) -> bool:
  p = Path(path)
  return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                         or (p / "dataset_dict.json").exists())


def is_task_path(path: str) -> bool:
  """True for files read as task examples (JSON Lines, Parquet, HF datasets directories)."""
  if not path:
    return False
  return path.lower().endswith(JSON_SUFFIXES + PARQUET_SUFFIXES) or is_hf_dataset_dir(path)


def _json_records(path: str):
  try:
    handle = open(path, encoding="utf-8")
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror}); check data.path / data.val_path") from None
  with handle:
    for lineno, line in enumerate(handle, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); one "
                        "JSON object per line") from None
      except UnicodeDecodeError:
        raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
      yield lineno, record


def _optional(module: str, path: str):
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError:
    raise DataError(f"{path}: reading it needs the {module.split('.')[0]} package; "
                    "pip install 'llmjax[data]'") from None


def _parquet_records(path: str):
  pq = _optional("pyarrow.parquet", path)
  try:
    table = pq.read_table(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
    raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
  for i, record in enumerate(table.to_pylist(), 1):
    yield i, record


def _hf_records(path: str):
  datasets = _optional("datasets", path)
  p = Path(path)
  if (p / "dataset_dict.json").exists():
    splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
    raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; point data.path / "
                    f"data.val_path at one split's directory, e.g. {p / (splits[0] if splits else 'train')}")
  try:
    ds = datasets.load_from_disk(str(p))
  except Exception as e:  # noqa: BLE001
    raise DataError(f"{path}: not a dataset saved with save_to_disk ({type(e).__name__})") from None
  for i, record in enumerate(ds, 1):
    yield i, record


def records(path: str):
  """(line or row number, dict) for every example of a task file."""
  if is_hf_dataset_dir(path):
    yield from _hf_records(path)
  elif path.lower().endswith(PARQUET_SUFFIXES):
    yield from _parquet_records(path)
  elif path.lower().endswith(JSON_SUFFIXES):
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such file; check data.path / data.val_path")
    yield from _json_records(path)
  else:
    raise DataError(f"{path}: not a task file; use JSON Lines (.jsonl), Parquet (.parquet) or a "
                    "directory written by datasets' save_to_disk")


def read_examples(path: str, format: str = "auto") -> ExampleSet:
  """All examples of `path` in one format (`format`, or detected from the first example)."""
  if format != "auto" and format not in FORMATS:
    raise DataError(f"data.format={format!r} is not one of auto, {', '.join(FORMATS)}")
  fixed = format if format != "auto" else None
  first_where = None
  examples = []
  for lineno, record in records(path):
    where = f"{path}:{lineno}"
    if not isinstance(record, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fixed is None:
      fixed, first_where = detect_format(record, where), where
    elif format == "auto":
      found = detect_format(record, where)
      if found != fixed:
        raise DataError(f"{where}: a {found} example, but the file's first example "
                        f"({first_where}) is {fixed}; keep one format per file")
    missing = [k for k in FORMATS[fixed].keys if k not in record]
    if missing:
      raise DataError(f"{where}: missing key(s) {', '.join(missing)} for data.format={fixed}")
    examples.append(FORMATS[fixed].parse(record, where))
  if not examples:
    raise DataError(f"{path}: no examples (the file is empty); give at least one example")
  return ExampleSet(fixed, examples, path)


# -- what batches carry ----------------------------------------------------------------------------
def batch_fields(data_config) -> dict[str, Any]:
  """{array name: dtype} of the [batch, seq_len] arrays the data layer delivers for this config.

  Raw text / token files: inputs, targets (+ segment_ids, positions with data.packing).
  Task files: rows built from examples always carry weights (float32 per-token loss weights,
  0 on prompts and padding), segment_ids (0 on padding) and positions (restarting per example)."""
  fields = {"inputs": np.int32, "targets": np.int32}
  if is_task_path(data_config.path):
    fields.update(weights=np.float32, segment_ids=np.int32, positions=np.int32)
  elif data_config.packing:
    fields.update(segment_ids=np.int32, positions=np.int32)
  return fields


# Formats other modules define (they call register_format on import).
from llmjax.data import preference  # noqa: E402,F401  (issue 10: {"prompt","chosen","rejected"})
