"""Masked-LM examples and the BERT masking recipe, on the host, as a pure function of
(seed, split, step, row).

Rows: `[CLS] span [SEP]` from the token stream (RoBERTa's full-sentence rows), or with next-sentence
prediction `[CLS] A [SEP] B [SEP]` where B is A's true continuation (label 0) or a span drawn from
elsewhere in the corpus (label 1), 50/50 (Hugging Face's label convention, so an imported
BertForPreTraining head keeps its meaning). Token types are 0 up to the first [SEP], 1 after.

Masking (Devlin et al. 2019): every candidate token (never a special or padding token) is
selected with probability p (15%); a selected token becomes [MASK] 80% of the time, a random
non-special token 10%, and stays unchanged 10%; the loss is taken at selected tokens only. With
whole-word masking the selection is drawn once per word, so all pieces of a word go together.

Masking on the host keeps the batch a pure function of (seed, split, step): validation always
scores the same masks, and resumption replays the exact corruption.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from llmjax.data.sources import DataError
from llmjax.data.tokenizers import special_ids

SPLITS = {"train": 0, "val": 1}
NEEDED = ("mask",)             # the objective cannot run without these roles
ROW_SPECIALS = ("cls", "sep")  # used when the tokenizer has them


@dataclasses.dataclass(frozen=True)
class MlmVocab:
  """What masking needs to know about a vocabulary, as per-id tables."""
  mask_id: int
  cls_id: int | None
  sep_id: int | None
  special: np.ndarray        # bool [vocab]: never selected, never a random replacement
  continues: np.ndarray      # bool [vocab]: this piece continues the previous token's word
  space: np.ndarray          # bool [vocab]: whitespace (a word boundary) in char/byte vocabularies

  @property
  def replacements(self) -> np.ndarray:
    return np.flatnonzero(~self.special).astype(np.int32)

  @classmethod
  def from_tokenizer(cls, tokenizer, nsp: bool = False) -> "MlmVocab":
    ids = special_ids(tokenizer)
    need = NEEDED + (ROW_SPECIALS if nsp else ())
    missing = [f"[{r.upper()}]" for r in need if r not in ids]
    if missing:
      raise DataError(
          f"masked-LM {'with next-sentence prediction ' if nsp else ''}needs the special token(s) "
          f"{', '.join(missing)}, which this {tokenizer.kind} tokenizer does not have; set "
          "--config.data.special_tokens='[PAD],[UNK],[CLS],[SEP],[MASK]' (char, byte, "
          "sentencepiece) or use a WordPiece tokenizer.json that defines them")
    v = tokenizer.vocab_size
    special = np.zeros(v, bool)
    special[list(ids.values())] = True
    continues, space = word_tables(tokenizer)
    return cls(ids["mask"], ids.get("cls"), ids.get("sep"), special, continues, space)


def word_tables(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(continues, space) per id. Pieces: WordPiece '##x' continues; sentencepiece/byte-level BPE
  pieces without their word-start marker ('▁', 'Ġ') continue. Characters and bytes: any
  non-whitespace symbol continues a word unless whitespace precedes it (see word_starts)."""
  v = tokenizer.vocab_size
  continues, space = np.zeros(v, bool), np.zeros(v, bool)
  if tokenizer.kind in ("char", "byte"):
    base = tokenizer.base_vocab_size
    for i in range(base):
      text = tokenizer.decode([i]) if tokenizer.kind == "char" else chr(i) if i < 128 else "x"
      space[i] = text.isspace()
      continues[i] = not space[i]
    return continues, space
  tokens = [tokenizer.id_to_token(i) or "" for i in range(v)]
  if any(t.startswith("##") for t in tokens):
    continues[:] = [t.startswith("##") for t in tokens]
  else:
    marker = "▁" if sum(t.startswith("▁") for t in tokens) >= sum(
        t.startswith("Ġ") for t in tokens) else "Ġ"
    if any(t.startswith(marker) for t in tokens):
      continues[:] = [not t.startswith(marker) for t in tokens]
  return continues, space


def word_starts(ids: np.ndarray, vocab: MlmVocab) -> np.ndarray:
  """bool [..., n]: token i begins a word (the first token, a non-continuing piece, or any token
  after whitespace or a special token)."""
  starts = ~vocab.continues[ids]
  prev_breaks = vocab.space[ids[..., :-1]] | vocab.special[ids[..., :-1]]
  starts[..., 1:] |= prev_breaks
  starts[..., 0] = True
  return starts


