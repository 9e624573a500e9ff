"""Preference data for DPO: {"prompt", "chosen", "rejected"}, plain text or chat.

Plain: three strings; the responses continue the prompt. Chat: "prompt" is a list of messages
({"role", "content"}) and "chosen" / "rejected" are the assistant's reply, as a string or as a list
of messages; they are rendered with the run's chat template (llmjax.data.chat).

Each pair becomes two token sequences (prompt + chosen, prompt + rejected) whose loss weights are 1
on the response only (its closing EOS / end-of-turn included), so a sequence's log-probability
is that of the response given the prompt. Pairs are one per row, padded (weight 0) to data.seq_len;
batches are a pure function of (seed, split, step) like every llmjax dataset: epoch e shuffles
the training pairs with a permutation from (seed, e); validation pairs come in file order, once.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from llmjax.data import formats as fm
from llmjax.data.sources import DataError

SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  prompt: object              # str, or a tuple of (role, content) messages (chat)
  chosen: object              # str, or a tuple of (role, content) messages
  rejected: object
  source: str = ""

  @property
  def is_chat(self) -> bool:
    return not isinstance(self.prompt, str)


def _messages(value, key: str, where: str) -> tuple:
  parsed = fm.FORMATS["chat"].parse({"messages": value}, where)
  if not parsed.messages:
    raise DataError(f"{where}: \"{key}\" is an empty message list")
  return parsed.messages


def _parse(record: dict, where: str) -> PreferenceExample:
  prompt = record["prompt"]
  values = {}
  if isinstance(prompt, str):
    for key in SIDES:
      if not isinstance(record[key], str):
        raise DataError(f"{where}: \"{key}\" must be a string when \"prompt\" is one (plain "
                        "preference data); use message lists for all three for chat data")
      values[key] = record[key]
  elif isinstance(prompt, list):
    prompt = _messages(prompt, "prompt", where)
    for key in SIDES:
      value = record[key]
      values[key] = (("assistant", value),) if isinstance(value, str) else \
          _messages(value, key, where)
  else:
    raise DataError(f"{where}: \"prompt\" must be a string or a list of chat messages, got "
                    f"{type(prompt).__name__}")
  if values["chosen"] == values["rejected"]:
    raise DataError(f"{where}: \"chosen\" and \"rejected\" are identical, so the line states no "
                    "preference; fix or remove it")
  return PreferenceExample(prompt, values["chosen"], values["rejected"], where)


fm.register_format("preference", ("prompt", "chosen", "rejected"), _parse)


def _as_trainable(ex: PreferenceExample, side: str):
  """The example a response becomes for the task encoder: prompt -> response."""
  response = getattr(ex, side)
  if ex.is_chat:
    return fm.ChatExample(messages=tuple(ex.prompt) + tuple(response), source=ex.source)
  return fm.PromptCompletion(prompt=ex.prompt, completion=response, source=ex.source)


@dataclasses.dataclass
class Pair:
  chosen: object              # task_data.Tokenized
  rejected: object
  source: str


class PreferenceDataset:
  """The llmjax dataset interface over preference pairs (see the module docstring)."""

  def __init__(self, train: list, val: list, tokenizer, seq_len: int, seed: int, stats: str):
    self.pairs = {"train": train, "val": val}
    self.tokenizer, self.seq_len, self.seed, self.stats = tokenizer, seq_len, seed, stats
    self.format = "preference"
    self.train = np.concatenate([np.concatenate([p.chosen.tokens, p.rejected.tokens]) for p in train])
    self.val = np.concatenate([np.concatenate([p.chosen.tokens, p.rejected.tokens]) for p in val])

  def rows_per_epoch(self, epoch: int = 0) -> int:
    return len(self.pairs["train"])

  def steps_for_epochs(self, epochs: int, batch_size: int) -> int:
    return max(-(-epochs * len(self.pairs["train"]) // batch_size), 1)

  def num_batches(self, split: str, batch_size: int) -> int:
    return max(-(-len(self.pairs[split]) // batch_size), 1)

  def _train_index(self, row: int) -> int:
    n = len(self.pairs["train"])
    epoch, offset = divmod(row, n)
    order = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
    return int(order[offset])

  def batch(self, split: str, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    per = batch_size // process_count
    first = step * batch_size + process_index * per
    pairs = self.pairs[split]
    if split == "train":
      chosen = [pairs[self._train_index(r)] for r in range(first, first + per)]
    else:
      chosen = [pairs[r] if r < len(pairs) else None for r in range(first, first + per)]
    out = {}
    for side in SIDES:
      inputs = np.zeros((per, self.seq_len), np.int32)
      targets = np.zeros((per, self.seq_len), np.int32)
      weights = np.zeros((per, self.seq_len), np.float32)
      for r, pair in enumerate(chosen):
        if pair is None:
          continue
        seq = getattr(pair, side)
        k = len(seq.tokens) - 1
        inputs[r, :k], targets[r, :k], weights[r, :k] = seq.tokens[:-1], seq.tokens[1:], seq.weights[1:]
      out.update({f"{side}_inputs": inputs, f"{side}_targets": targets, f"{side}_weights": weights})
    return out

  def summary(self) -> str:
    return (f"preference pairs, {len(self.pairs['train']):,} train / {len(self.pairs['val']):,} "
            f"val, one pair per row; {self.stats}")


def batch_fields() -> dict:
  return {f"{side}_{name}": dtype for side in SIDES
          for name, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}


def build(train_ex: list, val_ex: list, tokenizer, data_config, seed: int) -> PreferenceDataset:
  """Encodes preference examples (already split into train and val) into a PreferenceDataset."""
  from llmjax.data.task_data import EncodeStats, Encoder
  config = copy.deepcopy(data_config)
  config.train_on = "last_turn"  # the response only: a chat's last assistant turn
  encoder = Encoder(tokenizer, config)
  notes = []

  def encode(examples, split):
    stats = {side: EncodeStats() for side in SIDES}
    pairs = []
    for ex in examples:
      if not isinstance(ex, PreferenceExample):
        raise DataError(f"{ex.source}: train.objective=dpo needs {{\"prompt\", \"chosen\", "
                        "\"rejected\"}} examples")
      encoded = [encoder.encode(_as_trainable(ex, side), stats[side]) for side in SIDES]
      if all(e is not None for e in encoded):
        if np.array_equal(encoded[0].tokens, encoded[1].tokens):
          raise DataError(f"{ex.source}: \"chosen\" and \"rejected\" are identical after "
                          f"data.truncate={config.truncate} cut them to data.seq_len="
                          f"{config.seq_len}; raise data.seq_len")
        pairs.append(Pair(encoded[0], encoded[1], ex.source))
    if not pairs:
      raise DataError(f"{examples[0].source if examples else split}: no {split} preference pair "
                      "is left after tokenization (responses cut away by data.truncate?); check "
                      "data.seq_len")
    notes.append(f"{split}: {len(pairs):,} of {len(examples):,} pairs kept")
    return pairs

  train, val = encode(train_ex, "train"), encode(val_ex, "val")
  return PreferenceDataset(train, val, tokenizer, config.seq_len, seed, "; ".join(notes))
