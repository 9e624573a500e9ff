"""llmjax.eval.metrics against hand-computed values and the reference libraries."""
import math

import pytest

from llmjax.eval import metrics as M


def test_squad_normalization_exact_match_and_token_f1():
  assert M.normalize_answer("The  Cat, sat!") == "cat sat"
  assert M.normalize_answer("An apple a day") == "apple day"
  assert M.exact_match_one("the Cat.", ["dog", "cat"]) == 1.0
  assert M.exact_match_one("cats", ["cat"]) == 0.0
  # pred tokens cat sat on mat, ref cat sat on hat: 3 common, P = R = 3/4
  assert M.token_f1_one("the cat sat on mat", ["a cat sat on the hat"]) == pytest.approx(0.75)
  # best reference wins; P = 1, R = 1/2 -> 2/3 against the second
  assert M.token_f1_one("cat", ["dog", "cat sat"]) == pytest.approx(2 / 3)
  # repeated tokens are clipped by the Counter intersection: P = 1/3, R = 1 -> 1/2
  assert M.token_f1_one("cat cat cat", ["cat"]) == pytest.approx(0.5)
  assert M.token_f1_one("", [""]) == 1.0 and M.token_f1_one("the", ["cat"]) == 0.0
  assert M.exact_match(["a", "b"], [["a"], ["c"]]) == 0.5
  assert M.token_f1(["cat sat", "x"], [["cat"], ["x"]]) == pytest.approx((2 / 3 + 1) / 2)


def test_bleu_hand_computed_and_tokenizers():
  # hyp/ref of 6 tokens: clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; brevity penalty 1
  want = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
  assert M.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(want, abs=1e-9)
  assert M.bleu(["a b c d e"], [["a b c d e"]]) == pytest.approx(100.0)
  # several references, different counts per example (the missing one is None to sacrebleu)
  assert M.bleu(["a b c d e", "f g h i"], [["x", "a b c d e"], ["f g h i"]]) == pytest.approx(100.0)
  sacrebleu = pytest.importorskip("sacrebleu")
  hyp, ref = ["il a dit «oui»—enfin"], [["il a dit « oui » — enfin"]]
  for tok in ("13a", "intl"):
    assert M.bleu(hyp, ref, tokenize=tok) == pytest.approx(
        sacrebleu.corpus_bleu(hyp, [[ref[0][0]]], tokenize=tok).score)
  assert M.TEXT_METRICS["bleu_intl"](hyp, ref) > M.TEXT_METRICS["bleu"](hyp, ref)


def test_chrf_matches_sacrebleu():
  sacrebleu = pytest.importorskip("sacrebleu")
  hyps, refs = ["the cat sat", "hello there"], [["the cat ran"], ["hello world"]]
  assert M.chrf(hyps, refs) == pytest.approx(
      sacrebleu.corpus_chrf(hyps, [[r[0] for r in refs]]).score)
  assert M.chrf(["same text"], [["same text"]]) == pytest.approx(100.0)


def test_rouge_hand_computed():
  # unigrams: 2 of 3 shared; bigrams: 1 of 2; longest common subsequence: 2 of 3
  got = M.rouge(["the cat sat"], [["the cat ran"]])
  assert got["rouge1"] == pytest.approx(2 / 3)
  assert got["rouge2"] == pytest.approx(1 / 2)
  assert got["rougeL"] == pytest.approx(2 / 3)
  # LCS skips gaps: "a b c d" vs "a x b y d": LCS a b d = 3, P = 3/4, R = 3/5
  assert M.rouge(["a b c d"], [["a x b y d"]])["rougeL"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
  both = M.text_metrics(["the cat sat"], [["the cat ran"]], ["exact_match", "rougeL", "rouge1"])
  assert list(both) == ["exact_match", "rougeL", "rouge1"] and both["exact_match"] == 0.0
  with pytest.raises(ValueError, match="unknown text metric 'blue'"):
    M.text_metrics(["a"], [["a"]], ["blue"])


def test_classification_metrics_match_sklearn():
  skm = pytest.importorskip("sklearn.metrics")
  labels = ["pos", "neg", "neu", "pos", "neg", "pos", "neu", "neu"]
  preds = ["pos", "pos", "neu", "neg", "neg", "pos", "pos", "neg"]
  classes = ["neg", "neu", "pos"]
  assert M.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
  assert M.macro_f1(preds, labels) == pytest.approx(skm.f1_score(labels, preds, average="macro"))
  assert M.confusion_matrix(preds, labels, classes) == skm.confusion_matrix(
      labels, preds, labels=classes).tolist()
  # a class never predicted nor present scores 0 when named explicitly (sklearn: labels=...)
  assert M.macro_f1(preds, labels, classes + ["other"]) == pytest.approx(
      skm.f1_score(labels, preds, labels=classes + ["other"], average="macro", zero_division=0))


def test_language_modelling_metrics():
  assert M.perplexity(math.log(7.0)) == pytest.approx(7.0)
  assert M.perplexity(1e9) == math.exp(80.0)
  # 100 bytes with 2 bits each cost 200 * ln 2 nats
  assert M.bits_per_byte(200 * math.log(2), 100) == pytest.approx(2.0)
