"""The masked-LM recipe: selection rate, 80/10/10, special/padding tokens never selected,
whole-word masking, NSP rows, determinism, and the special tokens llmjax tokenizers carry."""
import numpy as np
import pytest

from llmjax import config as cfglib
from llmjax.data import CharTokenizer, DataError
from llmjax.data.mlm import MaskedLMDataset, MlmVocab, mask_tokens, word_starts
from llmjax.data.sources import embedded_documents
from llmjax.data.tokenizers import encode_with_specials, load_tokenizer

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CORPUS = "\n\n".join(embedded_documents()[:60])


@pytest.fixture(scope="module")
def char():
  return CharTokenizer.from_text(CORPUS, SPECIALS)


def test_char_tokenizer_carries_special_tokens_and_saves_them(char, tmp_path):
  base = len(set(CORPUS))
  assert char.vocab_size == base + 5
  assert char.special_ids == {"pad": base, "unk": base + 1, "cls": base + 2, "sep": base + 3,
                              "mask": base + 4}
  ids = encode_with_specials(char, "a [MASK] b")
  assert list(ids) == [char.encode("a")[0], char.encode(" ")[0], base + 4,
                       char.encode(" ")[0], char.encode("b")[0]]
  assert char.decode(ids) == "a  b" and char.id_to_token(base + 4) == "[MASK]"
  char.save(tmp_path)
  again = load_tokenizer(tmp_path)
  assert again.special_ids == char.special_ids and again.vocab_size == char.vocab_size
  c = cfglib.default_config()
  c.data.special_tokens = "[CLS], [MASK]"
  from llmjax.data import build_tokenizer
  assert build_tokenizer(c.data, "abc").special_ids == {"cls": 3, "mask": 4}


