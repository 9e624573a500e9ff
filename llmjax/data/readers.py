"""Documents out of corpus files, in work units ("tasks") that tokenizer processes take in parallel.

Formats: plain text (one file = one document), JSON Lines (one document per line, the text under a
configurable key), Parquet (one document per row of a string column) and local Hugging Face
`datasets` directories (`Dataset.save_to_disk`: Arrow stream files listed in state.json). Text and
JSON Lines may be gzip- or zstd-compressed (.gz, .zst).

A task is a deterministic slice of one file (a byte range of an uncompressed file cut at newlines, a
Parquet row group, an Arrow file); the list of tasks depends only on the files, never on how many
processes read them, so the prepared output does not depend on the worker count either.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator

from llmjax.data.sources import DataError

CHUNK_BYTES = 8 << 20  # uncompressed text/JSONL is cut into tasks of about this many bytes
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
JSONL = (".jsonl", ".json", ".ndjson")
HF_STATE = "state.json"


@dataclasses.dataclass(frozen=True)
class Task:
  path: str
  kind: str          # 'text' | 'jsonl' | 'parquet' | 'arrow'
  compression: str   # '' | 'gzip' | 'zstd'
  start: int = 0     # byte range (uncompressed text/jsonl) or row group index (parquet)
  end: int = -1      # -1: to the end of the file
  last: bool = True  # text: this task ends the file's document
  size: int = 0      # input bytes (for the progress bar's MB/s and ETA)
  name: str = ""     # the path relative to the directory all inputs share (see plan_tasks)

  @property
  def key(self) -> str:
    """Names the task in hashes that pick validation documents (independent of worker count, and
    of where the corpus lies or how its path was spelled: relative names, not paths)."""
    return f"{self.name or self.path}|{self.start}"

  @property
  def doc_key(self) -> str:
    """Text files: every chunk of a file belongs to the file's one document."""
    return (self.name or self.path) if self.kind == "text" else self.key


def _optional(module: str, what: str):
  """pyarrow / zstandard are needed only for some inputs: a missing one is a one-line error."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError:
    raise DataError(f"{what} needs the `{module.split('.')[0]}` package: pip install "
                    "llmjax[data]") from None


def _kind(path: str) -> tuple[str, str]:
  name = path.lower()
  compression = ""
  for suffix, algo in COMPRESSED.items():
    if name.endswith(suffix):
      compression, name = algo, name[: -len(suffix)]
  if name.endswith(JSONL):
    return "jsonl", compression
  if name.endswith(".parquet"):
    if compression:
      raise DataError(f"{path}: a compressed Parquet file; Parquet compresses itself, "
                      "decompress the file first")
    return "parquet", ""
  return "text", compression


def expand_inputs(patterns: list[str]) -> list[str]:
  """Sorted files and Hugging Face dataset directories matched by the patterns (each must match)."""
  out = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    found = [m for m in matches if os.path.isfile(m) or _is_hf_dataset(m)]
    if not found and any(os.path.isdir(m) for m in matches):
      for m in matches:
        if os.path.isdir(m) and os.path.exists(os.path.join(m, "dataset_dict.json")):
          raise DataError(f"{m} is a DatasetDict; give one split's directory, e.g. {m}/train")
      raise DataError(f"--input={pattern!r} matches only directories that are not Hugging Face "
                      "datasets saved with save_to_disk; give files or a glob such as 'dir/**/*.txt'")
    if not found:
      raise DataError(f"--input={pattern!r} matches no file; give an existing file, glob or "
                      "dataset directory")
    out.extend(m for m in found if m not in out)
  return out


def _is_hf_dataset(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, HF_STATE))


def source_size(path: str) -> int:
  if _is_hf_dataset(path):
    return sum(os.path.getsize(f) for f in _arrow_files(path))
  return os.path.getsize(path)


def _arrow_files(directory: str) -> list[str]:
  state = json.loads(Path(directory, HF_STATE).read_text())
  return [os.path.join(directory, f["filename"]) for f in state.get("_data_files", [])]


def plan_tasks(sources: list[str], text_key: str, chunk_bytes: int = CHUNK_BYTES) -> list[Task]:
  """The work units for `sources`, checking every column/format that can be checked up front.

  Each task is named by its file's path relative to the directory all sources share, so that the
  validation split (a hash of those names) is the same wherever the corpus is and whether the
  --input globs were relative or absolute."""
  tasks = _plan_tasks(sources, text_key, chunk_bytes)
  absolute = [os.path.abspath(t.path) for t in tasks]
  root = os.path.commonpath([os.path.dirname(a) for a in absolute])
  return [dataclasses.replace(t, name=os.path.relpath(a, root)) for t, a in zip(tasks, absolute)]


def _plan_tasks(sources: list[str], text_key: str, chunk_bytes: int) -> list[Task]:
  tasks = []
  for path in sources:
    if _is_hf_dataset(path):
      files = _arrow_files(path)
      if not files:
        raise DataError(f"{path}: state.json lists no data files; save the dataset again")
      for f in files:
        _check_arrow_column(f, text_key)
        tasks.append(Task(f, "arrow", "", size=os.path.getsize(f)))
      continue
    kind, compression = _kind(path)
    if kind == "parquet":
      pq = _optional("pyarrow.parquet", f"{path} (Parquet)")
      try:
        pf = pq.ParquetFile(path)
      except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
      names = pf.schema_arrow.names
      if text_key not in names:
        raise DataError(f"{path} has no column {text_key!r} (columns: {', '.join(names)}); "
                        "pass --text_key=<column>")
      tasks.extend(Task(path, "parquet", "", g, g + 1, size=pf.metadata.row_group(g).total_byte_size)
                   for g in range(pf.num_row_groups))
      continue
    size = os.path.getsize(path)
    if compression or size <= chunk_bytes:
      tasks.append(Task(path, kind, compression, size=size))
      continue
    bounds = _newline_bounds(path, size, chunk_bytes)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      tasks.append(Task(path, kind, "", lo, hi, last=i == len(bounds) - 2, size=hi - lo))
  return tasks


def _newline_bounds(path: str, size: int, chunk_bytes: int) -> list[int]:
  """Offsets just after a newline near each multiple of chunk_bytes (so no line and no UTF-8
  character is ever split between tasks)."""
  bounds = [0]
  with open(path, "rb") as f:
    pos = chunk_bytes
    while pos < size:
      f.seek(pos)
      while True:
        block = f.read(1 << 16)
        if not block:
          pos = size
          break
        nl = block.find(b"\n")
        if nl >= 0:
          pos = f.tell() - len(block) + nl + 1
          break
      if pos >= size:
        break
      bounds.append(pos)
      pos += chunk_bytes
  bounds.append(size)
  return bounds


def _check_arrow_column(path: str, text_key: str) -> None:
  pa = _optional("pyarrow", f"{path} (a Hugging Face dataset)")
  try:
    with pa.memory_map(path) as source:
      names = pa.ipc.open_stream(source).schema.names
  except Exception as e:  # noqa: BLE001
    raise DataError(f"{path} is not a readable Arrow stream file ({e})") from None
  if text_key not in names:
    raise DataError(f"{path} has no column {text_key!r} (columns: {', '.join(names)}); "
                    "pass --text_key=<column>")


def _open_binary(task: Task):
  if task.compression == "gzip":
    return gzip.open(task.path, "rb")
  if task.compression == "zstd":
    zstandard = _optional("zstandard", f"{task.path} (zstd)")
    return zstandard.ZstdDecompressor().stream_reader(open(task.path, "rb"), closefd=True)
  f = open(task.path, "rb")
  f.seek(task.start)
  return f


def _byte_chunks(task: Task, block: int = 4 << 20) -> Iterator[bytes]:
  """The task's bytes in blocks that end at a newline (or the end of the input)."""
  remaining = task.end - task.start if task.end >= 0 else -1
  with _open_binary(task) as f:
    carry = b""
    while True:
      n = block if remaining < 0 else min(block, remaining)
      data = f.read(n) if n else b""
      if remaining >= 0:
        remaining -= len(data)
      if not data:
        if carry:
          yield carry
        return
      data = carry + data
      cut = data.rfind(b"\n") + 1
      if cut == 0:
        carry = data
        continue
      carry = data[cut:]
      yield data[:cut]


