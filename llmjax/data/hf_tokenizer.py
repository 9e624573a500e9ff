"""Tokenizers of imported Hugging Face models: `tokenizer.json` (the `tokenizers` library) or
`tokenizer.model` (sentencepiece), with the model's special tokens.

`encode` gives what transformers' `tokenizer(text)["input_ids"]` gives: with the BOS/EOS the
tokenizer adds by itself (tokenizer.json's post-processor; tokenizer_config.json's add_bos_token /
add_eos_token for sentencepiece). `decode` drops special tokens. The run directory keeps the HF
files under their own names (hf_tokenizer.json, tokenizer.model, hf_tokenizer_config.json)
because llmjax's own tokenizer spec is called tokenizer.json.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from llmjax.data.sources import DataError

HF_JSON = "tokenizer.json"            # name in a Hugging Face directory
RUN_JSON = "hf_tokenizer.json"        # name in an llmjax run directory
SP_MODEL = "tokenizer.model"
HF_CONFIG = "tokenizer_config.json"
RUN_CONFIG = "hf_tokenizer_config.json"


def _tokenizers():
  try:
    import tokenizers
  except ImportError:
    raise DataError("this model's tokenizer.json needs the `tokenizers` library: "
                    "pip install llmjax[hf]") from None
  return tokenizers


def _token_content(token) -> str | None:
  if isinstance(token, dict):
    return token.get("content")
  return token


class HFTokenizer:
  kind = "hf"

  def __init__(self, file: str | os.PathLike, tokenizer_config: dict | None = None,
               eos_id: int | None = None, bos_id: int | None = None):
    self.file = Path(file)
    self.tokenizer_config = dict(tokenizer_config or {})
    self.backend = "sentencepiece" if self.file.suffix == ".model" else "tokenizers"
    if self.backend == "tokenizers":
      self._tok = _tokenizers().Tokenizer.from_file(str(self.file))
      lookup = self._tok.token_to_id
    else:
      import sentencepiece as spm
      self._sp = spm.SentencePieceProcessor(model_file=str(self.file))
      lookup = self._sp_lookup
    cfg = self.tokenizer_config
    named = lambda key: (lookup(_token_content(cfg[key])) if cfg.get(key) else None)  # noqa: E731
    self.eos_id = named("eos_token") if named("eos_token") is not None else eos_id
    self.bos_id = named("bos_token") if named("bos_token") is not None else bos_id
    if self.backend == "sentencepiece":
      self.eos_id = self.eos_id if self.eos_id is not None else _nonneg(self._sp.eos_id())
      self.bos_id = self.bos_id if self.bos_id is not None else _nonneg(self._sp.bos_id())
      self.add_bos = bool(cfg.get("add_bos_token", False)) and self.bos_id is not None
      self.add_eos = bool(cfg.get("add_eos_token", False)) and self.eos_id is not None

  def token_id(self, piece: str) -> int | None:
    """The id of a token string (e.g. T5's '<extra_id_0>'), or None if it is not one token."""
    if self.backend == "tokenizers":
      return self._tok.token_to_id(piece)
    return self._sp_lookup(piece)

  def _sp_lookup(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None  # unknown pieces map to <unk>

  # -- construction ---------------------------------------------------------------------------
  @classmethod
  def from_hf_dir(cls, directory: str | os.PathLike, model_config: dict | None = None):
    """The tokenizer of an HF model directory, or None if it has neither tokenizer file.
    tokenizer.json wins over tokenizer.model (it carries the added tokens). An llmjax run
    directory (whose tokenizer.json is llmjax's spec) gives the tokenizer it saved."""
    directory = Path(directory)
    if _is_llmjax_spec(directory / HF_JSON):
      from llmjax.data.tokenizers import load_tokenizer
      return load_tokenizer(directory)
    config_path = directory / HF_CONFIG
    tok_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    model_config = model_config or {}
    eos, bos = _first(model_config.get("eos_token_id")), _first(model_config.get("bos_token_id"))
    for name in (HF_JSON, SP_MODEL):
      if (directory / name).exists():
        return cls(directory / name, tok_config, eos_id=eos, bos_id=bos)
    return None

  @classmethod
  def load(cls, directory: str | os.PathLike, spec: dict) -> "HFTokenizer":
    """Rebuilds the tokenizer saved into a run directory by `save`."""
    directory = Path(directory)
    config_path = directory / RUN_CONFIG
    tok_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    tok = cls(directory / spec["file"], tok_config, eos_id=spec.get("eos_id"),
              bos_id=spec.get("bos_id"))
    tok.eos_id, tok.bos_id = spec.get("eos_id"), spec.get("bos_id")
    return tok

  def save(self, directory: str | os.PathLike) -> None:
    """Copies the HF files into a run directory and writes llmjax's spec (tokenizer.json)."""
    from llmjax.data.tokenizers import _write_spec
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = RUN_JSON if self.backend == "tokenizers" else SP_MODEL
    if self.file.resolve() != (directory / name).resolve():
      shutil.copyfile(self.file, directory / name)
    if self.tokenizer_config:
      (directory / RUN_CONFIG).write_text(json.dumps(self.tokenizer_config, indent=2))
    _write_spec(directory, {"kind": self.kind, "file": name, "eos_id": self.eos_id,
                            "bos_id": self.bos_id})

  def save_hf(self, directory: str | os.PathLike) -> list[str]:
    """Writes the files transformers' AutoTokenizer reads (tokenizer.json or tokenizer.model,
    and tokenizer_config.json)."""
    directory = Path(directory)
    name = HF_JSON if self.backend == "tokenizers" else SP_MODEL
    shutil.copyfile(self.file, directory / name)
    config = dict(self.tokenizer_config)
    if self.eos_id is not None and "eos_token" not in config:
      config["eos_token"] = self.id_to_token(self.eos_id)
    if self.bos_id is not None and "bos_token" not in config:
      config["bos_token"] = self.id_to_token(self.bos_id)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast" if self.backend == "tokenizers"
                      else "LlamaTokenizer")
    (directory / HF_CONFIG).write_text(json.dumps(config, indent=2))
    return [name, HF_CONFIG]

  # -- the tokenizer interface ----------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    if self.backend == "tokenizers":
      return self._tok.get_vocab_size(with_added_tokens=True)
    return self._sp.get_piece_size()

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(i) if self.backend == "tokenizers" else self._sp.id_to_piece(i)

  @property
  def special_ids(self) -> dict[str, int]:
    """Role ('cls', 'sep', 'mask', 'pad', 'unk') -> id: from tokenizer_config.json's
    cls_token/sep_token/... when given, else from the tokenizer's own special added tokens spelled
    the BERT way ([CLS], [SEP], [MASK], [PAD], [UNK])."""
    from llmjax.data.tokenizers import SPECIAL_ROLES
    out = {}
    if self.backend == "tokenizers":
      for token in self._tok.get_added_tokens_decoder().values():
        if token.special and token.content in SPECIAL_ROLES:
          out[SPECIAL_ROLES[token.content]] = self._tok.token_to_id(token.content)
    lookup = self._tok.token_to_id if self.backend == "tokenizers" else self._sp_lookup
    for role in ("cls", "sep", "mask", "pad", "unk"):
      name = _token_content(self.tokenizer_config.get(f"{role}_token"))
      if name and lookup(name) is not None:
        out[role] = lookup(name)
    return out

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    if self.backend == "tokenizers":
      return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
    ids = self._sp.encode(text)
    if not add_special_tokens:
      return ids
    return ([self.bos_id] if self.add_bos else []) + ids + ([self.eos_id] if self.add_eos else [])

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    if self.backend == "tokenizers":
      return self._tok.decode(ids, skip_special_tokens=True)
    return self._sp.decode([i for i in ids if not self._sp.is_control(i)])


def _is_llmjax_spec(path: Path) -> bool:
  """llmjax's spec is a small {"kind": ...} object; an HF tokenizer.json never has "kind"."""
  if not path.exists():
    return False
  with open(path, encoding="utf-8") as f:
    head = f.read(4096)
  if '"kind"' not in head:
    return False
  try:
    return "kind" in json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError:
    return False


def _nonneg(i: int) -> int | None:
  return i if i >= 0 else None


def _first(value):
  if isinstance(value, list):
    return value[0] if value else None
  return value
