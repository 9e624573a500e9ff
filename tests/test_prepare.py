"""llmjax.data.prepare (corpus -> token shards + manifest) and the shard loader / mixtures that
read prepared directories. Corpora are made here from the embedded Python docs; nothing downloads."""
import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from llmjax.data import DataError, load_dataset, load_tokenizer
from llmjax.data import mixture as mixlib
from llmjax.data import prepare as preplib
from llmjax.data import shards as shardlib
from llmjax.data.sources import embedded_documents
from llmjax import config as cfglib

DOCS = embedded_documents()


def data_config(**kw):
  c = cfglib.default_config().data
  c.update(dict(dict(seq_len=16, batch_size=8), **kw))
  return c


def write_corpus(root: Path) -> list[str]:
  """The same documents in every supported format; returns the documents in input order."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  root.mkdir(parents=True, exist_ok=True)
  a, b, c, d, e = DOCS[:20], DOCS[20:35], DOCS[35:50], DOCS[50:65], DOCS[65:75]
  (root / "a.jsonl").write_text("".join(json.dumps({"text": x, "id": i}) + "\n"
                                        for i, x in enumerate(a)))
  with gzip.open(root / "b.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": x}) + "\n" for x in b)
  (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
      "".join(json.dumps({"text": x}) + "\n" for x in c).encode()))
  pq.write_table(pa.table({"text": d}), root / "d.parquet", row_group_size=4)
  (root / "e.txt").write_text("\n".join(e))
  return a + b + c + d + ["\n".join(e)]


def prepare(*argv) -> int:
  return preplib.main([*map(str, argv), "--noprogress", "--num_workers=1"])


def all_tokens(out: Path, split: str) -> np.ndarray:
  m = shardlib.read_manifest(str(out))
  return np.asarray(shardlib.open_split(str(out), m, split))


def test_every_format_becomes_shards_with_a_manifest(tmp_path):
  docs = write_corpus(tmp_path / "in")
  hf = tmp_path / "in" / "hf"
  import datasets
  datasets.Dataset.from_dict({"text": DOCS[75:]}).save_to_disk(str(hf))
  out = tmp_path / "out"
  assert prepare(f"--input={tmp_path}/in/*", f"--input={hf}", f"--output={out}",
                 "--tokenizer=byte", "--shard_tokens=30000", "--val_fraction=0.1",
                 "--chunk_mb=0.02") == 0
  docs += DOCS[75:]
  m = json.loads((out / "manifest.json").read_text())
  train, val = m["splits"]["train"], m["splits"]["val"]
  # fixed-size shards (only the last of each split is shorter), counts that add up
  assert all(s["tokens"] == 30000 for s in train["shards"][:-1]) and len(train["shards"]) > 3
  assert train["documents"] + val["documents"] == len(docs) and val["documents"] >= 1
  assert m["dtype"] == "uint16" and m["tokenizer"]["kind"] == "byte"
  assert m["max_token_id"] == max(all_tokens(out, "train").max(), all_tokens(out, "val").max())
  assert len(m["sources"]) == 6 and m["llmjax_version"] and m["tokenizer"]["fingerprint"]
  assert load_tokenizer(out).kind == "byte"
  # byte tokenizer: documents end with a blank line; every document is in exactly one split
  text = {s: bytes(all_tokens(out, s).astype(np.uint8)).decode() for s in ("train", "val")}
  assert sum(len(t.encode()) for t in text.values()) == sum(len(d.encode()) + 2 for d in docs)
  for doc in docs:
    assert (doc + "\n\n") in text["train"] or (doc + "\n\n") in text["val"]
  assert not any(out.rglob("*.tmp")) and not (out / "progress.json").exists()


def test_output_is_deterministic_and_independent_of_the_worker_count(tmp_path):
  """sentencepiece trained on a sample (fresh caches), 1 process vs a pool of 2: same bytes."""
  write_corpus(tmp_path / "in")
  outs = []
  for workers in (1, 2):
    out = tmp_path / f"out{workers}"
    proc = run_cli(["-m", "llmjax.data.prepare", f"--input={tmp_path}/in/*", f"--output={out}",
                    "--sp_vocab_size=400", "--shard_tokens=20000", "--val_fraction=0.1",
                    "--chunk_mb=0.02", f"--num_workers={workers}", "--noprogress"],
                   env_extra={"LLMJAX_CACHE": str(tmp_path / f"cache{workers}")})
    assert proc.returncode == 0, proc.stderr
    outs.append(out)
  files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
  for f in files:
    assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
  m = json.loads((outs[0] / "manifest.json").read_text())
  assert m["tokenizer"]["kind"] == "sentencepiece" and m["tokenizer"]["vocab_size"] == 400
  assert m["tokenizer"]["document_end"] == "eos"
  tok = load_tokenizer(outs[0])
  train = all_tokens(outs[0], "train")
  assert (train == tok.eos_id).sum() == m["splits"]["train"]["documents"]


def test_validation_split_does_not_depend_on_where_the_corpus_lies(tmp_path):
  """The held-out documents are picked by a hash of names relative to the inputs' common
  directory: the same corpus elsewhere, given by a relative glob, gives the same shards."""
  import shutil
  write_corpus(tmp_path / "in")
  shutil.copytree(tmp_path / "in", tmp_path / "moved" / "corpus")
  common = ["--tokenizer=byte", "--shard_tokens=20000", "--val_fraction=0.3", "--chunk_mb=0.02",
            "--noprogress"]
  assert prepare(f"--input={tmp_path}/in/*", f"--output={tmp_path}/a", *common) == 0
  proc = run_cli(["-m", "llmjax.data.prepare", "--input=corpus/*", f"--output={tmp_path}/b",
                  *common], cwd=tmp_path / "moved")
  assert proc.returncode == 0, proc.stderr
  splits = [json.loads((tmp_path / d / "manifest.json").read_text())["splits"] for d in "ab"]
  assert splits[0] == splits[1] and splits[0]["val"]["documents"] > 1
  for f in sorted((tmp_path / "a").rglob("*.bin")):
    assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f


def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, monkeypatch):
  """A disk that fills up mid-shard: one line, exit 2, finished shards kept; reruns continue."""
  write_corpus(tmp_path / "in")
  args = [f"--input={tmp_path}/in/*", "--tokenizer=byte", "--shard_tokens=20000",
          "--val_fraction=0.1", "--chunk_mb=0.02"]
  assert prepare(*args, f"--output={tmp_path}/ref") == 0
  out = tmp_path / "out"
  total = sum(f.stat().st_size for f in (tmp_path / "ref").rglob("*.bin"))
  for budget in (total // 10, total // 2):  # two interruptions at different places
    monkeypatch.setenv(preplib._TEST_DISK_BYTES, str(budget))
    assert prepare(*args, f"--output={out}") == 2
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    splits = json.loads((out / "progress.json").read_text())["splits"]
    # train and val shards finished before the disk filled (none, if it filled early)
    kept = [s for split in splits.values() for s in split["shards"]]
    for s in kept:  # every finished shard is whole
      assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
  monkeypatch.delenv(preplib._TEST_DISK_BYTES)
  assert len(kept) >= 2
  assert prepare(*args, f"--output={out}") == 0
  ref = tmp_path / "ref"
  for f in sorted(p for p in ref.rglob("*") if p.is_file()):
    assert f.read_bytes() == (out / f.relative_to(ref)).read_bytes(), f
  assert not any(out.rglob("*.tmp"))
  assert prepare(*args, f"--output={out}") == 0  # already prepared: nothing to do


def test_prepare_errors_are_one_line_exit_2(tmp_path, capsys):
  write_corpus(tmp_path / "in")
  bad = tmp_path / "bad"
  bad.mkdir()
  lines = [json.dumps({"text": "x" * 100}) for _ in range(2000)]
  lines[1500] = "{not json"
  (bad / "broken.jsonl").write_text("\n".join(lines) + "\n")
  (bad / "nokey.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["a", "b"]}), bad / "nocol.parquet")
  ok = [f"--input={tmp_path}/in/a.jsonl", "--tokenizer=byte", "--val_fraction=0.2"]
  assert prepare(*ok, f"--output={tmp_path}/web") == 0
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  cases = [
      ([f"--input={tmp_path}/nothing/*.jsonl", "--tokenizer=byte", f"--output={tmp_path}/o1"],
       "matches no file"),
      ([f"--input={bad}/broken.jsonl", "--tokenizer=byte", "--chunk_mb=0.05",
        f"--output={tmp_path}/o2"], f"{bad}/broken.jsonl:1501: not a JSON object"),
      ([f"--input={bad}/nokey.jsonl", "--tokenizer=byte", f"--output={tmp_path}/o3"],
       f"{bad}/nokey.jsonl:2: no 'text' key"),
      ([f"--input={bad}/nocol.parquet", "--tokenizer=byte", f"--output={tmp_path}/o4"],
       "has no column 'text' (columns: body)"),
      ([f"--input={tmp_path}/in/b.jsonl.gz", "--tokenizer=byte", "--val_fraction=0.2",
        f"--output={tmp_path}/web"], "already holds another prepared corpus"),
      ([*ok, f"--output={other}"], "is not empty and is not a prepared corpus"),
      ([*ok, "--val_fraction=1.5", f"--output={tmp_path}/o5"], "--val_fraction=1.5"),
  ]
  for argv, message in cases:
    capsys.readouterr()
    try:
      status = prepare(*argv)
    except SystemExit as e:  # argument errors exit from the parser
      status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2, (argv, err)
    assert message in err and len(err.splitlines()) == 1, (message, err)
  assert (other / "notes.txt").read_text() == "mine"  # nothing of the user's was touched
  assert json.loads((tmp_path / "web" / "manifest.json").read_text())["sources"][0]["path"].endswith(
      "a.jsonl")


# -- the loader ---------------------------------------------------------------------------------------
def test_sharded_tokens_read_windows_across_shard_boundaries(tmp_path):
  rng = np.random.default_rng(0)
  # ids below 256: the glob is loaded below with the byte tokenizer, whose vocabulary is checked
  parts = [rng.integers(0, 256, n).astype(np.uint16) for n in (7, 1, 50, 13)]
  files = []
  for i, p in enumerate(parts):
    files.append(str(tmp_path / f"{i}.bin"))
    p.tofile(files[-1])
  whole = np.concatenate(parts)
  tokens = shardlib.ShardedTokens(files, [len(p) for p in parts], "uint16")
  assert len(tokens) == len(whole) and tokens.shape == whole.shape
  starts = np.arange(0, len(whole) - 10)
  np.testing.assert_array_equal(tokens.windows(starts, 10), whole[starts[:, None] + np.arange(10)])
  idx = rng.integers(0, len(whole), (5, 4))
  np.testing.assert_array_equal(tokens[idx], whole[idx])
  view = tokens[5:60]
  assert len(view) == 55
  np.testing.assert_array_equal(np.asarray(view), whole[5:60])
  np.testing.assert_array_equal(view.windows(np.array([0, 3, 40]), 15),
                                np.stack([whole[5 + s:20 + s] for s in (0, 3, 40)]))
  assert tokens[8] == whole[8] and tokens[-1] == whole[-1]
  with pytest.raises(IndexError):
    tokens.windows(np.array([len(whole) - 3]), 10)
  # a glob of token files is the same array (data.path='dir/*.bin')
  cfg = data_config(path=str(tmp_path / "*.bin"), tokenizer="byte", seq_len=8, val_fraction=0.2)
  ds = load_dataset(cfg, seed=0)
  assert len(ds.train) + len(ds.val) == len(whole)
  np.testing.assert_array_equal(np.asarray(ds.val), whole[len(ds.train):])


def _prepared(tmp_path, name="web", docs=DOCS[:40], tokenizer="byte", extra=()):
  src = tmp_path / f"{name}.jsonl"
  src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  out = tmp_path / name
  assert prepare(f"--input={src}", f"--output={out}", f"--tokenizer={tokenizer}",
                 "--shard_tokens=9000", "--val_fraction=0.2", *extra) == 0
  return out


def test_prepared_dir_batches_equal_those_of_the_concatenated_tokens(tmp_path):
  out = _prepared(tmp_path)
  cfg = data_config(path=str(out), tokenizer="byte", seq_len=32)
  ds = load_dataset(cfg, seed=3)
  assert isinstance(ds.train, shardlib.ShardedTokens) and len(ds.train.files) > 3
  from llmjax.data.batches import TokenDataset
  ref = TokenDataset(train=all_tokens(out, "train"), val=all_tokens(out, "val"),
                     tokenizer=ds.tokenizer, seq_len=32, seed=3)
  for split in ("train", "val"):
    for step in (0, 1, 17):
      got, want = ds.batch(split, step, 16), ref.batch(split, step, 16)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])
  # each process reads only its rows; together they are the global batch
  parts = [ds.batch("train", 5, 16, i, 4)["inputs"] for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), ds.batch("train", 5, 16)["inputs"])
  assert ds.max_token_id == json.loads((out / "manifest.json").read_text())["max_token_id"]


def test_start_checks_tokenizer_and_vocabulary(tmp_path):
  out = _prepared(tmp_path)
  with pytest.raises(DataError, match=r"data.tokenizer='char' but .* prepared with the byte "
                     r"tokenizer with 256 ids"):
    load_dataset(data_config(path=str(out), tokenizer="char"), seed=0)
  # a run whose own (restored) tokenizer differs from the corpus's
  from llmjax.data import CharTokenizer
  with pytest.raises(DataError, match=r"tokenizer mismatch: the run's tokenizer \(char, 2 ids"):
    load_dataset(data_config(path=str(out), tokenizer="byte"), 0, CharTokenizer.from_text("ab"))
  ds = load_dataset(data_config(path=str(out), tokenizer="byte"), seed=0)
  shardlib.check_max_token_id(ds, 256)
  with pytest.raises(DataError, match=rf"token id {ds.max_token_id} but model.vocab_size=100"):
    shardlib.check_max_token_id(ds, 100)


def test_mixture_rows_are_deterministic_weighted_and_per_process(tmp_path):
  web, code = _prepared(tmp_path, "web", DOCS[:40]), _prepared(tmp_path, "code", DOCS[40:80])
  cfg = data_config(mixture=f"{web}:0.75,{code}:0.25", tokenizer="byte", seq_len=16)
  ds = load_dataset(cfg, seed=0)
  assert ds.names == ["web", "code"]
  a, b = ds.batch("train", 3, 64), ds.batch("train", 3, 64)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(ds.batch("train", 4, 64)["inputs"], a["inputs"])
  choice = np.concatenate([ds.source_rows("train", s, 64)[0] for s in range(50)])
  assert 0.70 < (choice == 0).mean() < 0.80
  # every row is a window of the source the row drew
  choice, starts = ds.source_rows("train", 3, 64)
  for r in range(64):
    tokens = all_tokens(web if choice[r] == 0 else code, "train")
    np.testing.assert_array_equal(a["inputs"][r], tokens[starts[r]:starts[r] + 16])
  parts = [ds.batch("train", 3, 64, i, 4)["inputs"] for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), a["inputs"])
  # per-source validation data
  code_val = ds.batch("val/code", 0, 8)
  single = load_dataset(data_config(path=str(code), tokenizer="byte", seq_len=16), seed=0)
  np.testing.assert_array_equal(code_val["inputs"], single.batch("val", 0, 8)["inputs"])


def test_mixture_errors(tmp_path):
  web = _prepared(tmp_path, "web")
  sp = _prepared(tmp_path, "sp", DOCS[40:80], "sentencepiece", ["--sp_vocab_size=400"])
  for spec, message in [(f"{web}:0.7,{tmp_path}/none:0.3", "is not a prepared corpus directory"),
                        (f"{web}:x", "is not DIR:WEIGHT with a positive weight"),
                        (f"{web}:-1", "is not DIR:WEIGHT"), (f"{web}", "is not DIR:WEIGHT"),
                        (f"{web}:1,{web}:2", "names a directory twice")]:
    with pytest.raises(DataError, match=message):
      mixlib.parse_mixture(spec)
  with pytest.raises(DataError, match="but .*sp was prepared with the sentencepiece tokenizer"):
    load_dataset(data_config(mixture=f"{web}:1,{sp}:1", tokenizer="byte"), seed=0)


def test_prepare_module_runs_as_a_command(tmp_path):
  """`python -m llmjax.data.prepare` with a pool of 2: the user's command line and its messages."""
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))
  proc = run_cli(["-m", "llmjax.data.prepare", f"--input={src}", f"--output={tmp_path}/o",
                  "--tokenizer=byte", "--num_workers=2", "--val_fraction=0.2"])
  assert proc.returncode == 0, proc.stderr
  assert "tokenizing" in proc.stderr and "B/s" in proc.stderr  # the progress bar: rate and ETA
  assert "prepared " in proc.stderr
  bad = run_cli(["-m", "llmjax.data.prepare", "--output=x"])
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_prefetcher_yields_steps_in_order_measures_and_reraises():
  from llmjax.data.prefetch import Prefetcher

  def make(step):
    if step == 7:
      raise DataError("bad shard")
    return {"step": np.full(2, step)}

  pre = Prefetcher(make, 3, 10, depth=2)
  try:
    for step in range(3, 7):
      assert int(pre.get(step)["step"][0]) == step
    stats = pre.stats()
    assert stats["data_host_ms"] >= 0 and stats["data_wait_ms"] >= 0
    with pytest.raises(DataError, match="bad shard"):  # raised in the consumer, not lost
      pre.get(7)
    with pytest.raises(ValueError, match="expected step 7"):
      pre.get(9)
  finally:
    pre.close()


