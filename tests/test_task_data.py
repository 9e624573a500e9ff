"""Task data (llmjax/data/task_data.py, packing.py): loss weights, truncation and drop counts,
packing with segment ids (no attention across examples), epochs as a pure function of
(seed, step), multi-host rows, classification labels; end to end through the training CLI
(mid-epoch resumption bit for bit, classification with its label mapping)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as cfglib
from llmjax.data import DataError, load_dataset
from llmjax.data import formats as fm
from llmjax.data import packing
from llmjax.data.task_data import Encoder, EncodeStats, TaskDataset, label_ids
from llmjax.data.tokenizers import CharTokenizer
from llmjax.model import Transformer, TransformerConfig

from conftest import run_cli


class EosChars(CharTokenizer):
  """A char tokenizer with an EOS id (the last one), to check the completion's closing EOS."""
  def __init__(self, chars):
    super().__init__(chars)
    self.eos_id = len(self.chars)

  @property
  def vocab_size(self):
    return len(self.chars) + 1


TOK = EosChars(sorted(set("0123456789+= abcdefghijklmnopqrstuvwxyz")))


def data_config(**kw):
  d = cfglib.default_config().data
  d.update(dict(dict(seq_len=12, batch_size=4), **kw))
  return d


def test_prompt_completion_weights_include_the_closing_eos():
  ex = fm.PromptCompletion("12+34=", "46", "f:1")
  item = Encoder(TOK, data_config()).encode(ex, EncodeStats())
  assert item.tokens.tolist() == TOK.encode("12+34=46") + [TOK.eos_id]
  assert item.weights.tolist() == [0.0] * 6 + [1.0, 1.0, 1.0]
  every = Encoder(TOK, data_config(train_on="all")).encode(ex, EncodeStats())
  assert every.weights.tolist() == [1.0] * 9
  text = Encoder(TOK, data_config(train_on="completion")).encode(fm.TextExample("abc", "f:2"),
                                                                 EncodeStats())
  assert text.weights.tolist() == [1.0] * 4  # plain text: every token (incl. EOS)


def test_truncation_and_drop_counts_and_errors():
  long = fm.PromptCompletion("a" * 20, "bc", "f:3")
  right = Encoder(TOK, data_config(truncate="right"))
  stats = EncodeStats()
  assert right.encode(long, stats) is None  # cut at 13 tokens: only prompt left -> no trainable
  assert (stats.truncated, stats.dropped_untrained, stats.first_untrained) == (1, 1, "f:3")
  left = Encoder(TOK, data_config(truncate="left")).encode(long, EncodeStats())
  assert len(left.tokens) == 13 and left.weights[-3:].tolist() == [1.0, 1.0, 1.0]
  stats = EncodeStats()
  assert Encoder(TOK, data_config(truncate="drop")).encode(long, stats) is None
  assert stats.dropped_long == 1 and "1 dropped as too long" in stats.describe("train")
  with pytest.raises(DataError, match="f:3: the example has 23 tokens, more than "
                     "data.seq_len\\+1=13; raise data.seq_len or set data.truncate"):
    Encoder(TOK, data_config(truncate="none")).encode(long, EncodeStats())


def write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def addition(n, seed=0):
  rng = np.random.default_rng(seed)
  a, b = rng.integers(10, 100, n), rng.integers(10, 100, n)
  return [{"prompt": f"{x}+{y}=", "completion": str(x + y)} for x, y in zip(a, b)]


def test_all_examples_untrained_fails_naming_the_first(tmp_path):
  path = write(tmp_path / "t.jsonl", [{"prompt": "a" * 30, "completion": "b"}] * 3)
  with pytest.raises(DataError, match=r"t.jsonl:\d: no train example has a trainable token"):
    load_dataset(data_config(path=path, val_fraction=0.34), 0, TOK)


def test_packing_rows_segments_positions_and_efficiency(tmp_path):
  path = write(tmp_path / "t.jsonl", addition(40))
  ds = load_dataset(data_config(path=path, packing=True, seq_len=24, val_fraction=0.25), 0, TOK)
  b = ds.batch("train", 0, 4)
  assert set(b) == set(fm.batch_fields(data_config(path=path)))
  assert b["weights"].dtype == np.float32 and b["inputs"].dtype == np.int32
  for r in range(4):
    seg, pos = b["segment_ids"][r], b["positions"][r]
    assert seg.max() >= 2  # 8-9 positions per example: two fit in 24
    for s in range(1, seg.max() + 1):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    # padding: segment 0, weight 0; targets are the next token inside a segment
    assert (b["weights"][r][seg == 0] == 0).all()
  assert 0.6 < ds.efficiency() <= 1.0
  padded = load_dataset(data_config(path=path, packing=False, seq_len=24, val_fraction=0.25), 0, TOK)
  assert padded.batch("train", 0, 4)["segment_ids"].max() == 1
  assert padded.efficiency() < ds.efficiency()
  assert f"packing efficiency {ds.efficiency():.1%}" in ds.summary()


