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
# Special tokens (data.special_tokens) that objectives look up by role. Any other string given
# there is carried as a special token with no role.
SPECIAL_ROLES = {"[PAD]": "pad", "[UNK]": "unk", "[CLS]": "cls", "[SEP]": "sep", "[MASK]": "mask"}


class SpecialTokens:
  """Special tokens an llmjax tokenizer carries after its own vocabulary (ids base, base+1, ...).

  Text never encodes to them (a literal "[MASK]" in text is ordinary characters; see
  `encode_with_specials`), decoding drops them, and objectives find them through `special_ids`.
  """
  special_tokens: tuple[str, ...] = ()
  base_vocab_size: int = 0

  @property
  def special_ids(self) -> dict[str, int]:
    """Role ('cls', 'sep', 'mask', 'pad', 'unk', or the token itself) -> id."""
    return {SPECIAL_ROLES.get(t, t): self.base_vocab_size + i
            for i, t in enumerate(self.special_tokens)}

  @property
  def vocab_size(self) -> int:
    return self.base_vocab_size + len(self.special_tokens)

  def _with_specials(self, spec: dict) -> dict:
    return {**spec, "special_tokens": list(self.special_tokens)} if self.special_tokens else spec

  def _plain(self, ids: Sequence[int]) -> list[int]:
    return [int(i) for i in ids if 0 <= int(i) < self.base_vocab_size]

  def id_to_token(self, i: int) -> str:
    i = int(i)
    if i >= self.base_vocab_size:
      return self.special_tokens[i - self.base_vocab_size]
    return self.decode([i])


class CharTokenizer(SpecialTokens):
  """One id per distinct character of the training corpus (nanoGPT's shakespeare_char)."""
  kind = "char"
  eos_id = None

  def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = ()):
    self.chars = list(chars)
    self._index = {c: i for i, c in enumerate(self.chars)}
    self.base_vocab_size = len(self.chars)
    self.special_tokens = tuple(special_tokens)

  @classmethod
  def from_text(cls, text: str, special_tokens: Sequence[str] = ()) -> "CharTokenizer":
    return cls(sorted(set(text)), special_tokens)

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
    _write_spec(directory, self._with_specials({"kind": self.kind, "chars": "".join(self.chars)}))


class ByteTokenizer(SpecialTokens):
  """UTF-8 bytes: a fixed vocabulary of 256 that never meets an unknown character."""
  kind = "byte"
  eos_id = None
  base_vocab_size = 256

  def __init__(self, special_tokens: Sequence[str] = ()):
    self.special_tokens = tuple(special_tokens)

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def save(self, directory: str | os.PathLike) -> None:
    _write_spec(directory, self._with_specials({"kind": self.kind}))


class SentencePieceTokenizer(SpecialTokens):
  kind = "sentencepiece"

  def __init__(self, model_file: str | os.PathLike, special_tokens: Sequence[str] = ()):
    import sentencepiece as spm
    self.model_file = str(model_file)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.base_vocab_size = self._sp.get_piece_size()
    self.special_tokens = tuple(special_tokens)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(self._plain(ids))

  def id_to_token(self, i: int) -> str:
    if int(i) >= self.base_vocab_size:
      return self.special_tokens[int(i) - self.base_vocab_size]
    return self._sp.id_to_piece(int(i))

  def save(self, directory: str | os.PathLike) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    target = Path(directory) / SP_MODEL_FILE
    if Path(self.model_file).resolve() != target.resolve():
      shutil.copyfile(self.model_file, target)
    _write_spec(directory, self._with_specials({"kind": self.kind, "model_file": SP_MODEL_FILE}))


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
  specials = spec.get("special_tokens", ())
  if spec["kind"] == "char":
    return CharTokenizer(spec["chars"], specials)
  if spec["kind"] == "byte":
    return ByteTokenizer(specials)
  if spec["kind"] == "sentencepiece":
    return SentencePieceTokenizer(Path(directory) / spec["model_file"], specials)
  if spec["kind"] == "hf":
    from llmjax.data.hf_tokenizer import HFTokenizer  # optional; used by imported HF models
    return HFTokenizer.load(directory, spec)
  raise ValueError(f"unknown tokenizer kind {spec['kind']!r} in {path}")


def cache_dir() -> Path:
  return Path(os.environ.get("LLMJAX_CACHE", Path.home() / ".cache" / "llmjax"))


def train_sentencepiece(text: str, vocab_size: int, split_digits: bool = False,
                        special_tokens: Sequence[str] = ()) -> SentencePieceTokenizer:
  """Trains (or reuses from the cache) a BPE sentencepiece model on `text`. split_digits: every
  digit is its own piece (as Llama's tokenizer does), so numbers tokenize consistently.
  special_tokens are appended after the trained vocabulary (SpecialTokens)."""
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
  return SentencePieceTokenizer(model_file, special_tokens)


def build_tokenizer(data_config, corpus_text: str | None):
  """The tokenizer named by the data config; char and trained sentencepiece need the corpus text."""
  kind = data_config.tokenizer
  specials = parse_special_tokens(data_config.get("special_tokens", ""))
  if kind == "byte":
    return ByteTokenizer(specials)
  if kind == "char":
    if corpus_text is None:
      raise ValueError("data.tokenizer='char' needs the text corpus to build its vocabulary")
    return CharTokenizer.from_text(corpus_text, specials)
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
    return SentencePieceTokenizer(data_config.tokenizer_path, specials)
  if corpus_text is None:
    raise ValueError("training a sentencepiece tokenizer needs a text corpus; "
                     "set data.tokenizer_path to an existing .model file")
  return train_sentencepiece(corpus_text, data_config.sp_vocab_size,
                             split_digits=bool(data_config.get("sp_split_digits", False)),
                             special_tokens=specials)


def parse_special_tokens(text: str) -> tuple[str, ...]:
  """'[PAD],[CLS], [SEP]' -> ('[PAD]', '[CLS]', '[SEP]') (data.special_tokens)."""
  return tuple(t.strip() for t in text.split(",") if t.strip())


def special_ids(tokenizer) -> dict[str, int]:
  """Role -> id of the tokenizer's special tokens ({} when it has none)."""
  return dict(getattr(tokenizer, "special_ids", None) or {})


def encode_plain(tokenizer, text: str) -> np.ndarray:
  """`text`'s ids without the special tokens a tokenizer's post-processor adds (HF's [CLS] ...
  [SEP]), for objectives that place special tokens themselves."""
  if getattr(tokenizer, "kind", None) == "hf":
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
  return tokenizer.encode_array(text)


def encode_with_specials(tokenizer, text: str) -> np.ndarray:
  """`text`'s ids where the literal strings of the tokenizer's special tokens ("[MASK]") become
  their ids; HF tokenizers do this themselves (and add their [CLS]/[SEP] template)."""
  if getattr(tokenizer, "kind", None) == "hf":
    return tokenizer.encode_array(text)
  specials = {t: tokenizer.base_vocab_size + i for i, t in enumerate(tokenizer.special_tokens)}
  if not specials:
    return tokenizer.encode_array(text)
  import re
  pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
  ids: list[int] = []
  for part in re.split(pattern, text):
    if part in specials:
      ids.append(specials[part])
    elif part:
      ids.extend(int(i) for i in tokenizer.encode_array(part))
  return np.asarray(ids, np.int32)