def test_shard_writer_recovers_a_shard_renamed_after_the_last_save(tmp_path):
  """A crash after a shard was renamed into place but before progress.json recorded it: the rerun
  takes the shard back as the file being filled, truncated to the saved length."""
  tokens = np.arange(30, dtype=np.uint16)
  w = preplib.ShardWriter(tmp_path, "train", 10, "uint16", None)
  w.add(tokens[:7], np.array([3, 7]))
  w.sync()
  saved = json.loads(json.dumps(w.state()))
  assert w.add(tokens[7:15], np.array([8])) and (tmp_path / "train" / "00000.bin").exists()
  w.file.close()  # the "crash": nothing after the save was recorded
  w = preplib.ShardWriter(tmp_path, "train", 10, "uint16", saved)
  assert w.add(tokens[7:15], np.array([8])) is True
  w.add(tokens[15:], np.array([15]))
  w.finish()
  assert [s["tokens"] for s in w.shards] == [10, 10, 10]
  assert [s["documents"] for s in w.shards] == [2, 1, 1]
  got = np.concatenate([np.fromfile(tmp_path / s["file"], np.uint16) for s in w.shards])
  np.testing.assert_array_equal(got, tokens)
  assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["00000.bin", "00001.bin",
                                                                     "00002.bin"]


