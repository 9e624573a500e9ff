"""Tokenizers, corpus sources and deterministic per-process batches."""
import numpy as np
import pytest

from llmjax import config as cfglib
from llmjax.data import (ByteTokenizer, CharTokenizer, DataError, load_dataset, load_tokenizer,
                         packed_segments)
from llmjax.data import sources
from llmjax.data.sources import write_token_file


def data_config(**kw):
  c = cfglib.default_config().data
  c.update(seq_len=16, batch_size=8, **kw)
  return c


def test_char_and_byte_tokenizers_round_trip(tmp_path):
  text = "Hello, wörld!\nSecond line."
  char = CharTokenizer.from_text(text)
  assert char.decode(char.encode(text)) == text
  assert list(char.encode_array(text)) == char.encode(text)
  with pytest.raises(ValueError, match="not in this char tokenizer's vocabulary"):
    char.encode("Z")
  byte = ByteTokenizer()
  assert byte.decode(byte.encode(text)) == text and byte.vocab_size == 256
  for tok in (char, byte):
    tok.save(tmp_path / tok.kind)
    again = load_tokenizer(tmp_path / tok.kind)
    assert again.encode(text) == tok.encode(text)


def test_sentencepiece_is_trained_from_the_corpus_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
  ds = load_dataset(data_config(tokenizer="sentencepiece", sp_vocab_size=512), seed=0)
  tok = ds.tokenizer
  assert tok.vocab_size == 512 and tok.eos_id is not None
  text = "The quick brown fox jumps over the lazy dog."
  assert tok.decode(tok.encode(text)) == text
  cached = list((tmp_path / "cache" / "sentencepiece").glob("*.model"))
  assert len(cached) == 1
  tok.save(tmp_path / "run")
  assert load_tokenizer(tmp_path / "run").encode(text) == tok.encode(text)


def test_embedded_corpus_needs_no_files():
  docs = sources.embedded_documents()
  assert len(docs) > 50 and sum(map(len, docs)) > 400_000


def test_batches_are_a_pure_function_of_seed_split_and_step():
  ds = load_dataset(data_config(), seed=3)
  a, b = ds.batch("train", 7, 8), ds.batch("train", 7, 8)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
  assert not np.array_equal(ds.batch("train", 8, 8)["inputs"], a["inputs"])
  assert not np.array_equal(ds.batch("val", 7, 8)["inputs"], a["inputs"])
  other_seed = load_dataset(data_config(), seed=4)
  assert not np.array_equal(other_seed.batch("train", 7, 8)["inputs"], a["inputs"])


def test_each_process_gets_only_its_rows_of_the_global_batch():
  ds = load_dataset(data_config(), seed=0)
  full = ds.batch("train", 5, 8)
  parts = [ds.batch("train", 5, 8, process_index=i, process_count=4) for i in range(4)]
  assert all(p["inputs"].shape == (2, 16) for p in parts)
  np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), full["inputs"])


def test_train_and_validation_splits_are_disjoint():
  ds = load_dataset(data_config(val_fraction=0.1), seed=0)
  total = len(ds.train) + len(ds.val)
  assert abs(len(ds.val) - 0.1 * total) <= 1


def test_text_glob_and_memory_mapped_token_files(tmp_path):
  for i in range(3):
    (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 50)
  ds = load_dataset(data_config(path=str(tmp_path / "*.txt"), tokenizer="byte"), seed=0)
  assert ds.tokenizer.decode(ds.train[:16]) == "document number "
  tokens = np.arange(5000) % 256
  write_token_file(str(tmp_path / "tokens.bin"), tokens)
  ds = load_dataset(data_config(path=str(tmp_path / "tokens.bin"), tokenizer="byte"), seed=0)
  assert isinstance(ds.train, np.memmap)
  batch = ds.batch("train", 0, 8)
  np.testing.assert_array_equal((batch["inputs"][:, 1:] - batch["inputs"][:, :-1]) % 256, 1)
  np.save(tmp_path / "tokens.npy", tokens.astype(np.uint16))
  ds = load_dataset(data_config(path=str(tmp_path / "tokens.npy"), tokenizer="byte"), seed=0)
  assert len(ds.train) + len(ds.val) == 5000


def test_missing_empty_and_too_small_corpora_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match="matches no file"):
    load_dataset(data_config(path=str(tmp_path / "nothing*.txt")), seed=0)
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(DataError, match="empty"):
    load_dataset(data_config(path=str(tmp_path / "empty.txt")), seed=0)
  (tmp_path / "tiny.txt").write_text("abc")
  with pytest.raises(DataError, match="fewer than data.seq_len"):
    load_dataset(data_config(path=str(tmp_path / "tiny.txt")), seed=0)
  with pytest.raises(DataError, match="does not exist"):
    load_dataset(data_config(path=str(tmp_path / "missing.bin"), tokenizer="byte"), seed=0)


def test_packing_restarts_segments_and_positions_after_eos():
  inputs = np.asarray([[5, 6, 1, 7, 8, 9, 1, 4]])
  out = packed_segments(inputs, eos_id=1)
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 3]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0, 1, 2, 3, 0]])
  with pytest.raises(DataError, match="needs a tokenizer with an end-of-document token"):
    load_dataset(data_config(packing=True), seed=0)