def documents(task: Task, text_key: str) -> Iterator[tuple[str, bool]]:
  """(text, ends_document) pieces of the task in file order. Text files yield several pieces of
  one document; every other format yields whole documents."""
  if task.kind == "text":
    pieces = _byte_chunks(task)
    prev = next(pieces, None)
    if prev is None:
      yield "", task.last  # an empty file is an (empty) document
    while prev is not None:
      nxt = next(pieces, None)
      yield _decode(prev, task), nxt is None and task.last
      prev = nxt
    return
  if task.kind == "jsonl":
    yield from _jsonl_documents(task, text_key)
    return
  if task.kind == "parquet":
    import pyarrow.parquet as pq
    table = pq.ParquetFile(task.path).read_row_group(task.start, columns=[text_key])
    yield from _column_documents(table.column(text_key), task)
    return
  import pyarrow as pa
  with pa.memory_map(task.path) as source:
    for batch in pa.ipc.open_stream(source):
      yield from _column_documents(batch.column(batch.schema.get_field_index(text_key)), task)


def _decode(data: bytes, task: Task) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{task.path}: not UTF-8 text near byte {task.start + e.start} "
                    f"(of the {'decompressed ' if task.compression else ''}file); convert it to "
                    "UTF-8") from None


def _column_documents(column, task: Task) -> Iterator[tuple[str, bool]]:
  for value in column.to_pylist():
    if value is None:
      continue  # a null row holds no document
    if not isinstance(value, str):
      raise DataError(f"{task.path}: column values are {type(value).__name__}, not text; "
                      "pass --text_key=<a string column>")
    yield value, True


def _jsonl_documents(task: Task, text_key: str) -> Iterator[tuple[str, bool]]:
  lineno = 0  # within the task; the file's line number is computed only for an error message
  for block in _byte_chunks(task):
    for raw in io.BytesIO(block):
      lineno += 1
      line = raw.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{task.path}:{_file_line(task, lineno)}: not a JSON object; fix or drop "
                        "the line") from None
      if not isinstance(record, dict) or text_key not in record:
        raise DataError(f"{task.path}:{_file_line(task, lineno)}: no {text_key!r} key; pass "
                        "--text_key=<the field holding the text>")
      text = record[text_key]
      if not isinstance(text, str):
        raise DataError(f"{task.path}:{_file_line(task, lineno)}: {text_key!r} is "
                        f"{type(text).__name__}, not a string")
      yield text, True


def _file_line(task: Task, lineno: int) -> int:
  """Line number in the whole file: counts the newlines before the task's first byte."""
  if task.start == 0:
    return lineno
  before = 0
  with open(task.path, "rb") as f:
    remaining = task.start
    while remaining:
      block = f.read(min(remaining, 1 << 22))
      before += block.count(b"\n")
      remaining -= len(block)
  return before + lineno
