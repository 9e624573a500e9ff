"""Training on prepared corpora end to end: `--config.data.path=<prepared dir>` and
`--config.data.mixture=...` resume bit for bit, report per-source validation losses, check the
corpus against the run at start, and split rows between processes exactly like one process does."""
import json
import sys

import numpy as np
import pytest

import _ckpt_util as u
from conftest import ROOT, run_cli
from llmjax.data import prepare as preplib
from llmjax.data.sources import embedded_documents

DOCS = embedded_documents()
BYTE = ["--config.data.tokenizer=byte", "--config.model.vocab_size=0"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpora")
  out = {}
  for name, docs in (("web", DOCS[:40]), ("code", DOCS[40:])):
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert preplib.main([f"--input={src}", f"--output={root / name}", "--tokenizer=byte",
                         "--shard_tokens=7000", "--val_fraction=0.2", "--noprogress",
                         "--num_workers=1"]) == 0
    out[name] = root / name
  return out


def _resume_is_exact(tmp_path, *data):
  """A: 8 steps straight. B: 4 steps, then the same command with steps=8 resumes. Same bits."""
  steps = ["--config.optim.decay_steps=8", "--config.train.checkpoint_every=4",
           "--config.train.eval_every=4", *BYTE, *data]
  a, b = tmp_path / "a", tmp_path / "b"
  u.train(a, *steps, "--config.train.steps=8")
  u.train(b, *steps, "--config.train.steps=4")
  resumed = u.train(b, *steps, "--config.train.steps=8")
  assert "resumed from step 4" in resumed.stdout
  u.assert_trees_equal(u.read_state(a, 8), u.read_state(b, 8))
  ma, mb = u.train_metrics(a), u.train_metrics(b)
  assert ma == mb and sorted(ma) == list(range(1, 9))
  records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert all(r["data_host_ms"] >= 0 and r["data_wait_ms"] >= 0 for r in train)
  return [r for r in records if r["split"] == "val"], resumed


@pytest.mark.slow  # the mixture test below covers the same loader in the default suite
def test_resume_from_a_prepared_directory_is_bit_exact(tmp_path, corpora):
  val, resumed = _resume_is_exact(tmp_path, f"--config.data.path={corpora['web']}")
  assert "byte tokenizer with 256 ids" in resumed.stdout
  assert [r["step"] for r in val] == [4, 8] and "web/loss" not in val[0]


def test_resume_from_a_mixture_is_bit_exact_with_per_source_val_losses(tmp_path, corpora):
  val, _ = _resume_is_exact(
      tmp_path, f"--config.data.mixture={corpora['web']}:0.7,{corpora['code']}:0.3")
  assert [r["step"] for r in val] == [4, 8]
  for r in val:
    assert {"loss", "web/loss", "code/loss", "web/perplexity", "code/bpb"} <= set(r)
    assert r["web/loss"] != r["code/loss"]


def test_start_check_of_token_ids_against_the_vocabulary_is_one_line_exit_2(tmp_path, corpora):
  """The manifest's largest id vs model.vocab_size (the tokenizer and mixture checks are tested
  in-process in test_prepare.py; main turns all of them into the same one-line exit 2)."""
  proc = run_cli(u.args(tmp_path / "run", f"--config.data.path={corpora['web']}",
                        "--config.data.tokenizer=byte", "--config.model.vocab_size=100",
                        "--config.train.steps=1"))
  err = proc.stderr.strip()
  assert proc.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
  # the byte tokenizer's 256 ids already exceed model.vocab_size=100: the tokenizer check (which
  # also covers every id the manifest can hold) refuses first
  assert "model.vocab_size=100" in err and "256" in err
  assert u.complete_steps(tmp_path / "run") == []


def test_two_processes_read_disjoint_rows_equal_to_one_process(tmp_path, corpora):
  """2 processes x 4 devices vs 1 process x 8: each process assembles only its rows, and the
  global batches (prepared dir and mixture) are identical."""
  spec = f"{corpora['web']}:0.6,{corpora['code']}:0.4"
  driver = [str(ROOT / "tests" / "prepared_batches_driver.py"), str(corpora["web"]), spec]
  multi = run_cli(["launch/local.py", "--num_processes=2", "--devices_per_process=4",
                   "--timeout=300", "--", sys.executable, *driver, str(tmp_path / "multi")],
                  timeout=400)
  assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
  single = run_cli([*driver, str(tmp_path / "single")], devices=8, timeout=400)
  assert single.returncode == 0, single.stderr[-3000:]
  one = np.load(tmp_path / "single_p0.npz")
  p0, p1 = np.load(tmp_path / "multi_p0.npz"), np.load(tmp_path / "multi_p1.npz")
  assert sorted(one.files) == sorted(p0.files) and len(one.files) == 12
  for key in one.files:
    if key.startswith("global"):
      np.testing.assert_array_equal(p0[key], one[key])
      np.testing.assert_array_equal(p1[key], one[key])
    else:  # local rows: process 0 the first half, process 1 the second
      half = len(one[key]) // 2
      assert len(p0[key]) == len(p1[key]) == half
      np.testing.assert_array_equal(p0[key], one[key][:half])
      np.testing.assert_array_equal(p1[key], one[key][half:])
      assert not np.array_equal(p0[key], p1[key])