def test_changing_one_packed_example_leaves_the_others_logits_unchanged():
  cfg = TransformerConfig(vocab_size=TOK.vocab_size, num_layers=2, num_heads=2, embed_dim=32,
                          max_seq_len=32, position="rotary")
  model = Transformer(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 24), jnp.int32))["params"])
  enc = Encoder(TOK, data_config(seq_len=24))
  a = [enc.encode(fm.PromptCompletion(p, c, ""), EncodeStats())
       for p, c in (("12+34=", "46"), ("50+50=", "100"), ("9+9=", "18"))]
  b = list(a)
  b[1] = enc.encode(fm.PromptCompletion("77+1=", "78"), EncodeStats())  # different length too
  rows = [[0, 1, 2]]
  ra, rb = packing.build_rows(a, rows, 24), packing.build_rows(b, rows, 24)
  run = lambda r: model.apply({"params": params}, r["inputs"], positions=r["positions"],
                              segment_ids=r["segment_ids"])
  la, lb = run(ra), run(rb)
  for seg_a, seg_b in ((1, 1), (3, 3)):
    np.testing.assert_allclose(la[0][ra["segment_ids"][0] == seg_a],
                               lb[0][rb["segment_ids"][0] == seg_b], rtol=1e-5, atol=1e-5)
  # and each packed example's logits equal those of the example alone in its own row
  alone = run(packing.build_rows(a, [[2]], 24))
  np.testing.assert_allclose(la[0][ra["segment_ids"][0] == 3],
                             alone[0][:len(a[2].tokens) - 1], rtol=1e-5, atol=1e-5)


def test_epochs_shuffle_each_example_once_and_batches_are_pure():
  enc = Encoder(TOK, data_config())
  ex = [enc.encode(fm.PromptCompletion(f"{i}+1=", str(i + 1)), EncodeStats()) for i in range(10, 40)]
  mk = lambda seed: TaskDataset(ex, ex[:3], TOK, 12, seed, pack=False, stats={})
  ds = mk(0)
  assert ds.rows_per_epoch() == 30 and ds.steps_for_epochs(2, 4) == 15
  seen = []
  for step in range(15):  # two epochs = 60 rows = 15 batches of 4
    b = ds.batch("train", step, 4)
    seen += [tuple(r[r != 0]) for r in b["inputs"]]
  first, second = seen[:30], seen[30:]
  assert sorted(first) == sorted(second) and len(set(first)) == 30  # each once per epoch
  assert first != second  # reshuffled
  # a fresh dataset (a resumed run) gives the same batch at any step, mid-epoch too
  for step in (0, 7, 8, 13):
    for k, v in ds.batch("train", step, 4).items():
      np.testing.assert_array_equal(v, mk(0).batch("train", step, 4)[k])
  assert not np.array_equal(mk(1).batch("train", 0, 4)["inputs"], ds.batch("train", 0, 4)["inputs"])
  # multi-host: process p builds exactly rows p*2..p*2+1 of the global batch
  whole = ds.batch("train", 9, 4)
  for p in range(2):
    part = mk(0).batch("train", 9, 4, process_index=p, process_count=2)
    for k in whole:
      np.testing.assert_array_equal(part[k], whole[k][2 * p:2 * p + 2])
  # validation: every example once, then empty rows
  assert ds.num_batches("val", 4) == 1
  val = ds.batch("val", 0, 4)
  assert val["weights"][3].sum() == 0 and val["weights"][:3].sum(1).min() > 0


