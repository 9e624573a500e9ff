"""tests/spmd_driver.py's 5 training steps for the other model families, on several meshes in one
process with 8 fake CPU devices: a T5-style encoder-decoder (relative position buckets, gated GELU,
RMS norm, shared untied embeddings; seq2seq loss on packed pairs with segment ids on both sides)
and a BERT-style encoder (post-norm, learned positions, token types, pooler; masked LM with
whole-word masking + next-sentence prediction). Both annotate the same logical axis names as the
decoders, so every layout must train like one device.

Usage (tests/test_sharding.py runs it through conftest.run_cli with 8 devices):
  python tests/family_spmd_driver.py OUT_PREFIX FAMILY[,FAMILY] [LAYOUT,LAYOUT,...]
writes OUT_PREFIX.FAMILY.npz and OUT_PREFIX.FAMILY.npz.json per family (see spmd_driver.main).
"""
from __future__ import annotations

import sys

import numpy as np

import spmd_driver
from llmjax.data import mlm
from llmjax.data import seq2seq as s2s

SOURCE_LEN, TARGET_LEN = 24, 16
LAYOUTS = ("single", "data8", "fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2",
           "data2_sequence2_tensor2")
SPECIALS = 5  # ids 0..4: [PAD], [UNK], [CLS], [SEP], [MASK] (encoder rows)
_base_config = spmd_driver.gpt_config  # main() swaps spmd_driver's config/batches per family


def encoder_decoder_config(**model):
  c = _base_config(**dict(dict(
      family="encoder_decoder", encoder_layers=2, position="relative", norm="rmsnorm",
      mlp="geglu", use_bias=False, tie_embeddings=False, share_embeddings=True,
      scale_attention=False), **model))
  c.data.update(seq_len=TARGET_LEN, source_len=SOURCE_LEN, packing=True)
  c.train.update(objective="seq2seq")
  return c


def encoder_decoder_batches(config):
  """Random (source, target) pairs of random lengths, packed by llmjax.data.seq2seq.pack: rows
  hold several pairs, so the segment ids (both sides) and restarting positions matter."""
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(1, spmd_driver.VOCAB, rng.integers(3, 12)).tolist(),
            rng.integers(1, spmd_driver.VOCAB, rng.integers(2, 8)).tolist()) for _ in range(400)]
  rows = s2s.pack(pairs, SOURCE_LEN, TARGET_LEN, packing=True, start_id=0)
  b = config.data.batch_size
  assert len(rows["inputs"]) >= b * spmd_driver.STEPS
  assert rows["segment_ids"].max() > 1  # packed
  for step in range(spmd_driver.STEPS):
    yield {k: v[step * b:(step + 1) * b] for k, v in rows.items()}


def encoder_config(**model):
  c = _base_config(**dict(dict(
      family="encoder", causal=False, norm_position="post", position="learned",
      norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True, type_vocab_size=2,
      pooler=True, nsp_head=True), **model))
  c.train.update(objective="masked_lm", mlm_whole_word=True, mlm_nsp=True)
  return c


def encoder_batches(config):
  """llmjax.data.mlm's own rows ([CLS] A [SEP] B [SEP], 80/10/10 masking of whole words, NSP
  labels) over a random token stream with a made-up vocabulary table."""
  rng = np.random.default_rng(0)
  special = np.zeros(spmd_driver.VOCAB, bool)
  special[:SPECIALS] = True
  continues = rng.random(spmd_driver.VOCAB) < 0.3
  continues[:SPECIALS] = False
  vocab = mlm.MlmVocab(mask_id=4, cls_id=2, sep_id=3, special=special, continues=continues,
                       space=np.zeros(spmd_driver.VOCAB, bool))
  stream = rng.integers(SPECIALS, spmd_driver.VOCAB, 4000).astype(np.int32)
  data = mlm.MaskedLMDataset(train=stream, val=stream, tokenizer=None, vocab=vocab,
                             seq_len=config.data.seq_len, whole_word=True, nsp=True)
  for step in range(spmd_driver.STEPS):
    yield data.batch("train", step, config.data.batch_size)


FAMILIES = {"encoder_decoder": (encoder_decoder_config, encoder_decoder_batches),
            "encoder": (encoder_config, encoder_batches)}


def main(prefix: str, families, layouts) -> None:
  for family in families:
    spmd_driver.gpt_config, spmd_driver.batches = FAMILIES[family]
    spmd_driver.main(f"{prefix}.{family}.npz", layouts, extras=False)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2].split(","),
       tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else LAYOUTS)
