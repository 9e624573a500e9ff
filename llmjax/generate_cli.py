"""`python -m llmjax.generate --workdir=RUN --prompt=...`: sample from a run, streaming the text.

--print_ids prints each sample's generated token ids, comma-separated, one line per sample (the
interface other tools compare against, e.g. with Hugging Face's greedy generate).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A run directory (training run or HF import).")
flags.DEFINE_string("step", None, "Checkpoint step to load: a number or 'best' (default: the latest).")
flags.DEFINE_string("prompt", "\n", "Prompt text.")
flags.DEFINE_list("prompt_ids", None, "Prompt as comma-separated token ids (overrides --prompt).")
flags.DEFINE_bool("print_ids", False, "Print generated token ids, one comma-separated line per sample.")
flags.DEFINE_integer("num_samples", 1, "Samples to draw (decoded together as one batch).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample (at most).")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens whose mass reaches p (1: all).")
flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")
flags.DEFINE_multi_string("stop", [], "Stop a sample at this string (not printed); repeatable.")
flags.DEFINE_bool("ignore_eos", False, "Keep generating after the end-of-sequence token.")
flags.DEFINE_bool("truncate_prompt", False, "Keep the prompt's last tokens when it is too long "
                  "for the context (default: an error).")
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "Weight-only quantization for inference.")
flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1: greedy/sampling). "
                     "Beam search ignores the sampling flags.")
flags.DEFINE_float("length_penalty", 1.0, "Beam search: hypothesis score = log-prob / length**this.")
flags.DEFINE_enum("early_stopping", "false", ["true", "false", "never"],
                  "Beam search: stop at num_beams finished hypotheses (true), when no running "
                  "beam can win (false, HF's default), or never before max_new_tokens.")
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f"llmjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _prompt_ids(tokenizer, vocab_size: int) -> list[int]:
  if FLAGS.prompt_ids is not None:
    try:
      ids = [int(x) for x in FLAGS.prompt_ids]
    except ValueError:
      fail(f"--prompt_ids={','.join(FLAGS.prompt_ids)} must be comma-separated integers")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
      fail(f"--prompt_ids has ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids
  try:
    ids = list(tokenizer.encode(FLAGS.prompt))
  except ValueError as e:
    fail(f"cannot encode --prompt: {e}")
  if not ids:
    fail("--prompt encodes to no tokens; give a non-empty prompt or --prompt_ids")
  return ids


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
  if not FLAGS.workdir:
    fail("--workdir is required: a training run or an imported model")
  logging.set_verbosity(logging.WARNING)
  from llmjax import config as cfglib
  from llmjax import generate as gen
  from llmjax import quantize as quant
  from llmjax import runs
  from llmjax import sharding as shd
  from llmjax.checkpoint import CheckpointError
  from llmjax.data import DataError
  from llmjax.beam_search import BeamSearchError
  from llmjax.sampling import Sampler
  from llmjax.seq2seq_decode import Seq2SeqError
  try:
    sampler = Sampler(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  except ValueError as e:
    fail(str(e))
  if FLAGS.num_samples < 1:
    fail(f"--num_samples={FLAGS.num_samples} must be at least 1")
  if FLAGS.num_beams < 1:
    fail(f"--num_beams={FLAGS.num_beams} must be at least 1 (1: no beam search)")
  try:
    run = runs.load_run(FLAGS.workdir, FLAGS.step)
    params = quant.quantize_params(run.params, FLAGS.quantize)
    model, tokenizer = run.model, run.tokenizer
    # The model family picks the decoding path (a dict, not an if chain, as families grow).
    special = FAMILY_PATHS.get(model.cfg.family)
    if special is not None:
      return special(run, params)
    if FLAGS.num_beams > 1:
      return _decoder_only_beams(run, params)
    context = model.cfg.max_seq_len
    max_new = FLAGS.max_new_tokens
    if max_new < 1:
      fail(f"--max_new_tokens={max_new} must be at least 1")
    ids = _prompt_ids(tokenizer, model.cfg.vocab_size)
    if len(ids) > context and not FLAGS.truncate_prompt:
      fail(f"the prompt has {len(ids)} tokens but the model's context is {context}; shorten it or "
           "pass --truncate_prompt to keep its last tokens")
    if len(ids) > context:  # keep the prompt's end: only the last `context` tokens are ever seen
      ids = ids[-context:]
    # Past the context, generation slides its window (llmjax.generate), so max_new is not capped.
    eos_id = None if FLAGS.ignore_eos else tokenizer.eos_id
    prompts = [ids] * FLAGS.num_samples
    steps = gen.stream_tokens(model, params, prompts, max_new, sampler=sampler, seed=FLAGS.seed,
                              eos_id=eos_id, mesh=run.mesh, rules=shd.logical_rules(run.config))
    if FLAGS.print_ids:
      _print_ids(steps, tokenizer, eos_id)
    else:
      _print_text(steps, tokenizer, ids, eos_id)
  except (gen.GenerateError, cfglib.ConfigError, DataError, CheckpointError,
          FileNotFoundError, Seq2SeqError, BeamSearchError) as e:
    fail(str(e))


def _early_stopping():
  return {"true": True, "false": False, "never": "never"}[FLAGS.early_stopping]


def _emit(prompt_text: str, rows, tokenizer, eos_id) -> None:
  """Prints each sample (ids with --print_ids, else the prompt text + the decoded output)."""
  for row in rows:
    if FLAGS.print_ids:
      print(",".join(map(str, row)), flush=True)
      continue
    if eos_id is not None and row and row[-1] == eos_id:
      row = row[:-1]
    print(prompt_text + tokenizer.decode(row), flush=True)


def _decoder_only_beams(run, params) -> None:
  from llmjax import beam_search
  from llmjax import generate as gen
  model, tokenizer = run.model, run.tokenizer
  ids = _prompt_ids(tokenizer, model.cfg.vocab_size)
  ids = gen.fit_prompt(ids, model.cfg.max_seq_len, FLAGS.max_new_tokens, FLAGS.truncate_prompt)
  eos_id = None if FLAGS.ignore_eos else tokenizer.eos_id
  rows = beam_search.generate_beams(
      model, params, [ids], FLAGS.max_new_tokens, num_beams=FLAGS.num_beams,
      length_penalty=FLAGS.length_penalty, early_stopping=_early_stopping(), eos_id=eos_id)
  _emit(tokenizer.decode(ids), rows, tokenizer, eos_id)


def _encoder_decoder(run, params) -> None:
  """The prompt is the source (encoder input); the output is the decoder's text alone."""
  from llmjax import seq2seq_decode
  from llmjax.sampling import Sampler
  model, tokenizer = run.model, run.tokenizer
  ids = _prompt_ids(tokenizer, model.cfg.vocab_size)
  eos_id = None if FLAGS.ignore_eos else tokenizer.eos_id
  if tokenizer.eos_id is not None and ids[-1] != tokenizer.eos_id:
    ids = ids + [tokenizer.eos_id]  # sources end with EOS, as in training (llmjax/data/seq2seq.py)
  rows = seq2seq_decode.generate(
      model, params, [ids] * FLAGS.num_samples, FLAGS.max_new_tokens,
      sampler=Sampler(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p), seed=FLAGS.seed,
      eos_id=eos_id, num_beams=FLAGS.num_beams, length_penalty=FLAGS.length_penalty,
      early_stopping=_early_stopping())
  _emit("", rows, tokenizer, eos_id)