def test_classification_labels(tmp_path):
  assert label_ids(["b", "a", "b"]) == {"a": 0, "b": 1}
  assert label_ids(["10", "2", "1"]) == {"1": 0, "2": 1, "10": 2}
  train = write(tmp_path / "tr.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 4)
  val = write(tmp_path / "va.jsonl", [{"text": "meh", "label": "neutral"}])
  d = data_config(path=train, val_path=val)
  with pytest.raises(DataError, match="va.jsonl:1: label 'neutral' never occurs in the training data"):
    load_dataset(d, 0, TOK, classification=True)
  d.val_path = write(tmp_path / "va2.jsonl", [{"text": "good", "label": "pos"}])
  ds = load_dataset(d, 0, TOK, classification=True)
  b = ds.batch("val", 0, 4)
  assert b["labels"].tolist() == [1, -1, -1, -1] and b["label_weights"].tolist() == [1, 0, 0, 0]
  ds.save(tmp_path)
  assert json.loads((tmp_path / "labels.json").read_text()) == {"labels": ["neg", "pos"]}
  with pytest.raises(DataError, match="classification needs"):
    load_dataset(data_config(path=write(tmp_path / "pc.jsonl", addition(4))), 0, TOK,
                 classification=True)


TINY = ["--config=experiments/shakespeare_char.py", "--config.model.num_layers=2",
        "--config.model.embed_dim=32", "--config.model.num_heads=2", "--config.data.seq_len=24",
        "--config.data.batch_size=4", "--config.train.grad_accum_steps=1",
        "--config.train.progress=False", "--config.train.sample_tokens=0",
        "--config.train.eval_every=0", "--config.train.log_every=1", "--config.train.tensorboard=False",
        "--config.optim.warmup_steps=2"]


def test_sft_resumes_bit_for_bit_mid_epoch_and_epochs_set_steps(tmp_path):
  """train.epochs=2 sets train.steps from the packed rows per epoch. Resuming from the checkpoint
  at step 3 (mid-epoch) in a copy of the run gives the very same losses and final validation loss
  as the uninterrupted run."""
  import shutil
  path = write(tmp_path / "t.jsonl", addition(44, seed=3))
  common = TINY + [f"--config.data.path={path}", "--config.data.packing=True",
                   "--config.data.val_fraction=0.1", "--config.train.epochs=2",
                   "--config.data.tokenizer=char", "--config.train.checkpoint_every=3",
                   "--config.train.keep_checkpoints=0", "--config.train.async_checkpointing=False"]
  a, b = tmp_path / "a", tmp_path / "b"
  full = run_cli(["-m", "llmjax.main", f"--workdir={a}", *common])
  assert full.returncode == 0, full.stderr[-2000:]
  assert "packing efficiency" in full.stdout
  steps = int(full.stdout.split("training steps 0..")[1].split()[0])
  assert steps >= 4
  shutil.copytree(a, b)
  for later in (b / "checkpoints").iterdir():
    if later.name.isdigit() and int(later.name) > 3:
      shutil.rmtree(later)
  rest = run_cli(["-m", "llmjax.main", f"--workdir={b}", *common])
  assert rest.returncode == 0, rest.stderr[-2000:]
  assert "resumed from step 3" in rest.stdout
  read = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  train = lambda recs: {r["step"]: r["loss"] for r in recs if r["split"] == "train"}
  assert sorted(train(read(a))) == list(range(1, steps + 1))
  assert train(read(a)) == train(read(b))
  val = lambda recs: [r["loss"] for r in recs if r["split"] == "val"][-1]
  assert val(read(a)) == val(read(b))


def test_classification_run_end_to_end(tmp_path):
  """train.objective=classification from {"text", "label"} JSONL: num_labels from the data, the
  label mapping saved with the run, val accuracy/macro-F1, and --mode=eval reproduces them."""
  rng = np.random.default_rng(0)
  rows = [{"text": f"{w} {w} {i}", "label": "pos" if w == "good" else "neg"}
          for i, w in enumerate(rng.choice(["good", "bad"], 40))]
  train = write(tmp_path / "train.jsonl", rows[:32])
  val = write(tmp_path / "val.jsonl", rows[32:])
  w = tmp_path / "cls"
  proc = run_cli(["-m", "llmjax.main", f"--workdir={w}", *TINY, f"--config.data.path={train}",
                  f"--config.data.val_path={val}", "--config.train.objective=classification",
                  "--config.train.steps=12", "--config.data.tokenizer=char"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "2 labels: neg, pos" in proc.stdout
  assert json.loads((w / "labels.json").read_text()) == {"labels": ["neg", "pos"]}
  assert json.loads((w / "config.json").read_text())["model"]["num_labels"] == 2
  final = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()][-1]
  assert final["split"] == "val" and {"loss", "accuracy", "macro_f1"} <= set(final)
  proc = run_cli(["-m", "llmjax.main", "--mode=eval", f"--workdir={w}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  again = json.loads(proc.stdout.strip().splitlines()[-1])
  assert again["accuracy"] == final["accuracy"]
  np.testing.assert_allclose(again["loss"], final["loss"], rtol=1e-6)
