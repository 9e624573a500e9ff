"""Reading and writing Hugging Face model directories: config.json and safetensors (never pickle).

Pickle checkpoints (.bin/.pt/.pth/.ckpt) can run arbitrary code when loaded, so they are refused;
the error explains how to re-save them as safetensors. Export writes one model.safetensors, or
numbered shards plus model.safetensors.index.json above `max_shard_bytes`, like save_pretrained.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from llmjax.convert.hf_config import ConversionError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a hub download fetches: weights as safetensors, configs, tokenizers. Never pickles or code.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt"]
# Mistral's repos also carry the same weights in Mistral's own layout.
HUB_IGNORE = ["consolidated*"]
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


def resolve(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
  """A local directory as is; otherwise a hub repo id ('org/name' or a legacy 'gpt2') downloaded with
  huggingface_hub (safetensors, json and tokenizer files only)."""
  path = Path(path_or_repo)
  if path.is_dir():
    return path
  name = str(path_or_repo)
  if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
    raise FileNotFoundError(f"{name} is not a directory (nor a hub repo id like 'org/name'); "
                            "pass --hf_dir=<directory holding config.json and *.safetensors>")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise ConversionError(f"{name} is not a local directory, and downloading it from the "
                          "Hugging Face hub needs huggingface_hub: pip install llmjax[hf]") from None
  try:
    return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                  ignore_patterns=HUB_IGNORE))
  except Exception as e:  # network, auth, missing repo: one line, not a traceback
    raise ConversionError(f"cannot download {name} from the Hugging Face hub "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "download it elsewhere and pass the local directory") from None


def read_config(directory: Path) -> dict:
  path = directory / CONFIG
  if not path.exists():
    raise FileNotFoundError(f"no {CONFIG} in {directory}: not a Hugging Face model directory")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, OSError) as e:
    raise ConversionError(f"{path} is not valid JSON ({e}); download it again") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{path} is not a JSON object; download it again")
  return config


def _weight_files(directory: Path) -> list[Path]:
  index = directory / INDEX
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (directory / f).exists()]
    if missing:
      raise FileNotFoundError(f"{INDEX} in {directory} lists shards that are missing: "
                              f"{', '.join(missing[:3])}; download every shard")
    return [directory / f for f in files]
  if (directory / SINGLE).exists():
    return [directory / SINGLE]
  files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("consolidated"))
  if files:
    return files
  pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    raise ConversionError(
        f"{directory} holds only pickle weights ({', '.join(pickles[:3])}), which llmjax refuses to "
        "load because unpickling can run arbitrary code; convert them once in a trusted "
        "environment: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
        "safe_serialization=True)")
  raise FileNotFoundError(f"no *.safetensors weights in {directory}")


def read_weights(directory: Path) -> dict[str, np.ndarray]:
  """Every tensor of the (possibly sharded) safetensors checkpoint, as numpy arrays."""
  from safetensors import safe_open
  tensors = {}
  for file in _weight_files(directory):
    try:
      with safe_open(str(file), framework="numpy") as f:
        for name in f.keys():
          if name in tensors:
            raise ConversionError(f"weight {name!r} appears in more than one shard ({file.name})")
          tensors[name] = f.get_tensor(name)
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ConversionError(f"{file} cannot be read ({reason}): the file is truncated or "
                            "corrupt; download it again") from None
  return tensors


def write_weights(directory: Path, tensors: Mapping[str, np.ndarray],
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes model.safetensors, or model-0000i-of-0000n.safetensors shards and an index when the
  total exceeds max_shard_bytes. Returns the file names written."""
  from safetensors.numpy import save_file
  shards: list[dict] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  metadata = {"format": "pt"}  # transformers expects it; the arrays themselves are framework-free
  if len(shards) == 1:
    save_file(shards[0], str(directory / SINGLE), metadata=metadata)
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, str(directory / name), metadata=metadata)
    weight_map.update({k: name for k in shard})
  total = sum(t.nbytes for t in tensors.values())
  (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": weight_map}, indent=2))
  return names + [INDEX]
