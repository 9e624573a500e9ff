"""Tokenizers: characters, raw bytes, and sentencepiece (trained from the corpus when none is given).

Each tokenizer saves itself into a run directory and `load_tokenizer(dir)` rebuilds it, so a
checkpointed run always decodes with the vocabulary it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

SPEC_FILE = "tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"


class CharTokenizer:
  """One id per distinct character of the training corpus (nanoGPT's shakespeare_char)."""
  kind = "char"
  eos_id = None

  def __init__(self, chars: Sequence[str]):
    self.chars = list(chars)
    self._index = {c: i for i, c in enumerate(self.chars)}

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    return cls(sorted(set(text)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list[int]:
    try:
      return [self._index[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary "
                       "(it was built from the training corpus)") from None

  def encode_array(self, text: str) -> np.ndarray:
    lut = np.full(max(map(ord, self.chars)) + 1, -1, np.int64)
    lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    if codes.size and codes.max() >= lut.size or (lut[codes] < 0).any():
      return np.asarray(self.encode(text), np.int32)  # raises with the offending character
    return lut[codes].astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < len(self.chars))

  def save(self, directory: str | os.PathLike) -> None:
    _write_spec(directory, {"kind": self.kind, "chars": "".join(self.chars)})


class ByteTokenizer:
  """UTF-8 bytes: a fixed vocabulary of 256 that never meets an unknown character."""
  kind = "byte"
  eos_id = None
  vocab_size = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def save(self, directory: str | os.PathLike) -> None:
    _write_spec(directory, {"kind": self.kind})


class SentencePieceTokenizer:
  kind = "sentencepiece"

  def __init__(self, model_file: str | os.PathLike):
    import sentencepiece as spm
    self.model_file = str(model_file)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def save(self, directory: str | os.PathLike) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    target = Path(directory) / SP_MODEL_FILE
    if Path(self.model_file).resolve() != target.resolve():
      shutil.copyfile(self.model_file, target)
    _write_spec(directory, {"kind": self.kind, "model_file": SP_MODEL_FILE})


def _write_spec(directory, spec: dict) -> None:
  Path(directory).mkdir(parents=True, exist_ok=True)
  tmp = Path(directory) / (SPEC_FILE + ".tmp")
  tmp.write_text(json.dumps(spec, ensure_ascii=False))
  os.replace(tmp, Path(directory) / SPEC_FILE)


def load_tokenizer(directory: str | os.PathLike):
  """Rebuilds the tokenizer a run saved with `tokenizer.save(directory)`."""
  path = Path(directory) / SPEC_FILE
  if not path.exists():
    raise FileNotFoundError(f"no {SPEC_FILE} in {directory}: not an llmjax run directory")
  spec = json.loads(path.read_text())
  if spec["kind"] == "char":
    return CharTokenizer(spec["chars"])
  if spec["kind"] == "byte":
    return ByteTokenizer()
  if spec["kind"] == "sentencepiece":
    return SentencePieceTokenizer(Path(directory) / spec["model_file"])
  if spec["kind"] == "hf":
    from llmjax.data.hf_tokenizer import HFTokenizer  # optional; used by imported HF models
    return HFTokenizer.load(directory, spec)
  raise ValueError(f"unknown tokenizer kind {spec['kind']!r} in {path}")


def cache_dir() -> Path:
  return Path(os.environ.get("LLMJAX_CACHE", Path.home() / ".cache" / "llmjax"))


def train_sentencepiece(text: str, vocab_size: int, split_digits: bool = False) -> SentencePieceTokenizer:
  """Trains (or reuses from the cache) a BPE sentencepiece model on `text`. split_digits: every
  digit is its own piece (as Llama's tokenizer does), so numbers tokenize consistently."""
  import sentencepiece as spm
  tag = f"|bpe|{vocab_size}" + ("|split_digits" if split_digits else "")
  key = hashlib.sha256(text.encode("utf-8") + tag.encode()).hexdigest()[:16]
  model_file = cache_dir() / "sentencepiece" / f"{key}.model"
  if not model_file.exists():
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
      corpus = Path(tmp) / "corpus.txt"
      corpus.write_text(text, encoding="utf-8")
      try:
        # Rare characters fall back to their UTF-8 bytes, so nothing is ever <unk>.
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size,
            model_type="bpe", character_coverage=0.9995, byte_fallback=True,
            max_sentence_length=1 << 16, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
            num_threads=os.cpu_count() or 1, minloglevel=2, split_digits=split_digits)
      except RuntimeError as e:
        from llmjax.data.sources import DataError
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: "
                        f"{str(e).splitlines()[0][-160:]}; change data.sp_vocab_size") from None
      tmp_model = model_file.with_suffix(f".tmp{os.getpid()}")
      shutil.copyfile(Path(tmp) / "sp.model", tmp_model)
      os.replace(tmp_model, model_file)  # atomic: concurrent runs never see half a model
  return SentencePieceTokenizer(model_file)


def build_tokenizer(data_config, corpus_text: str | None):
  """The tokenizer named by the data config; char and trained sentencepiece need the corpus text."""
  kind = data_config.tokenizer
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    if corpus_text is None:
      raise ValueError("data.tokenizer='char' needs the text corpus to build its vocabulary")
    return CharTokenizer.from_text(corpus_text)
  if kind == "hf":
    from llmjax.data.hf_tokenizer import HFTokenizer
    path = Path(data_config.tokenizer_path)
    tokenizer = HFTokenizer.from_hf_dir(path) if path.is_dir() else None
    if tokenizer is None:
      raise FileNotFoundError(f"data.tokenizer_path={data_config.tokenizer_path} is not a directory "
                              "holding tokenizer.json or tokenizer.model")
    return tokenizer
  if data_config.tokenizer_path:
    if not Path(data_config.tokenizer_path).exists():
      raise FileNotFoundError(f"data.tokenizer_path={data_config.tokenizer_path} does not exist")
    return SentencePieceTokenizer(data_config.tokenizer_path)
  if corpus_text is None:
    raise ValueError("training a sentencepiece tokenizer needs a text corpus; "
                     "set data.tokenizer_path to an existing .model file")
  return train_sentencepiece(corpus_text, data_config.sp_vocab_size,
                             split_digits=bool(data_config.get("sp_split_digits", False)))