def mask_tokens(rng: np.random.Generator, ids: np.ndarray, vocab: MlmVocab, probability: float,
                mask_fraction: float = 0.8, random_fraction: float = 0.1,
                whole_word: bool = False, valid: np.ndarray | None = None):
  """BERT corruption of `ids` (int [..., n]). Returns (inputs, weights float32 = selected).

  `valid` (bool, same shape) marks real tokens; padding is never selected."""
  candidates = ~vocab.special[ids]
  if valid is not None:
    candidates &= valid
  draw = rng.random(ids.shape)
  if whole_word:  # every token takes the draw of its word's first token
    starts = word_starts(ids, vocab)
    index = np.arange(ids.shape[-1])
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    draw = np.take_along_axis(draw, first, axis=-1)
  selected = (draw < probability) & candidates
  action = rng.random(ids.shape)
  to_mask = selected & (action < mask_fraction)
  to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
  replacements = vocab.replacements
  random_ids = replacements[rng.integers(0, len(replacements), ids.shape)]
  inputs = np.where(to_mask, vocab.mask_id, np.where(to_random, random_ids, ids))
  return inputs.astype(np.int32), selected.astype(np.float32)


@dataclasses.dataclass
class MaskedLMDataset:
  """Masked-LM rows over a TokenDataset's train/val token streams (special tokens stripped)."""
  train: np.ndarray
  val: np.ndarray
  tokenizer: object
  vocab: MlmVocab
  seq_len: int
  seed: int = 0
  probability: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1
  whole_word: bool = False
  nsp: bool = False

  @classmethod
  def from_token_dataset(cls, dataset, train_config) -> "MaskedLMDataset":
    t = train_config
    vocab = MlmVocab.from_tokenizer(dataset.tokenizer, nsp=t.mlm_nsp)
    strip = lambda x: np.asarray(x)[~vocab.special[np.asarray(x)]].astype(np.int32)  # noqa: E731
    out = cls(train=strip(dataset.train), val=strip(dataset.val), tokenizer=dataset.tokenizer,
              vocab=vocab, seq_len=dataset.seq_len, seed=dataset.seed,
              probability=t.mlm_probability, mask_fraction=t.mlm_mask_fraction,
              random_fraction=t.mlm_random_fraction, whole_word=t.mlm_whole_word, nsp=t.mlm_nsp)
    for split in ("train", "val"):
      if len(getattr(out, split)) < 2 * out.seq_len + 2:
        raise DataError(f"the {split} split has {len(getattr(out, split))} tokens, too few for "
                        f"masked-LM rows of data.seq_len={out.seq_len}; use a larger corpus or a "
                        "shorter data.seq_len")
    return out

  def row(self, split: str, step: int, index: int) -> dict[str, np.ndarray]:
    """Global row `index` of batch `step` (its own RNG: each process builds only its rows)."""
    rng = np.random.default_rng([self.seed, SPLITS[split], step, index])
    tokens = getattr(self, split)
    v, n = self.vocab, self.seq_len
    head = [v.cls_id] if v.cls_id is not None else []
    sep = [v.sep_id] if v.sep_id is not None else []
    label = 0
    if self.nsp:
      body = n - 3
      len_a = int(rng.integers(max(1, body // 4), max(2, 3 * body // 4)))
      start = int(rng.integers(0, len(tokens) - body))
      a = tokens[start:start + len_a]
      if rng.random() < 0.5:
        b = tokens[start + len_a:start + body]
      else:  # a random span away from A's true continuation (rejection-sampled)
        label = 1
        len_b = body - len_a
        for _ in range(16):
          other = int(rng.integers(0, len(tokens) - len_b))
          if abs(other - (start + len_a)) >= body:
            break
        b = tokens[other:other + len_b]
      ids = np.concatenate([head, a, sep, b, sep]).astype(np.int32)
      types = np.zeros(n, np.int32)
      types[len(head) + len(a) + 1:] = 1
    else:
      body = n - len(head) - len(sep)
      start = int(rng.integers(0, len(tokens) - body))
      ids = np.concatenate([head, tokens[start:start + body], sep]).astype(np.int32)
      types = np.zeros(n, np.int32)
    inputs, weights = mask_tokens(rng, ids, v, self.probability, self.mask_fraction,
                                  self.random_fraction, self.whole_word)
    out = {"inputs": inputs, "targets": ids, "weights": weights, "token_types": types,
           "segment_ids": np.ones(n, np.int32)}
    if self.nsp:
      out["nsp_labels"] = np.int32(label)
    return out

  def batch(self, split: str, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    rows = batch_size // process_count
    lo = process_index * rows
    made = [self.row(split, step, i) for i in range(lo, lo + rows)]
    return {k: np.stack([r[k] for r in made]) for k in made[0]}
