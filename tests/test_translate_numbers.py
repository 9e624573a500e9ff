"""experiments/translate_numbers.py: the offline English -> French number-words demo.

The fast tests check the corpus (num2words pairs, train/val/test disjoint, test = held-out ranges
of one hundred). The slow test trains the experiment as configured and requires BLEU >= 90 on
the held-out numbers through `python -m llmjax.evaluate` (README shows its figures)."""
import json

import pytest

from conftest import run_cli
from llmjax.experiment import load_module

pytest.importorskip("num2words")


def _experiment():
  return load_module("translate_numbers")


def test_corpus_splits_are_disjoint_ranges(tmp_path):
  mt = _experiment()
  directory = mt.write_data(tmp_path)
  data = {name: [json.loads(line) for line in open(directory / f"{name}.jsonl", encoding="utf-8")]
          for name in ("train", "val", "test")}
  numbers = mt.splits()
  assert sum(len(v) for v in numbers.values()) == mt.LIMIT
  assert not set(numbers["test"]) & (set(numbers["train"]) | set(numbers["val"]))
  assert not set(numbers["train"]) & set(numbers["val"])
  assert all((n // 100) % 20 == 7 for n in numbers["test"]) and len(numbers["test"]) == 500
  assert data["test"][12] == {"source": "seven hundred and twelve", "target": "sept cent douze"}
  assert {"source": "eighty", "target": "quatre-vingts"} in data["train"] + data["val"]
  before = (directory / "train.jsonl").stat().st_mtime_ns
  mt.write_data(tmp_path)  # written once: an existing corpus is never rewritten
  assert (directory / "train.jsonl").stat().st_mtime_ns == before


@pytest.mark.slow
def test_translate_numbers_reaches_bleu_90(tmp_path):
  env = {"LLMJAX_CACHE": str(tmp_path / "cache")}
  train = run_cli(["-m", "llmjax.main", "--config=experiments/translate_numbers.py",
                   f"--workdir={tmp_path / 'mt'}", "--config.train.progress=False"],
                  env_extra=env, timeout=3600)
  assert train.returncode == 0, train.stderr[-3000:]
  test = tmp_path / "cache" / "translate_numbers" / "test.jsonl"
  result = run_cli(["-m", "llmjax.evaluate", f"--workdir={tmp_path / 'mt'}", f"--data={test}",
                    "--metrics=bleu,chrf", "--num_beams=4", "--batch_size=100"], env_extra=env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["examples"] == 500 and summary["bleu"] >= 90, summary