def _rows(char, n_tokens=120_000, width=100):
  ids = char.encode_array(CORPUS)[:n_tokens]
  rows = ids[: len(ids) // width * width].reshape(-1, width).copy()
  v = char.special_ids
  rows[:, 0], rows[:, -1] = v["cls"], v["sep"]
  valid = np.ones_like(rows, bool)
  valid[::7, 80:] = False            # every 7th row ends in padding
  rows[::7, 80:] = v["pad"]
  return rows, valid


def test_masking_statistics_over_1e5_tokens(char):
  vocab = MlmVocab.from_tokenizer(char)
  rows, valid = _rows(char)
  assert rows.size >= 100_000
  inputs, weights = mask_tokens(np.random.default_rng(0), rows, vocab, 0.15, valid=valid)
  selected = weights.astype(bool)
  candidates = valid & ~vocab.special[rows]
  assert not selected[~candidates].any()             # no special or padding token ever selected
  np.testing.assert_array_equal(inputs[~selected], rows[~selected])
  assert abs(selected.sum() / candidates.sum() - 0.15) < 0.01
  masked = inputs[selected] == vocab.mask_id
  unchanged = inputs[selected] == rows[selected]
  randomized = ~masked & ~unchanged
  n = selected.sum()
  assert abs(masked.sum() / n - 0.8) < 0.01
  # a random replacement equal to the original counts as unchanged: allow for 1/vocab of them
  assert abs(randomized.sum() / n - 0.1) < 0.01
  assert abs(unchanged.sum() / n - 0.1) < 0.01
  assert not vocab.special[inputs[selected][randomized]].any()  # replacements are never special


def _char_words(row, vocab):
  """Word index of every token, from whitespace alone (independent of the masker's tables)."""
  words, current, prev_break = [], -1, True
  for t in row:
    brk = vocab.space[t] or vocab.special[t]
    if brk or prev_break:
      current += 1
    words.append(current)
    prev_break = brk
  return np.asarray(words)


def test_whole_word_masking_never_splits_a_char_level_word(char):
  vocab = MlmVocab.from_tokenizer(char)
  rows, valid = _rows(char, n_tokens=100_000)
  inputs, weights = mask_tokens(np.random.default_rng(1), rows, vocab, 0.15, whole_word=True,
                                valid=valid)
  candidates = valid & ~vocab.special[rows]
  assert abs(weights.sum() / candidates.sum() - 0.15) < 0.015
  multi = 0
  for row, w, ok in zip(rows, weights, candidates):
    words = _char_words(row, vocab)
    for word in np.unique(words[ok]):
      sel = w[(words == word) & ok]
      assert sel.min() == sel.max()  # all pieces of a word together
      multi += len(sel) > 1 and sel[0] > 0
  assert multi > 1000  # many multi-character words were masked whole


def test_whole_word_masking_never_splits_a_wordpiece_word(tmp_path):
  pytest.importorskip("tokenizers")
  from test_bert import wordpiece

  from llmjax.data.hf_tokenizer import HFTokenizer
  wordpiece(tmp_path, vocab_size=400)
  tok = HFTokenizer.from_hf_dir(tmp_path)
  vocab = MlmVocab.from_tokenizer(tok)
  ids = np.asarray(tok.encode(CORPUS[:70_000], add_special_tokens=False), np.int32)
  rows = ids[: len(ids) // 128 * 128].reshape(-1, 128)
  inputs, weights = mask_tokens(np.random.default_rng(2), rows, vocab, 0.15, whole_word=True)
  pieces = np.asarray([tok.id_to_token(i).startswith("##") for i in range(tok.vocab_size)])
  split_words = 0
  for row, w in zip(rows, weights):
    starts = ~pieces[row]
    starts[0] = True
    words = np.cumsum(starts)
    for word in np.unique(words):
      sel = w[words == word]
      split_words += sel.min() != sel.max()
  assert split_words == 0
  assert pieces[rows].mean() > 0.2 and abs(weights.mean() - 0.15) < 0.01
  assert (word_starts(rows, vocab) == np.where(np.arange(128) == 0, True, ~pieces[rows])).all()


def _train_config(**kw):
  c = cfglib.default_config()
  c.train.update(kw)
  return c.train


class _Tokens:
  def __init__(self, tokenizer, seq_len=32):
    ids = tokenizer.encode_array(CORPUS)
    self.train, self.val = ids[:-5000], ids[-5000:]
    self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, 3


def test_rows_are_deterministic_per_process_and_framed_with_cls_sep(char):
  ds = MaskedLMDataset.from_token_dataset(_Tokens(char), _train_config())
  whole = ds.batch("train", 7, 8)
  again = ds.batch("train", 7, 8)
  halves = [ds.batch("train", 7, 8, i, 2) for i in range(2)]
  for k in whole:
    np.testing.assert_array_equal(whole[k], again[k])
    np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
  assert not np.array_equal(whole["inputs"], ds.batch("train", 8, 8)["inputs"])
  v = char.special_ids
  assert (whole["targets"][:, 0] == v["cls"]).all() and (whole["targets"][:, -1] == v["sep"]).all()
  assert whole["weights"][:, [0, -1]].sum() == 0 and whole["weights"].sum() > 0
  assert whole["inputs"].shape == (8, 32) and (whole["token_types"] == 0).all()


def test_nsp_rows_pair_a_true_next_span_or_a_random_one_half_the_time(char):
  tokens = _Tokens(char)
  ds = MaskedLMDataset.from_token_dataset(tokens, _train_config(mlm_nsp=True))
  batch = ds.batch("train", 0, 400)
  labels = batch["nsp_labels"]
  assert abs(labels.mean() - 0.5) < 0.08
  sep = char.special_ids["sep"]
  stream = "".join(map(chr, ds.train + 32))  # to search spans as substrings
  for row, types, label in zip(batch["targets"][:60], batch["token_types"], labels):
    first_sep = int(np.flatnonzero(row == sep)[0])
    assert row[-1] == sep and (types[:first_sep + 1] == 0).all() and (types[first_sep + 1:] == 1).all()
    joined = "".join(map(chr, np.concatenate([row[1:first_sep], row[first_sep + 1:-1]]) + 32))
    assert (joined in stream) == (label == 0)  # only true pairs are contiguous in the corpus


def test_missing_special_tokens_are_a_one_line_error():
  with pytest.raises(DataError, match=r"needs the special token\(s\) \[MASK\].*data.special_tokens"):
    MlmVocab.from_tokenizer(CharTokenizer.from_text("abc"))
  with pytest.raises(DataError, match=r"\[CLS\], \[SEP\]"):
    MlmVocab.from_tokenizer(CharTokenizer.from_text("abc", ("[MASK]",)), nsp=True)


def test_config_validation_of_the_recipe():
  c = cfglib.default_config()
  c.train.objective = "masked_lm"
  with pytest.raises(cfglib.ConfigError, match="model.family=encoder"):
    cfglib.validate(c)
  c.model.family = "encoder"
  cfglib.validate(c)
  c.train.mlm_nsp = True
  with pytest.raises(cfglib.ConfigError, match="nsp_head=True"):
    cfglib.validate(c)
  c.model.update(pooler=True, nsp_head=True)
  cfglib.validate(c)
  c.train.mlm_mask_fraction = 0.95
  with pytest.raises(cfglib.ConfigError, match="sum to at most 1"):
    cfglib.validate(c)


def test_masked_lm_objective_loss_accuracy_and_nsp_from_exact_sums(char):
  import dataclasses

  import jax
  import jax.numpy as jnp
  import optax

  import flax.linen as nn
  from llmjax import objectives
  from llmjax.model import TransformerConfig, build_model
  c = cfglib.default_config()
  c.train.update(objective="masked_lm", mlm_nsp=True)
  c.data.update(seq_len=32, batch_size=4)
  cfg = TransformerConfig(vocab_size=char.vocab_size, num_layers=1, num_heads=2, embed_dim=16,
                          max_seq_len=32, family="encoder", causal=False, norm_position="post",
                          type_vocab_size=2, pooler=True, nsp_head=True)
  model = build_model(cfg)
  obj = objectives.build(c, cfg)
  assert not obj.reports_bits_per_byte
  assert set(obj.batch_spec(c)) == {"inputs", "targets", "weights", "token_types", "segment_ids",
                                    "nsp_labels"}
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), **obj.init_inputs((4, 32)))["params"])
  ds = obj.wrap_dataset(_Tokens(char))
  batch = {k: jnp.asarray(v) for k, v in ds.batch("train", 0, 4).items()}
  assert set(batch) == set(obj.batch_spec(c))
  total, aux = obj.loss(model, params, batch, jax.random.key(1), True)
  logits, nsp = model.apply({"params": params}, batch["inputs"], token_types=batch["token_types"],
                            segment_ids=batch["segment_ids"], return_nsp=True)
  w = batch["weights"]
  per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mlm = float(jnp.sum(per * w) / jnp.sum(w))
  nsp_loss = float(optax.softmax_cross_entropy_with_integer_labels(nsp, batch["nsp_labels"]).mean())
  np.testing.assert_allclose(float(aux["loss"]), mlm, rtol=1e-5)
  np.testing.assert_allclose(float(total), mlm + nsp_loss, rtol=1e-5)
  sums = obj.eval_sums(model, params, batch, jax.random.key(1))
  metrics = obj.finalize({k: float(v) for k, v in sums.items()})
  correct = float(jnp.sum((logits.argmax(-1) == batch["targets"]) * w))
  assert metrics["mlm_accuracy"] == pytest.approx(correct / float(jnp.sum(w)))
  assert metrics["nsp_accuracy"] == pytest.approx(
      float(jnp.mean(nsp.argmax(-1) == batch["nsp_labels"])))
  assert metrics["loss"] == pytest.approx(mlm, rel=1e-5)
  # masked LM also runs on a decoder made bidirectional (no token types, no NSP)
  dec = dataclasses.replace(cfg, family="decoder", type_vocab_size=0, pooler=False, nsp_head=False)
  c.train.mlm_nsp = False
  obj = objectives.build(c, dec)
  model = build_model(dec)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), **obj.init_inputs((4, 32)))["params"])
  batch = {k: jnp.asarray(v) for k, v in obj.wrap_dataset(_Tokens(char)).batch("val", 0, 4).items()}
  assert np.isfinite(float(obj.loss(model, params, batch, jax.random.key(1), True)[0]))