def test_prepare_killed_at_random_moments_finishes_with_the_same_bytes(tmp_path):
  import random
  import signal
  import subprocess
  import time
  import psutil
  write_corpus(tmp_path / "in")
  args = [f"--input={tmp_path}/in/*", "--tokenizer=byte", "--shard_tokens=5000",
          "--val_fraction=0.1", "--chunk_mb=0.01", "--noprogress"]
  assert prepare(*args, f"--output={tmp_path}/ref") == 0
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "llmjax.data.prepare", *args, f"--output={out}", "--num_workers=2"]
  env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
  rng, killed = random.Random(0), 0
  for attempt in range(12):
    if killed >= 2:
      break
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "progress.json").exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    # on a quiet machine the whole run may take less than the first, longer delays
    time.sleep(rng.uniform(0.0, 0.3 if attempt < 4 else 0.02))
    try:
      workers = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
      workers = []
    proc.send_signal(signal.SIGKILL)
    landed = proc.wait() == -signal.SIGKILL and (out / "progress.json").exists()
    killed += landed
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"pool workers outlived the killed prepare: {alive}"
    if not landed and (out / shardlib.MANIFEST).exists():
      shutil.rmtree(out)  # it finished before the kill: start again so that a later kill lands
  assert run_cli(cmd[1:]).returncode == 0
  ref = tmp_path / "ref"
  for f in sorted(p for p in ref.rglob("*") if p.is_file()):
    assert f.read_bytes() == (out / f.relative_to(ref)).read_bytes(), f
  assert not any(out.rglob("*.tmp")) and not (out / "progress.json").exists()
  assert killed >= 1, "no kill landed in the middle of a run"


def test_the_first_document_always_lands_in_validation(tmp_path):
  """A small corpus with the default --val_fraction=0.001 still gets a validation split."""
  src = tmp_path / "small.jsonl"
  src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))
  assert preplib.main([f"--input={src}", f"--output={tmp_path}/o", "--tokenizer=byte",
                       "--noprogress", "--num_workers=1"]) == 0
  val = bytes(all_tokens(tmp_path / "o", "val").astype(np.uint8)).decode()
  assert val.startswith(DOCS[0] + "\n\n")
