"""English number words -> French number words with a small encoder-decoder, offline on a CPU.

    python -m llmjax.main --config=experiments/translate_numbers.py --workdir=runs/mt
    python -m llmjax.generate --workdir=runs/mt --prompt="three hundred and twelve" --num_beams=4
    python -m llmjax.evaluate --workdir=runs/mt --data=<data dir>/test.jsonl --metrics=bleu,chrf

num2words writes the parallel corpus on any machine (no download): "one thousand, nine hundred
and eighty-one" -> "mille neuf cent quatre-vingt-un". The numbers 0..9999 are split by ranges of
one hundred: every hundred whose index is 7 mod 20 (700-799, 2700-2799, ..., 8700-8799; 500
numbers) is held out for testing, a further 300 numbers of the remaining ranges validate, and the
rest (9200) train. The model therefore has to compose "sept cent" + "douze" without having seen
"sept cent douze". The files go to $LLMJAX_CACHE/translate_numbers (default
~/.cache/llmjax/translate_numbers), written once, atomically.
"""
import json
import os
from pathlib import Path

from llmjax.config import default_config

LIMIT = 10_000
VAL = 300


def is_test(n: int) -> bool:
  return (n // 100) % 20 == 7


def pair(n: int) -> dict:
  from num2words import num2words
  return {"source": num2words(n, lang="en"), "target": num2words(n, lang="fr")}


def splits() -> dict[str, list[int]]:
  import numpy as np
  test = [n for n in range(LIMIT) if is_test(n)]
  rest = np.random.default_rng(0).permutation([n for n in range(LIMIT) if not is_test(n)])
  return {"train": sorted(rest[VAL:].tolist()), "val": sorted(rest[:VAL].tolist()), "test": test}


def data_dir() -> Path:
  root = Path(os.environ.get("LLMJAX_CACHE", Path.home() / ".cache" / "llmjax"))
  return root / "translate_numbers"


def write_data(directory: Path | None = None) -> Path:
  """Writes train/val/test.jsonl (once; atomically) and returns the directory."""
  directory = Path(directory or data_dir())
  directory.mkdir(parents=True, exist_ok=True)
  for name, numbers in splits().items():
    path = directory / f"{name}.jsonl"
    if path.exists():
      continue
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(pair(n), ensure_ascii=False) + "\n" for n in numbers),
                   encoding="utf-8")
    os.replace(tmp, path)
  return directory


def get_config():
  directory = write_data()
  c = default_config()
  c.model.update(family="encoder_decoder", num_layers=3, encoder_layers=3, num_heads=4,
                 embed_dim=128, mlp_dim=256, max_seq_len=16, position="sinusoidal",
                 norm="rmsnorm", mlp="gelu", use_bias=False, tie_embeddings=True,
                 share_embeddings=True, dropout=0.0, scan_layers=False)
  c.data.update(path=str(directory / "train.jsonl"), val_path=str(directory / "val.jsonl"),
                tokenizer="sentencepiece", sp_vocab_size=400, seq_len=16, source_len=16,
                batch_size=64, packing=False)
  c.optim.update(lr=2e-3, warmup_steps=100, min_lr_ratio=0.05, weight_decay=0.01, b2=0.98)
  c.train.update(objective="seq2seq", steps=1500, eval_every=500, eval_batches=5, log_every=100,
                 checkpoint_every=1500, sample_tokens=0)
  return c
