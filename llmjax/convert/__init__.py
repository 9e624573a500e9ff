"""Hugging Face interop: import GPT-2 / Llama / Mistral safetensors checkpoints into llmjax and
export llmjax models back, with numerical parity tested against transformers.

From a notebook::

    from llmjax import convert
    hf = convert.load_hf("path/to/hf_dir")           # or a hub id 'org/name' when online
    logits = hf.model.apply({"params": hf.params}, tokens)
    convert.save_hf(hf.model_config, hf.params, "out_dir", tokenizer=hf.tokenizer)

    convert.import_hf("path/to/hf_dir", "runs/imported")   # a run directory: train, eval, generate
    convert.export_hf("runs/mine", "hf_out")               # config.json + model.safetensors

The command line does the same: `python -m llmjax.convert hf_import --hf_dir=DIR --workdir=RUN`
and `python -m llmjax.convert hf_export --workdir=RUN --hf_dir=OUT [--step=N]`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from llmjax.convert import files, hf_config, t5, weights
from llmjax.convert.hf_config import ConversionError
from llmjax.model import TransformerConfig, build_model

# Architectures with a converter module of their own (config, weights and tokenizer), by HF
# model_type for import and by llmjax model family for export. GPT-2 and Llama stay in
# hf_config/weights.
IMPORTERS = {t5.MODEL_TYPE: t5}
EXPORTERS = {"encoder_decoder": t5}

__all__ = ["ConversionError", "HFModel", "load_hf", "import_hf", "save_hf", "export_hf",
           "run_config"]

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class HFModel:
  model_config: TransformerConfig
  params: dict                    # numpy arrays in llmjax's layout (jax accepts them as is)
  tokenizer: object | None        # HFTokenizer, or None when the directory has no tokenizer
  hf_config: dict                 # the parsed config.json
  family: str                     # 'gpt2' | 'llama' | 't5'

  @property
  def model(self):
    return build_model(self.model_config)


def load_hf(path_or_repo: str | os.PathLike, param_dtype: str = "float32",
            revision: str | None = None) -> HFModel:
  """Reads an HF model directory (config.json + safetensors, single or sharded) into llmjax's
  model config and parameter tree. A hub id ('org/name') is downloaded first (safetensors, json
  and tokenizer files only). Raises ConversionError for anything that cannot convert exactly."""
  if param_dtype not in NUMPY_DTYPES:
    raise ConversionError(f"param_dtype={param_dtype!r} must be one of {', '.join(NUMPY_DTYPES)}")
  directory = files.resolve(path_or_repo, revision)
  hf = files.read_config(directory)
  if hf.get("model_type") in IMPORTERS:
    return _load_module(IMPORTERS[hf["model_type"]], directory, hf, param_dtype)
  kind = hf_config.family(hf)
  cfg = hf_config.to_llmjax(hf, param_dtype)
  tensors = files.read_weights(directory)
  params, cfg = weights.hf_to_params(kind, tensors, cfg, NUMPY_DTYPES[param_dtype])
  from llmjax.data.hf_tokenizer import HFTokenizer
  tokenizer = HFTokenizer.from_hf_dir(directory, hf)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {cfg.vocab_size}; the tokenizer does not fit this model")
  return HFModel(cfg, params, tokenizer, hf, kind)


def _load_module(module, directory: Path, hf: dict, param_dtype: str) -> HFModel:
  tensors = files.read_weights(directory)
  cfg = module.to_llmjax(hf, tensors, param_dtype)
  params = module.hf_to_params(tensors, cfg, NUMPY_DTYPES[param_dtype])
  tokenizer = module.load_tokenizer(directory, hf)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {cfg.vocab_size}; the tokenizer does not fit this model")
  return HFModel(cfg, params, tokenizer, hf, module.MODEL_TYPE)


def run_config(model_config: TransformerConfig, tokenizer_dir: str | os.PathLike,
               seq_len: int = 1024):
  """A full llmjax run config around an imported model, with fine-tuning defaults (small
  constant-after-warmup learning rate); every field can still be overridden."""
  from llmjax import config as cfglib
  config = cfglib.default_config()
  config.model.update(model_config.to_dict())
  config.data.update(tokenizer="hf", tokenizer_path=str(Path(tokenizer_dir).absolute()),
                     seq_len=min(seq_len, model_config.max_seq_len))
  config.optim.update(lr=3e-5, warmup_steps=10, schedule="constant", weight_decay=0.0)
  return config


def import_hf(path_or_repo: str | os.PathLike, workdir: str | os.PathLike,
              param_dtype: str = "float32", revision: str | None = None) -> HFModel:
  """load_hf, then writes a run directory (config.json, the tokenizer, an Orbax checkpoint at
  step 0 with a fresh optimizer state) that llmjax.main, eval and generate accept."""
  from llmjax import runs
  from llmjax.checkpoint import CHECKPOINT_DIR
  workdir = Path(workdir)
  if (workdir / CHECKPOINT_DIR).exists() and any((workdir / CHECKPOINT_DIR).iterdir()):
    raise ConversionError(f"{workdir} already holds checkpoints; choose a new --workdir")
  hf = load_hf(path_or_repo, param_dtype, revision)
  if hf.tokenizer is None:
    raise ConversionError(
        f"{path_or_repo} has no tokenizer.json or tokenizer.model; copy the model's tokenizer "
        "files into it (a run needs a tokenizer), or use load_hf() from Python for weights only")
  params = jax.tree.map(jax.numpy.asarray, hf.params)
  runs.create_run(workdir, run_config(hf.model_config, workdir), params, hf.tokenizer)
  return hf


def save_hf(model_config: TransformerConfig, params, out_dir: str | os.PathLike, tokenizer=None,
            max_shard_bytes: int = files.DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes config.json + model.safetensors (sharded with an index above max_shard_bytes) that
  transformers' from_pretrained loads as GPT2LMHeadModel or LlamaForCausalLM; and the tokenizer
  files when `tokenizer` can be expressed for AutoTokenizer. Returns the file names written."""
  from llmjax.convert import tokenizer_export
  module = EXPORTERS.get(model_config.family)
  if module is None:
    kind = hf_config.export_family(model_config)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  eos = getattr(tokenizer, "eos_id", None)
  bos = getattr(tokenizer, "bos_id", None)
  if module is not None:
    tensors = module.params_to_hf(host, model_config)
    config = module.to_hf(model_config, eos_id=eos)
  else:
    tensors = weights.params_to_hf(kind, host, model_config)
    config = hf_config.to_hf(model_config, eos_id=eos, bos_id=bos)
  written = files.write_weights(out, tensors, max_shard_bytes)
  (out / files.CONFIG).write_text(json.dumps(config, indent=2))
  written.append(files.CONFIG)
  if tokenizer is not None:
    written += tokenizer_export.save(tokenizer, out)
  return written


def export_hf(workdir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
              max_shard_bytes: int = files.DEFAULT_SHARD_BYTES) -> list[str]:
  """Exports checkpoint `step` (default: the latest) of an llmjax run directory with save_hf."""
  from llmjax import runs
  out = Path(out_dir)
  if out.exists() and any(out.glob("*.safetensors")):
    raise ConversionError(f"{out} already holds safetensors weights; choose a new --hf_dir")
  run = runs.load_run(workdir, step)
  if run.model_config.family in EXPORTERS:  # refuse before writing anything
    EXPORTERS[run.model_config.family]._check(run.model_config)
  else:
    hf_config.export_family(run.model_config)
  return save_hf(run.model_config, run.params, out, run.tokenizer, max_shard_bytes)
