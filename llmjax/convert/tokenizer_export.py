"""Writes an llmjax run's tokenizer in a form transformers' AutoTokenizer loads.

- 'hf' (an imported tokenizer): its original tokenizer.json / tokenizer.model and config.
- 'char' and 'byte': an exact tokenizer.json built with the `tokenizers` library (one token per
  character / per UTF-8 byte, same ids, decoding by concatenation).
- 'sentencepiece': the .model file with a tokenizer_config.json naming LlamaTokenizer (same ids
  for ordinary text; transformers re-implements sentencepiece's whitespace normalization, so runs
  of spaces or newlines can differ: a warning says so).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from llmjax.data.hf_tokenizer import HF_CONFIG, HF_JSON, SP_MODEL, _tokenizers

FAST_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
               "clean_up_tokenization_spaces": False}


def _char_level(vocab: dict[str, int], byte_level: bool):
  tk = _tokenizers()
  from tokenizers import Regex, decoders, models, pre_tokenizers
  tokenizer = tk.Tokenizer(models.WordLevel(vocab, unk_token=None))
  # Every single character is its own pre-token ("[\s\S]" also matches newlines).
  split = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
  if byte_level:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), split])
    tokenizer.decoder = decoders.ByteLevel()
  else:
    tokenizer.pre_tokenizer = split
    tokenizer.decoder = decoders.Fuse()
  return tokenizer


def save(tokenizer, out: Path) -> list[str]:
  kind = tokenizer.kind
  if kind == "hf":
    return tokenizer.save_hf(out)
  if kind == "sentencepiece":
    warnings.warn("exported the sentencepiece tokenizer.model for transformers' LlamaTokenizer, "
                  "which re-implements sentencepiece's normalization: text with repeated spaces or "
                  "newlines may tokenize differently there than in llmjax", stacklevel=2)
    shutil.copyfile(tokenizer.model_file, out / SP_MODEL)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "legacy": True}
    if tokenizer.eos_id is not None:
      config["eos_token"] = tokenizer._sp.id_to_piece(tokenizer.eos_id)
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2))
    return [SP_MODEL, HF_CONFIG]
  if kind == "char":
    tk = _char_level({c: i for i, c in enumerate(tokenizer.chars)}, byte_level=False)
  elif kind == "byte":
    tk = _char_level({ch: b for b, ch in _bytes_to_unicode().items()}, byte_level=True)
  else:
    return []  # an unknown future kind: weights are still exported, the tokenizer is not
  tk.save(str(out / HF_JSON))
  (out / HF_CONFIG).write_text(json.dumps(FAST_CONFIG, indent=2))
  return [HF_JSON, HF_CONFIG]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer applies:
  printable bytes map to themselves, the others to chr(256 + n)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars = printable[:]
  n = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(printable, map(chr, chars)))
