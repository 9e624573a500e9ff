"""The configuration schema, its defaults, and validation with one-line, fixable errors.

Experiments (experiments/*.py) start from `default_config()` and change fields; the command line
overrides any field. `validate()` runs once at start-up: every error names the field and the fix.
"""
from __future__ import annotations

import difflib
import json
import math
from typing import Any

import ml_collections

from llmjax.model.config import TransformerConfig
from llmjax.model.transformer import REMAT_POLICIES


class ConfigError(ValueError):
  """A user-fixable configuration problem; main prints it as one line and exits with status 2."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(TransformerConfig().to_dict())
  c.model.vocab_size = 0  # 0 -> taken from the tokenizer

  c.data = ml_collections.ConfigDict(dict(
      path="",               # '' -> embedded corpus; a text file or glob; or a .bin/.npy token array
      val_path="",           # optional separate validation text/tokens; '' -> split off val_fraction
      tokenizer="char",      # 'char' | 'byte' | 'sentencepiece'
      tokenizer_path="",     # an existing sentencepiece .model; '' -> train one from the corpus
      sp_vocab_size=2048,    # vocabulary size when training a sentencepiece model
      token_dtype="uint16",  # dtype of a raw .bin token file
      val_fraction=0.1,
      seq_len=64,
      batch_size=12,         # global batch, in sequences, per optimizer step
      packing=False,         # segment ids from end-of-document tokens (tokenizers with an EOS)
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3,
      schedule="cosine",     # 'cosine' | 'linear' | 'constant'
      warmup_steps=100,
      decay_steps=0,         # 0 -> train.steps
      min_lr_ratio=0.1,      # final lr = lr * min_lr_ratio
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,  # weight decay on embedding tables (never on norms and biases)
      grad_clip=1.0,           # global-norm clipping; 0 disables
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=2000,
      seed=0,
      grad_accum_steps=1,     # micro-batches per optimizer step
      objective="causal_lm",  # 'causal_lm' | 'masked_lm' (needs model.causal=False)
      mlm_probability=0.15,
      log_every=50,
      eval_every=250,         # 0 disables periodic eval (a final eval still runs)
      eval_batches=20,
      checkpoint_every=500,   # 0 -> only at the end
      keep_checkpoints=3,
      sample_tokens=300,      # length of the text sample written at the end; 0 disables
      sample_prompt="\n",
      sample_temperature=0.8,
      peak_flops=0.0,         # per-device peak FLOP/s for MFU; 0 -> from the device kind / measured
      progress=True,          # progress bar on the console
      tensorboard=True,
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,   # -1 -> the devices left over once the other axes are sized
      fsdp=1,
      tensor=1,
  ))
  return c


CHOICES = {
    "model.position": ("learned", "rotary", "none"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.logits_dtype": ("float32", "bfloat16"),
    "model.remat_policy": tuple(REMAT_POLICIES),
    "model.attention_impl": ("auto", "xla", "cudnn"),
    "data.tokenizer": ("char", "byte", "sentencepiece"),
    "data.token_dtype": ("uint16", "uint32", "int32"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.objective": ("causal_lm", "masked_lm"),
}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """{'model.num_layers': 4, ...} for a nested ConfigDict or dict."""
  out = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def unknown_key_message(name: str, schema: dict[str, Any]) -> str:
  close = difflib.get_close_matches(name, list(schema), n=1, cutoff=0.75)
  hint = f" (did you mean {close[0]}?)" if close else ""
  return f"unknown config key '{name}'{hint}; see llmjax/config.py for the fields"


def _check_schema(config: ml_collections.ConfigDict) -> None:
  """Unknown keys and wrong types, compared against default_config()."""
  schema = flatten(default_config())
  given = flatten(config)
  for name, value in given.items():
    if name not in schema:
      raise ConfigError(unknown_key_message(name, schema))
    want = type(schema[name])
    if want is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
      raise ConfigError(f"{name}={value!r} has type {type(value).__name__}, expected "
                        f"{want.__name__}; set --config.{name}=<{want.__name__}>")


def _need(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks everything that can be checked before touching data or devices. Raises ConfigError."""
  _check_schema(config)
  flat = flatten(config)
  for name, options in CHOICES.items():
    _need(flat[name] in options, f"{name}={flat[name]!r} is not one of {', '.join(options)}")
  m, d, t, o = config.model, config.data, config.train, config.optim
  for name in ("model.num_layers", "model.num_heads", "model.embed_dim", "model.max_seq_len",
               "data.seq_len", "data.batch_size", "train.steps", "train.grad_accum_steps"):
    _need(flat[name] > 0, f"{name}={flat[name]} must be positive")
  kv = m.num_kv_heads or m.num_heads
  _need(m.head_dim > 0 or m.embed_dim % m.num_heads == 0,
        f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}; "
        "change one of them or set model.head_dim")
  _need(m.num_heads % kv == 0,
        f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={kv}; "
        "use a kv-head count that divides the head count")
  head_dim = m.head_dim or m.embed_dim // m.num_heads
  _need(m.position != "rotary" or head_dim % 2 == 0,
        f"rotary positions need an even head dimension, got {head_dim}; change model.head_dim")
  _need(d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
        "raise model.max_seq_len or shorten data.seq_len")
  _need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
  _need(0.0 < d.val_fraction < 1.0 or bool(d.val_path),
        f"data.val_fraction={d.val_fraction} must be in (0, 1) unless data.val_path is set")
  _need(d.tokenizer != "sentencepiece" or d.tokenizer_path or d.sp_vocab_size >= 16,
        "data.sp_vocab_size must be at least 16 to train a sentencepiece tokenizer")
  _need(d.batch_size % t.grad_accum_steps == 0,
        f"data.batch_size={d.batch_size} is not divisible by train.grad_accum_steps="
        f"{t.grad_accum_steps}; pick a batch size that is a multiple of it")
  _need(t.objective != "masked_lm" or not m.causal,
        "train.objective='masked_lm' needs a bidirectional model: set --config.model.causal=False")
  _need(o.lr > 0, f"optim.lr={o.lr} must be positive")
  _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
  if num_devices is not None:
    sizes = mesh_shape(config, num_devices)
    batch_shards = sizes["data"] * sizes["fsdp"]
    micro = d.batch_size // t.grad_accum_steps
    _need(micro % batch_shards == 0,
          f"the micro-batch data.batch_size/train.grad_accum_steps={micro} is not divisible by the "
          f"data-parallel size mesh.data*mesh.fsdp={batch_shards}; make the batch a multiple of it")
    _need(sizes["tensor"] == 1 or m.num_heads % sizes["tensor"] == 0,
          f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={sizes['tensor']}")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves -1 axes; raises ConfigError when the sizes cannot multiply to the device count."""
  sizes = {axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor")}
  free = [a for a, s in sizes.items() if s == -1]
  _need(len(free) <= 1, f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in free)}")
  for axis, size in sizes.items():
    _need(size == -1 or size >= 1, f"mesh.{axis}={size} must be -1 or a positive integer")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    _need(num_devices % fixed == 0,
          f"the mesh needs a multiple of {fixed} devices ({_describe(sizes)}) but there are "
          f"{num_devices}; change the mesh sizes")
    sizes[free[0]] = num_devices // fixed
  _need(math.prod(sizes.values()) == num_devices,
        f"the mesh {_describe(sizes)} multiplies to {math.prod(sizes.values())} but there are "
        f"{num_devices} devices; make mesh.data*mesh.fsdp*mesh.tensor equal {num_devices}")
  return sizes


def _describe(sizes: dict[str, int]) -> str:
  return " x ".join(f"{a}={s}" for a, s in sizes.items())


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> TransformerConfig:
  values = config.model.to_dict()
  if vocab_size is not None and not values["vocab_size"]:
    values["vocab_size"] = vocab_size
  if config.train.objective == "masked_lm" and vocab_size is not None and not config.model.vocab_size:
    values["vocab_size"] = vocab_size + 1  # one extra id for the [MASK] token
  return TransformerConfig.from_mapping(values)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config, merged over today's defaults so older runs still load."""
  config = default_config()
  config.update_from_flattened_dict(flatten(json.loads(text)))
  return config
