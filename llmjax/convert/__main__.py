"""python -m llmjax.convert hf_import --hf_dir=DIR --workdir=RUN [--param_dtype=bfloat16]
   python -m llmjax.convert hf_export --workdir=RUN --hf_dir=OUT [--step=N] [--max_shard_mb=N]

--hf_dir for hf_import may also be a hub id ('org/name'), downloaded when the network allows.
Problems are reported as one line `llmjax: error: ...` with exit status 2.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

COMMANDS = ("hf_import", "hf_export")
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (import: source, or a hub id; "
                    "export: destination).")
flags.DEFINE_string("workdir", None, "llmjax run directory (import: created; export: read).")
flags.DEFINE_string("step", None, "hf_export: checkpoint step, a number or 'best' (default: the latest).")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                  "hf_import: dtype of the imported parameters.")
flags.DEFINE_string("revision", None, "hf_import from the hub: branch, tag or commit.")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "hf_export: shard model.safetensors above this size.")
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f"llmjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    fail(f"expected one command, {' or '.join(COMMANDS)}, e.g. "
         "python -m llmjax.convert hf_import --hf_dir=DIR --workdir=RUN")
  for name in ("hf_dir", "workdir"):
    if not getattr(FLAGS, name):
      fail(f"--{name} is required for {argv[1]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from llmjax import convert
  from llmjax.checkpoint import CheckpointError
  from llmjax.config import ConfigError
  from llmjax.data import DataError
  try:
    if argv[1] == "hf_import":
      hf = convert.import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.param_dtype, FLAGS.revision)
      cfg = hf.model_config
      print(f"imported {hf.hf_config.get('model_type')} ({cfg.num_layers} layers, {cfg.embed_dim} "
            f"wide, vocab {cfg.vocab_size}) from {FLAGS.hf_dir} into {FLAGS.workdir}")
    else:
      written = convert.export_hf(FLAGS.workdir, FLAGS.hf_dir, FLAGS.step,
                                  max_shard_bytes=FLAGS.max_shard_mb * 1024 * 1024)
      print(f"exported {FLAGS.workdir} to {FLAGS.hf_dir}: {', '.join(written)}")
  except (convert.ConversionError, ConfigError, DataError, CheckpointError,
          FileNotFoundError) as e:
    fail(str(e))


if __name__ == "__main__":
  app.run(main)
