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
and `python -m llmjax.convert hf_export --workdir=RUN --hf_dir=OUT [--step=N]`. LoRA runs export
their adapters for PEFT (`hf_export --adapter`) or merged weights (`hf_export --merge`), and
`peft_import --hf_dir=ADAPTER --base=RUN --workdir=NEW` brings a PEFT adapter in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from llmjax.convert import families, files, hf_config, t5, weights
from llmjax.convert.hf_config import ConversionError
from llmjax.model import TransformerConfig, build_model

# Architectures with a converter module of their own (config, weights and tokenizer), by HF
# model_type for import and by llmjax model family for export. GPT-2 and Llama stay in
# hf_config/weights.
IMPORTERS = {t5.MODEL_TYPE: t5}
EXPORTERS = {"encoder_decoder": t5}

__all__ = ["ConversionError", "HFModel", "load_hf", "import_hf", "save_hf", "export_hf",
           "export_adapter", "import_peft", "run_config"]

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class HFModel:
  model_config: TransformerConfig
  params: dict                    # numpy arrays in llmjax's layout (jax accepts them as is)
  tokenizer: object | None        # HFTokenizer, or None when the directory has no tokenizer
  hf_config: dict                 # the parsed config.json
  family: str                     # 'gpt2' | 'llama' | 't5' | a registered family ('bert')

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
  registered = families.for_model_type(hf.get("model_type"))
  if registered is not None:  # a family with its own converter module (e.g. bert)
    kind = registered.name
    cfg = registered.to_llmjax(hf, param_dtype)
    tensors = files.read_weights(directory)
    params, cfg = registered.import_params(tensors, cfg, NUMPY_DTYPES[param_dtype])
  else:
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
  config = run_config(hf.model_config, workdir)
  registered = families.for_model_type(hf.hf_config.get("model_type"))
  if registered is not None and registered.run_config is not None:
    registered.run_config(config)
  runs.create_run(workdir, config, params, hf.tokenizer)
  return hf


def save_hf(model_config: TransformerConfig, params, out_dir: str | os.PathLike, tokenizer=None,
            max_shard_bytes: int = files.DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes config.json + model.safetensors (sharded with an index above max_shard_bytes) that
  transformers' from_pretrained loads as GPT2LMHeadModel or LlamaForCausalLM; and the tokenizer
  files when `tokenizer` can be expressed for AutoTokenizer. Returns the file names written."""
  from llmjax.convert import tokenizer_export
  module = EXPORTERS.get(model_config.family)
  registered = families.for_config(model_config) if module is None else None
  if registered is not None:
    config = registered.to_hf(model_config, tokenizer)  # refuses before anything is written
  elif module is None:
    kind = hf_config.export_family(model_config)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  eos = getattr(tokenizer, "eos_id", None)
  bos = getattr(tokenizer, "bos_id", None)
  if module is not None:
    tensors = module.params_to_hf(host, model_config)
    config = module.to_hf(model_config, eos_id=eos)
  elif registered is not None:
    tensors = registered.export_params(host, model_config)
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
              max_shard_bytes: int = files.DEFAULT_SHARD_BYTES, merge: bool = False) -> list[str]:
  """Exports checkpoint `step` (default: the latest) of an llmjax run directory with save_hf.
  A LoRA run's adapters are merged into the weights in float32 (`merge=True` insists on it)."""
  import shutil
  from llmjax import runs
  from llmjax.model import lora as loralib
  from llmjax.quantize import dequantize_params
  out = Path(out_dir)
  if out.exists() and any(out.glob("*.safetensors")):
    raise ConversionError(f"{out} already holds safetensors weights; choose a new --hf_dir")
  _refuse_existing(out, [files.CONFIG, files.INDEX])
  run = runs.load_run(workdir, step)
  registered = families.for_config(run.model_config)
  if run.model_config.family in EXPORTERS:  # refuse before writing anything
    EXPORTERS[run.model_config.family]._check(run.model_config)
  elif registered is not None:
    registered.to_hf(run.model_config, run.tokenizer)
  else:
    hf_config.export_family(run.model_config)
  spec = loralib.spec_of(run.model)
  if merge and spec is None:
    raise ConversionError(f"{workdir} has no LoRA adapters to merge; export it without --merge")
  params = dequantize_params(run.params)
  if spec is not None:
    params = loralib.merge(params, spec, dtype=np.dtype(run.model_config.param_dtype))
  # Written into a fresh directory beside `out`, then moved in: an existing file of the same name
  # (a tokenizer_config.json, ...) is refused by name, never overwritten.
  out.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=".llmjax-export-", dir=out))
  try:
    written = save_hf(run.model_config, params, staging, run.tokenizer, max_shard_bytes)
    _refuse_existing(out, written)
    for name in written:
      os.replace(staging / name, out / name)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return written


def _refuse_existing(out: Path, names) -> None:
  for name in names:
    if (out / name).exists():
      raise ConversionError(f"{out / name} already exists and hf_export would overwrite it; "
                            "choose a new or empty --hf_dir")


def export_adapter(workdir: str | os.PathLike, out_dir: str | os.PathLike,
                   step: int | None = None) -> list[str]:
  """Writes a LoRA run's adapters in PEFT's format (adapter_config.json +
  adapter_model.safetensors) for the HF export of its base model."""
  from llmjax import runs
  from llmjax.convert import peft
  from llmjax.model import lora as loralib
  out = Path(out_dir)
  if (out / peft.WEIGHTS_FILE).exists():
    raise ConversionError(f"{out} already holds an adapter; choose a new --hf_dir")
  run = runs.load_run(workdir, step)
  spec = loralib.spec_of(run.model)
  if spec is None:
    raise ConversionError(f"{workdir} was not trained with LoRA (lora.rank=0), so it has no "
                          "adapter; export its full weights without --adapter")
  kind = hf_config.export_family(run.model_config)
  adapter = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), loralib.split(run.params)[0])
  base = run.config.train.init_from or ""
  return peft.save_adapter(kind, adapter, spec, run.model_config, out, base_name=base)


def import_peft(adapter_dir: str | os.PathLike, base_workdir: str | os.PathLike,
                workdir: str | os.PathLike):
  """A new LoRA run in `workdir` whose adapters are the PEFT adapter in `adapter_dir` on top of
  the llmjax run `base_workdir` (e.g. the hf_import of the adapter's base model). It generates,
  evaluates and trains further like any LoRA run. Returns its LoraSpec."""
  from llmjax import adapters, runs
  from llmjax.convert import peft
  base = runs.load_run(base_workdir)
  kind = hf_config.export_family(base.model_config)
  config_json, tensors = peft.read_adapter(adapter_dir)
  spec, adapter = peft.peft_to_adapter(kind, config_json, tensors, base.model_config)
  adapters.create_lora_run(workdir, base, spec, adapter)
  return spec
