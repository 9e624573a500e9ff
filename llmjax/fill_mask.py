"""`python -m llmjax.fill_mask --workdir=RUN --text="The quick brown [MASK] jumps." --top_k=5`

Prints, for every mask token in the text, the top-k tokens with their probabilities (softmax over
the whole vocabulary, as Hugging Face's fill-mask pipeline): one header line per mask, then one
line per candidate `probability<TAB>token` (`probability<TAB>id<TAB>token` with --print_ids).

The text is encoded as the run's masked-LM data is: an HF WordPiece tokenizer adds its own
[CLS] ... [SEP]; an llmjax tokenizer with special tokens gets [CLS] and [SEP] around the text when
it has them, and the literal string "[MASK]" becomes the mask id.
"""
from __future__ import annotations

import dataclasses
import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A run directory (masked-LM training run or BERT import).")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
flags.DEFINE_string("text", None, "Text with one or more mask tokens, e.g. [MASK].")
flags.DEFINE_integer("top_k", 5, "Candidates to print per mask.")
flags.DEFINE_bool("print_ids", False, "Also print each candidate's token id.")
FLAGS = flags.FLAGS


class FillMaskError(ValueError):
  """Bad input to fill-mask: one line, exit status 2."""


@dataclasses.dataclass
class Prediction:
  position: int           # index of the mask in the encoded ids
  ids: list[int]          # top-k token ids, most likely first
  probs: list[float]
  tokens: list[str]


def encode(tokenizer, text: str):
  """The ids the model sees for `text` and the mask id. Raises FillMaskError."""
  import numpy as np

  from llmjax.data.tokenizers import encode_with_specials, special_ids
  specials = special_ids(tokenizer)
  if "mask" not in specials:
    raise FillMaskError("this run's tokenizer has no [MASK] token, so nothing can be filled in; "
                        "train with --config.data.special_tokens='[PAD],[UNK],[CLS],[SEP],[MASK]' "
                        "or import a BERT with its WordPiece tokenizer.json")
  ids = [int(i) for i in encode_with_specials(tokenizer, text)]
  if getattr(tokenizer, "kind", None) != "hf":
    ids = ([specials["cls"]] if "cls" in specials else []) + ids + (
        [specials["sep"]] if "sep" in specials else [])
  mask_id = specials["mask"]
  if mask_id not in ids:
    mask_text = tokenizer.id_to_token(mask_id)
    raise FillMaskError(f"--text has no mask token; write {mask_text} where a token should be "
                        f"predicted, e.g. --text=\"The quick brown {mask_text} jumps.\"")
  return np.asarray(ids, np.int32), mask_id


def fill_mask(model, params, tokenizer, text: str, top_k: int = 5) -> list[Prediction]:
  """Top-k predictions for every mask in `text` (in order)."""
  import jax
  import numpy as np
  cfg = model.cfg
  if cfg.causal and cfg.family != "encoder":
    raise FillMaskError("fill-mask needs a bidirectional model (a masked-LM encoder); this run's "
                        "model is causal (model.causal=True)")
  if top_k < 1:
    raise FillMaskError(f"--top_k={top_k} must be at least 1")
  ids, mask_id = encode(tokenizer, text)
  if len(ids) > cfg.max_seq_len:
    raise FillMaskError(f"--text encodes to {len(ids)} tokens but the model's context is "
                        f"{cfg.max_seq_len}; shorten it")
  logits = model.apply({"params": params}, ids[None])
  positions = np.flatnonzero(ids == mask_id)
  probs = np.asarray(jax.device_get(jax.nn.softmax(logits[0, positions].astype("float32"))))
  k = min(top_k, probs.shape[-1])
  out = []
  for pos, p in zip(positions, probs):
    top = np.argsort(-p, kind="stable")[:k]
    out.append(Prediction(int(pos), [int(i) for i in top], [float(p[i]) for i in top],
                          [tokenizer.id_to_token(int(i)) for i in top]))
  return out


def fail(message: str) -> None:
  print(f"llmjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
  if not FLAGS.workdir:
    fail("--workdir is required: a masked-LM run or an imported BERT")
  if FLAGS.text is None:
    fail("--text is required, e.g. --text=\"The quick brown [MASK] jumps.\"")
  logging.set_verbosity(logging.WARNING)
  from llmjax import runs
  from llmjax.checkpoint import CheckpointError
  from llmjax.config import ConfigError
  from llmjax.data import DataError
  try:
    run = runs.load_run(FLAGS.workdir, FLAGS.step)
    predictions = fill_mask(run.model, run.params, run.tokenizer, FLAGS.text, FLAGS.top_k)
  except (FillMaskError, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
    fail(str(e))
  for n, pred in enumerate(predictions, 1):
    print(f"mask {n} (token {pred.position}):")
    for i, p, t in zip(pred.ids, pred.probs, pred.tokens):
      print(f"  {p:.6f}\t{i}\t{t}" if FLAGS.print_ids else f"  {p:.6f}\t{t}")


if __name__ == "__main__":
  app.run(main)