def test_bert_small_tiny_trains_resumes_exactly_and_fills_masks(tmp_path):
  """experiments/bert_small.py:tiny end to end: MLM + NSP metrics in validation, bit-exact
  resumption (masks come from (seed, step)), and fill-mask on the trained run."""
  import json

  from conftest import run_cli
  from llmjax import loop
  from llmjax.experiment import load_config
  c = load_config("bert_small", "tiny")
  c.train.update(progress=False, tensorboard=False, steps=6, checkpoint_every=3, eval_every=3)
  cfglib.validate(c, 1)
  result = loop.train(c, str(tmp_path / "a"))
  assert {"loss", "mlm_accuracy", "nsp_accuracy", "nsp_loss"} <= set(result)
  assert "bpb" not in result
  half = c.copy_and_resolve_references()
  half.train.steps = 3
  loop.train(half, str(tmp_path / "b"))
  resumed = loop.train(c, str(tmp_path / "b"))
  assert resumed == result
  r = run_cli(["-m", "llmjax.fill_mask", f"--workdir={tmp_path / 'a'}", "--top_k=2",
               "--text=Return the [MASK] of the [MASK].", "--print_ids"])
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("mask ") == 2 and len(r.stdout.strip().splitlines()) == 6
  saved = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
  assert saved["special_tokens"] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_bert_topic_task_is_few_labels_per_topic_with_disjoint_splits(tmp_path):
  """benchmarks/bert_topic.py's task: --per_label training and --val_per_label validation snippets
  per topic, drawn from issue 9's training snippets, never the same text twice; test is the 95
  held-out snippets (whose absence from the pretraining corpus tests/test_finetune.py checks)."""
  import json
  import sys
  from collections import Counter

  from conftest import ROOT
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import bert_topic
  import finetune_classify
  task = bert_topic.make_task(tmp_path, per_label=16, val_per_label=20)
  parts = {name: [json.loads(l) for l in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
           for name in ("train", "val", "test")}
  assert set(Counter(r["label"] for r in parts["train"]).values()) == {16}
  assert set(Counter(r["label"] for r in parts["val"]).values()) == {20}
  assert len(Counter(r["label"] for r in parts["train"])) == 4
  _, held_out, plain, _ = finetune_classify.topic_sets()
  assert parts["test"] == held_out and task["summary"]["test"] == 95
  texts = [r["text"] for name in ("train", "val", "test") for r in parts[name]]
  assert len(set(texts)) == len(texts)
  assert all(r in plain for r in parts["train"] + parts["val"])
  again = bert_topic.make_task(tmp_path / "again", per_label=16, val_per_label=20)
  assert again["train"] == task["train"]  # a fixed draw: every arm and seed sees the same labels


@pytest.fixture(scope="module")
def bert_topic_benchmark(tmp_path_factory):
  """benchmarks/bert_topic.py's protocol (few-label topic classification on issue 9's split, best
  checkpoint on validation, seeds 0/1/2) with its 2000-step base and the learning rate its full
  run chose on validation for both arms (1e-3) instead of the 3-rate grid: the very runs
  benchmarks/RESULTS.md reports. ~17 min on a quiet 2-core CPU, ~35 under load. Not smaller: with
  a 600- or 1000-step base the pretrained model does NOT beat scratch (RESULTS.md)."""
  import json

  from conftest import run_cli
  work = tmp_path_factory.mktemp("bert_topic")
  out = work / "bert_topic.json"
  r = run_cli(["benchmarks/bert_topic.py", f"--workdir={work / 'w'}", "--pretrain_steps=2000",
               "--pretrain_warmup=200", "--lrs=1e-3", "--seeds=0,1,2", f"--out={out}"],
              timeout=7200)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(out.read_text())


@pytest.mark.slow
def test_bert_small_mlm_accuracy_rises_well_above_the_unigram_baseline(bert_topic_benchmark):
  """The issue's first learning bar (2000 steps: 0.155 vs 0.024 in benchmarks/RESULTS.md)."""
  mlm = bert_topic_benchmark["pretrain"]["final"]["mlm_accuracy"]
  assert mlm > 3 * bert_topic_benchmark["unigram_baseline"]["accuracy"]


@pytest.mark.slow
def test_pretraining_helps_few_label_topic_classification(bert_topic_benchmark):
  """The issue's second learning bar: fine-tuned on 16 labelled snippets per topic, the pretrained
  bert_small beats the same architecture trained from scratch on every seed, on average by 2
  points (test accuracy on issue 9's 95 held-out snippets, checkpoint chosen on validation). On
  the word-order task of benchmarks/bert_finetune.py it does not (benchmarks/RESULTS.md)."""
  diff = bert_topic_benchmark["classification"]["pretrained_minus_scratch"]
  assert len(diff["per_seed"]) == 3
  assert diff["min"] > 0 and diff["mean"] > 0.02
