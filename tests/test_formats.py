"""Task examples (llmjax/data/formats.py): format detection by keys, typed examples, the readers
(JSON Lines, Parquet, HF datasets save_to_disk directories) and their one-line FILE:LINE errors."""
import json

import pytest

from llmjax.data import DataError
from llmjax.data import formats as fm


def write_jsonl(path, records, raw_lines=()):
  lines = [json.dumps(r) for r in records] + list(raw_lines)
  path.write_text("\n".join(lines) + "\n")
  return str(path)


RECORDS = {
    "text": {"text": "hello"},
    "prompt_completion": {"prompt": "1+1=", "completion": "2", "id": 7},
    "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "classification": {"text": "good film", "label": "pos"},
    "multiple_choice": {"prompt": "2+2=", "choices": ["3", "4"], "answer": 1},
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_format_detected_from_keys(tmp_path, name):
  path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[name]] * 2)
  got = fm.read_examples(path)
  assert got.format == name and len(got.examples) == 2
  assert got.examples[1].source == f"{path}:2"


def test_typed_examples(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [RECORDS["chat"]])
  (ex,) = fm.read_examples(path).examples
  assert ex.messages == (("user", "hi"), ("assistant", "yo"))
  path = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 3}])
  assert fm.read_examples(path).examples[0].label == "3"
  path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "choices": ["x", "y"], "answer": "y"}])
  assert fm.read_examples(path).examples[0].answer == 1
  # a forced format reads {"text", "label"} records as plain text
  path = write_jsonl(tmp_path / "t.jsonl", [RECORDS["classification"]])
  assert fm.read_examples(path, "text").examples[0] == fm.TextExample("good film", f"{path}:1")


@pytest.mark.parametrize("records,raw,message", [
    ([{"text": "a"}], ["{not json"], r"d.jsonl:2: malformed JSON"),
    ([{"prompt": "a"}], [], r"d.jsonl:1: keys \['prompt'\] match no example format"),
    ([{"prompt": "a", "completion": 3}], [], r"d.jsonl:1: key 'completion' must be a string"),
    ([{"text": "a"}, {"prompt": "p", "completion": "c"}], [],
     r"d.jsonl:2: a prompt_completion example, but the file's first example \(.*d.jsonl:1\) is text"),
    ([{"prompt": "p", "choices": ["a", "b"], "answer": 2}], [],
     r"d.jsonl:1: 'answer' 2 is out of range for 2 choices"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], [], r"d.jsonl:1: messages\[0\] has role 'bot'"),
    ([{"text": "x", "label": 1.5}], [], r"d.jsonl:1: 'label' must be a string or an integer"),
    ([[1, 2]], [], r"d.jsonl:1: expected a JSON object"),
])
def test_bad_examples_are_one_line_errors(tmp_path, records, raw, message):
  path = write_jsonl(tmp_path / "d.jsonl", records, raw)
  with pytest.raises(DataError, match=message) as e:
    fm.read_examples(path)
  assert "\n" not in str(e.value)


def test_empty_and_missing_files(tmp_path):
  (tmp_path / "e.jsonl").write_text("\n\n")
  with pytest.raises(DataError, match="e.jsonl: no examples"):
    fm.read_examples(str(tmp_path / "e.jsonl"))
  with pytest.raises(DataError, match="no such file"):
    fm.read_examples(str(tmp_path / "missing.jsonl"))
  path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
  with pytest.raises(DataError, match="p.jsonl:1: missing key\\(s\\) completion for "
                     "data.format=prompt_completion"):
    fm.read_examples(path, "prompt_completion")


def test_parquet_and_hf_datasets_dirs(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(3)]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
  got = fm.read_examples(str(tmp_path / "d.parquet"))
  assert got.format == "prompt_completion" and got.examples[2].completion == "3"
  assert got.examples[2].source.endswith("d.parquet:3")
  (tmp_path / "bad.parquet").write_text("nope")
  with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
    fm.read_examples(str(tmp_path / "bad.parquet"))

  datasets = pytest.importorskip("datasets")
  ds = datasets.Dataset.from_list([{"text": "great", "label": "pos"}, {"text": "bad", "label": "neg"}])
  ds.save_to_disk(str(tmp_path / "hf"))
  assert fm.is_task_path(str(tmp_path / "hf"))
  got = fm.read_examples(str(tmp_path / "hf"))
  assert got.format == "classification" and [e.label for e in got.examples] == ["pos", "neg"]
  datasets.DatasetDict(train=ds, validation=ds).save_to_disk(str(tmp_path / "dd"))
  with pytest.raises(DataError, match="a DatasetDict with splits train, validation"):
    fm.read_examples(str(tmp_path / "dd"))
  assert fm.read_examples(str(tmp_path / "dd" / "validation")).format == "classification"


def test_batch_fields_follow_the_data(tmp_path):
  from llmjax import config as cfglib
  d = cfglib.default_config().data
  assert set(fm.batch_fields(d)) == {"inputs", "targets"}
  d.path = str(tmp_path / "x.jsonl")
  assert set(fm.batch_fields(d)) == {"inputs", "targets", "weights", "segment_ids", "positions"}