FAMILY_PATHS = {"encoder_decoder": _encoder_decoder}


def _print_ids(steps, tokenizer, eos_id) -> None:
  rows = None
  ended = None
  for step in steps:
    if rows is None:
      rows, ended = [[] for _ in step], [False] * len(step)
    for i, t in enumerate(step):
      if not ended[i]:
        rows[i].append(int(t))
        ended[i] = eos_id is not None and int(t) == eos_id
  for row in rows or []:
    print(",".join(map(str, row)), flush=True)


def _print_text(steps, tokenizer, prompt_ids, eos_id) -> None:
  """One sample streams as it is produced; several are printed one after another as they finish
  (nanoGPT style, separated by a line of dashes)."""
  from llmjax.generate import TextStream
  prompt = tokenizer.decode(prompt_ids)
  streams, live = None, False
  for step in steps:
    if streams is None:
      streams = [TextStream(tokenizer, FLAGS.stop, eos_id) for _ in step]
      live = len(streams) == 1
      if live:
        sys.stdout.write(prompt)
    for s, t in zip(streams, step):
      chunk = s.add(t)
      if live and chunk:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    if all(s.stopped for s in streams):
      break
  for i, s in enumerate(streams):
    tail = s.finish()
    if live:
      sys.stdout.write(tail + "\n")
    else:
      sys.stdout.write(prompt + s.text + "\n" + ("---------------\n" if i + 1 < len(streams) else ""))
  sys.stdout.flush()


def run():
  app.run(main)


if __name__ == "__main__":
  run()
