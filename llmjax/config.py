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
from llmjax.model.pooling import CHOICES as POOLING_CHOICES
from llmjax.model.transformer import REMAT_POLICIES


class ConfigError(ValueError):
  """A user-fixable configuration problem; main prints it as one line and exits with status 2."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(TransformerConfig().to_dict())
  c.model.vocab_size = 0  # 0 -> taken from the tokenizer

  c.data = ml_collections.ConfigDict(dict(
      path="",               # '' -> embedded corpus; a text file or glob; a .bin/.npy token array
                             # (or a glob of them); a directory made by llmjax.data.prepare
      mixture="",            # 'dirA:0.7,dirB:0.3': prepared directories sampled by weight per row
      val_path="",           # optional separate validation text/tokens; '' -> split off val_fraction
      tokenizer="char",      # 'char' | 'byte' | 'sentencepiece' | 'hf' (a Hugging Face tokenizer)
      tokenizer_path="",     # sentencepiece: an existing .model ('' -> train one from the corpus);
                             # hf: a directory holding tokenizer.json or tokenizer.model
      sp_vocab_size=2048,    # vocabulary size when training a sentencepiece model
      token_dtype="uint16",  # dtype of a raw .bin token file
      val_fraction=0.1,
      seq_len=64,
      batch_size=12,         # global batch, in sequences, per optimizer step
      packing=False,         # segment ids from end-of-document tokens (tokenizers with an EOS)
  ))
  # -- issue 9: task data (JSON Lines / Parquet / HF datasets dirs; llmjax/data/formats.py) --
  c.data.format = "auto"        # 'auto' (from each file's keys) or one of formats.FORMATS
  c.data.train_on = "completion"  # loss weights: 'completion' (every assistant turn + its EOS),
                                  # 'all' tokens, or 'last_turn' (the last assistant turn only)
  c.data.truncate = "right"     # over-long examples: cut 'left' / 'right', 'drop' them, or
                                # 'none' (fail at start naming the first one)
  c.data.sp_split_digits = False  # a trained sentencepiece vocabulary splits numbers into digits

  # -- issue 11: encoder-decoders (llmjax/data/seq2seq.py) --
  c.data.source_len = 0         # encoder row length of seq2seq batches (0: data.seq_len)

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3,
      schedule="cosine",     # 'cosine' | 'linear' | 'constant' | 'wsd' (issue 12: warmup,
                             # constant, then linear to lr*min_lr_ratio over the last cooldown_frac)
      cooldown_frac=0.4,     # issue 12: schedule='wsd' only
      warmup_steps=100,
      decay_steps=0,         # 0 -> train.steps
      min_lr_ratio=0.1,      # final lr = lr * min_lr_ratio
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,  # weight decay on embedding tables (never on norms and biases)
      grad_clip=1.0,           # global-norm clipping; 0 disables
      # 'adamw', or 'muon' (llmjax/muon.py, optax.contrib.muon's update: Newton-Schulz-
      # orthogonalized momentum on the layers' weight matrices at muon_lr; AdamW at lr on
      # embeddings, lm head, norms and biases)
      optimizer="adamw",
      muon_lr=0.02,
      muon_momentum=0.95,
      muon_ns_steps=5,            # issue 12: Newton-Schulz iterations per update
      muon_ns_dtype="float32",    # issue 12: 'bfloat16': the iteration's matmuls on bf16
                                  # operands, float32 accumulation (~2x faster on AVX-512 BF16)
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=2000,
      seed=0,
      grad_accum_steps=1,     # micro-batches per optimizer step; 0 (or 'auto' on the command
                              # line): the smallest count whose compiled step fits the device
      device_memory=0,        # bytes per device a train step may use: 0 -> the device's own
                              # (available host RAM on CPU); -1 disables the check (llmjax/memory.py)
      objective="causal_lm",  # a name in llmjax.objectives (causal_lm, masked_lm needs
                              # model.causal=False, ...)
      mlm_probability=0.15,
      log_every=50,
      eval_every=250,         # 0 disables periodic eval (a final eval still runs)
      eval_batches=20,
      checkpoint_every=500,   # 0 -> only at the end (and on SIGTERM/SIGINT)
      keep_checkpoints=3,     # keep the latest K checkpoints (0 -> keep all) ...
      keep_checkpoint_period=0,  # ... plus every step that is a multiple of M (0 -> none)
      async_checkpointing=True,  # write checkpoints in the background while training goes on
      init_from="",           # '<workdir>[:step]': start a new run from another run's weights
      epochs=0,               # issue 9: > 0 -> train.steps = epochs * steps per epoch (task data)
      keep_best="",           # issue 9: e.g. 'val/loss', 'val/accuracy': keep the best checkpoint
      z_loss=0.0,             # coefficient of the auxiliary log(Z)^2 loss (PaLM uses 1e-4)
      nonfinite_policy="halt",   # NaN/Inf loss or grads: the update is always skipped; 'skip'
      nonfinite_halt_after=1,    #   counts and goes on, 'halt' stops after N consecutive bad steps
      inject_nan_grads="",    # fault injection for tests: comma-separated steps with NaN grads
      sample_tokens=300,      # length of the text sample written at the end; 0 disables
      sample_prompt="\n",
      sample_temperature=0.8,
      peak_flops=0.0,         # per-device peak FLOP/s for MFU; 0 -> from the device kind / measured
      progress=True,          # progress bar on the console
      tensorboard=True,
  ))

  # The device mesh. Sizes are per slice (ICI: the fast links inside one TPU slice or GPU node);
  # mesh.dcn.* are the sizes across slices/hosts (DCN: the data-center network). The global size of
  # an axis is ici * dcn. -1 means "the devices (or slices) left over once the other axes are sized".
  # -- issue 11: T5 span corruption (train.objective='span_corruption') --
  c.train.noise_density = 0.15    # fraction of tokens hidden
  c.train.mean_noise_span = 3.0   # mean length of a hidden span
  c.train.span_sentinels = 100    # sentinel ids (T5's <extra_id_N>, else the top model ids)

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,      # pure data parallelism: replicated params, batch split
      fsdp=1,       # ZeRO-3 style: params, grads and optimizer state sharded, batch split
      sequence=1,   # activations split along the sequence (length) axis
      tensor=1,     # Megatron-style: heads / MLP / vocab split
      dcn=ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1)),
      # Logical axis name (as the model annotates params/activations) -> mesh axes, comma-separated;
      # '' = replicated. Activations get the batch rule first, so a mesh axis already used by the
      # batch dimension (fsdp) is never reused for 'embed' in the same array.
      rules=ml_collections.ConfigDict(dict(
          batch="data,fsdp",
          length="sequence",
          embed="fsdp",
          heads="tensor",
          kv_heads="tensor",
          kv="",
          mlp="tensor",
          vocab="tensor",
          layers="",
      )),
      # Multi-host start-up (llmjax.distributed): 'auto' initializes on TPU pods and SLURM jobs
      # with more than one task and whenever coordinator_address is set; 'on' always; 'off' never.
      distributed=ml_collections.ConfigDict(dict(
          initialize="auto",
          coordinator_address="",   # host:port of process 0 (explicit clusters, local launcher)
          num_processes=0,          # 0 -> detected
          process_id=-1,            # -1 -> detected
          timeout_s=300,
      )),
  ))
  # XLA devices to split a CPU host into before JAX starts (llmjax/cpu_devices.py): 1 = XLA's
  # single device (default); N = N devices for data parallelism over the cores; 0 = one per core.
  c.mesh.cpu_devices = 1
  # -- issue 12: data parallelism over a CPU host's cores as local processes joined by
  # jax.distributed (llmjax/cpu_processes.py; `python -m llmjax.main` re-launches itself):
  # 1 = one process (default); N = N processes; 0 = one per core (dividing the micro-batch).
  # CPU runs only; ignored with a note on accelerators and in multi-host jobs.
  c.mesh.cpu_processes = 1

  # --- issue 11 (encoders) ---------------------------------------------------------------------
  # Special tokens appended after a char/byte/sentencepiece vocabulary (HF tokenizers bring their
  # own), e.g. '[PAD],[UNK],[CLS],[SEP],[MASK]' for masked-LM pretraining.
  c.data.special_tokens = ""
  # Masked-LM recipe (objective 'masked_lm'; llmjax/data/mlm.py): of the selected tokens
  # (train.mlm_probability), this fraction becomes [MASK], this one a random token, the rest stay.
  c.train.mlm_mask_fraction = 0.8
  c.train.mlm_random_fraction = 0.1
  c.train.mlm_whole_word = False   # select whole words (all their pieces) at once
  c.train.mlm_nsp = False          # next-sentence prediction on [CLS] A [SEP] B [SEP] rows

  # -- issue 10: LoRA adapters (llmjax/model/lora.py, llmjax/adapters.py) and DPO ------------------
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,                 # 0: no adapters (full fine-tuning); > 0: LoRA of this rank, base frozen
      alpha=16.0,             # adapter scale = alpha / rank
      dropout=0.0,            # dropout on the adapter's input (training only)
      targets="query,value",  # comma-separated: query, key, value, out, gate, up, down, lm_head,
                              # embedding (the token table), or the groups attn, mlp, all
      base_dtype="float32",   # the frozen base: 'float32' (as loaded) or 'int8' (QLoRA)
      lr_ratio=1.0,           # LoRA+: B's learning rate = optim.lr * this (A keeps optim.lr);
                              # the LoRA+ paper suggests ~16 (1.0: plain LoRA)
  ))
  c.mesh.rules.lora_rank = ""  # the adapters' rank axis: replicated
  c.train.dpo_beta = 0.1       # DPO: strength of the pull towards the reference policy
  c.train.dpo_rpo_alpha = 0.0  # DPO: + alpha * NLL of the chosen responses (RPO); 0 = plain DPO
  return c


CHOICES = {
    "model.position": ("learned", "rotary", "sinusoidal", "relative", "none"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.mlp": ("gelu", "swiglu", "relu", "geglu", "relu2"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.logits_dtype": ("float32", "bfloat16"),
    "model.remat_policy": tuple(REMAT_POLICIES),
    "model.attention_impl": ("auto", "xla", "cudnn"),
    "model.matmul_dtype": ("compute", "bfloat16"),
    "model.norm_position": ("pre", "post"),  # issue 11
    "model.pooling": POOLING_CHOICES,  # issue 9: the classifier's pooled hidden state
    "data.tokenizer": ("char", "byte", "sentencepiece", "hf"),
    "data.token_dtype": ("uint16", "uint32", "int32"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
    "optim.optimizer": ("adamw", "muon"),
    "optim.muon_ns_dtype": ("float32", "bfloat16"),  # issue 12
    "mesh.distributed.initialize": ("auto", "on", "off"),
    "train.nonfinite_policy": ("skip", "halt"),
    "lora.base_dtype": ("float32", "int8"),
}


def registry_choices() -> dict[str, tuple[str, ...]]:
  """Choices that plug-in registries define (read at validation time, so objectives, model
  families and example formats registered by other modules are accepted)."""
  from llmjax import objectives
  from llmjax.data import formats
  from llmjax.model import FAMILIES
  return {"train.objective": objectives.names(), "model.family": tuple(FAMILIES),
          "data.format": ("auto",) + tuple(formats.FORMATS),
          "data.train_on": formats.TRAIN_ON, "data.truncate": formats.TRUNCATE}


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


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_slices: int | None = None) -> None:
  """Checks everything that can be checked before touching data or devices. Raises ConfigError."""
  _check_schema(config)
  flat = flatten(config)
  for name, options in {**CHOICES, **registry_choices()}.items():
    _need(flat[name] in options, f"{name}={flat[name]!r} is not one of {', '.join(options)}")
  m, d, t, o = config.model, config.data, config.train, config.optim
  for name in ("model.num_layers", "model.num_heads", "model.embed_dim", "model.max_seq_len",
               "data.seq_len", "data.batch_size", "train.steps"):
    _need(flat[name] > 0, f"{name}={flat[name]} must be positive")
  _need(t.grad_accum_steps >= 0, f"train.grad_accum_steps={t.grad_accum_steps} must be positive, "
        "or 0/'auto' (the smallest count that fits the device)")
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
  _need(m.rope_scaling == "none" or m.rope_scaling_factor > 0,
        f"model.rope_scaling_factor={m.rope_scaling_factor} must be positive")
  _need(m.rope_scaling != "llama3" or m.rope_high_freq_factor > m.rope_low_freq_factor > 0,
        "model.rope_scaling='llama3' needs rope_high_freq_factor > rope_low_freq_factor > 0")
  _need(d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
        "raise model.max_seq_len or shorten data.seq_len")
  _need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
  _need(0.0 < d.val_fraction < 1.0 or bool(d.val_path),
        f"data.val_fraction={d.val_fraction} must be in (0, 1) unless data.val_path is set")
  _need(d.tokenizer != "hf" or d.tokenizer_path,
        "data.tokenizer='hf' needs data.tokenizer_path=<directory with tokenizer.json or "
        "tokenizer.model> (runs created by `llmjax.convert hf_import` already carry theirs)")
  _need(d.tokenizer != "sentencepiece" or d.tokenizer_path or d.sp_vocab_size >= 16,
        "data.sp_vocab_size must be at least 16 to train a sentencepiece tokenizer")
  _need(t.grad_accum_steps == 0 or d.batch_size % t.grad_accum_steps == 0,
        f"data.batch_size={d.batch_size} is not divisible by train.grad_accum_steps="
        f"{t.grad_accum_steps}; pick a batch size that is a multiple of it, or set "
        "--config.train.grad_accum_steps to a divisor of it (1: no accumulation)")
  _need(t.objective != "masked_lm" or not m.causal or m.family == "encoder",
        "train.objective='masked_lm' needs a bidirectional model: set "
        "--config.model.family=encoder (or --config.model.causal=False)")
  _validate_encoder(m, t)
  _check_family(config)
  _need(m.num_labels >= 0, f"model.num_labels={m.num_labels} must be >= 0 (0: from the data)")
  _need(t.epochs >= 0, f"train.epochs={t.epochs} must be >= 0 (0: train.steps decides)")
  _need(not t.keep_best or t.keep_best.split("/")[-1].replace("_", "").isalnum(),
        f"train.keep_best={t.keep_best!r} must name a validation metric, e.g. 'val/loss' or "
        "'val/accuracy'")
  _need(d.format == "auto" or _is_task_path(d.path),
        f"data.format={d.format!r} needs task data in data.path (.jsonl, .parquet or a datasets "
        f"directory), got {d.path!r}")
  _validate_checkpointing(t)
  _validate_lora(config)
  _need(o.lr > 0, f"optim.lr={o.lr} must be positive")
  _need(o.muon_ns_steps > 0, f"optim.muon_ns_steps={o.muon_ns_steps} must be positive")  # issue 12
  _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  _need(0.0 < o.cooldown_frac <= 1.0, f"optim.cooldown_frac={o.cooldown_frac} must be in (0, 1]")
  _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
  _check_rules(config)
  d_ = config.mesh.distributed
  _need(d_.num_processes >= 0, f"mesh.distributed.num_processes={d_.num_processes} must be >= 0")
  _need(d_.process_id >= -1, f"mesh.distributed.process_id={d_.process_id} must be >= 0 (or -1)")
  _need(config.mesh.cpu_devices >= 0,
        f"mesh.cpu_devices={config.mesh.cpu_devices} must be 0 (one per core) or a device count")
  _need(config.mesh.cpu_processes >= 0,  # issue 12
        f"mesh.cpu_processes={config.mesh.cpu_processes} must be 0 (one per core), 1 (one "
        "process) or a process count")
  if num_devices is not None:
    sizes = mesh_shape(config, num_devices, num_slices)
    batch_shards = sizes["data"] * sizes["fsdp"]
    micro = d.batch_size // max(t.grad_accum_steps, 1)  # 'auto' (0) picks a count that divides
    _need(t.grad_accum_steps != 0 or d.batch_size % batch_shards == 0,
          f"data.batch_size={d.batch_size} is not divisible by the data-parallel size "
          f"mesh.data*mesh.fsdp={batch_shards}, so train.grad_accum_steps=auto has no micro-batch "
          "to choose; make the batch a multiple of it")
    _need(t.grad_accum_steps == 0 or micro % batch_shards == 0,
          f"the micro-batch data.batch_size/train.grad_accum_steps={micro} is not divisible by the "
          f"data-parallel size mesh.data*mesh.fsdp={batch_shards} (ICI x DCN); make the batch a "
          "multiple of it")
    _need(m.num_heads % sizes["tensor"] == 0,
          f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={sizes['tensor']}; "
          "use a tensor-parallel size that divides the head count")
    _need(d.seq_len % sizes["sequence"] == 0,
          f"data.seq_len={d.seq_len} is not divisible by mesh.sequence={sizes['sequence']}; "
          "use a sequence-parallel size that divides the sequence length")


def _validate_encoder(m, t) -> None:
  """Issue 11: encoder heads and the masked-LM recipe."""
  _need(m.type_vocab_size >= 0, f"model.type_vocab_size={m.type_vocab_size} must be >= 0")
  _need(m.family == "encoder" or not (m.type_vocab_size or m.pooler or m.nsp_head),
        "model.type_vocab_size, model.pooler and model.nsp_head belong to encoders: set "
        "--config.model.family=encoder")
  _need(m.pooler or not m.nsp_head,
        "model.nsp_head=True needs model.pooler=True (NSP classifies the pooled [CLS] token)")
  _need(not m.pooler or m.pooling in ("auto", "first"),
        f"model.pooling={m.pooling!r} conflicts with model.pooler=True (BERT's pooler reads the "
        "first token); set --config.model.pooler=False or --config.model.pooling=first")
  _need(0.0 < t.mlm_probability < 1.0,
        f"train.mlm_probability={t.mlm_probability} must be in (0, 1)")
  _need(t.mlm_mask_fraction >= 0 and t.mlm_random_fraction >= 0
        and t.mlm_mask_fraction + t.mlm_random_fraction <= 1.0,
        f"train.mlm_mask_fraction={t.mlm_mask_fraction} + train.mlm_random_fraction="
        f"{t.mlm_random_fraction} must be non-negative and sum to at most 1")
  _need(not t.mlm_nsp or (m.family == "encoder" and m.nsp_head),
        "train.mlm_nsp=True needs an encoder with an NSP head: set --config.model.family=encoder "
        "--config.model.pooler=True --config.model.nsp_head=True")
  _need(not (t.mlm_nsp or t.mlm_whole_word) or t.objective == "masked_lm",
        "train.mlm_nsp and train.mlm_whole_word apply to train.objective='masked_lm'")


def _validate_lora(config) -> None:
  """What can be checked without the model; llmjax.adapters checks targets and ranks against it."""
  lo = config.lora
  _need(lo.rank >= 0, f"lora.rank={lo.rank} must be positive (or 0 for no adapters)")
  _need(lo.rank > 0 or lo.base_dtype == "float32",
        f"lora.base_dtype={lo.base_dtype!r} quantizes a frozen base, which needs adapters: set "
        "--config.lora.rank=8 (for example)")
  _need(lo.alpha > 0, f"lora.alpha={lo.alpha} must be positive (the adapter scale is alpha/rank)")
  _need(0.0 <= lo.dropout < 1.0, f"lora.dropout={lo.dropout} must be in [0, 1)")
  _need(lo.lr_ratio > 0, f"lora.lr_ratio={lo.lr_ratio} must be positive (B's learning rate is "
        "optim.lr times it; 1.0 = plain LoRA, ~16 = LoRA+)")
  _need(config.train.dpo_beta > 0, f"train.dpo_beta={config.train.dpo_beta} must be positive")
  _need(config.train.dpo_rpo_alpha >= 0,
        f"train.dpo_rpo_alpha={config.train.dpo_rpo_alpha} must be >= 0 (0: plain DPO)")
  if config.train.objective == "dpo":
    # the reference policy is the starting model with the adapters switched off: no second copy
    _need(bool(config.train.init_from),
          "train.objective='dpo' needs the starting model it is measured against (the reference "
          "policy): set --config.train.init_from=<run, e.g. an SFT run or an HF import>")
    _need(lo.rank > 0,
          "train.objective='dpo' trains LoRA adapters so the reference is the base with them "
          "switched off (no second copy of the weights): set --config.lora.rank=8 (for example)")


def _check_family(config) -> None:
  """Issue 11: an objective trains only the model families that take its inputs."""
  from llmjax import objectives
  m, t, d = config.model, config.train, config.data
  wanted = getattr(objectives.get(t.objective), "families", None)
  if wanted:
    _need(m.family in wanted,
          f"train.objective={t.objective!r} feeds source/target pairs to an encoder-decoder but "
          f"model.family={m.family!r}; set --config.model.family=encoder_decoder")
  else:
    _need(m.family != "encoder_decoder",
          f"model.family='encoder_decoder' needs encoder inputs, which train.objective="
          f"{t.objective!r} does not give; use train.objective='seq2seq' or 'span_corruption'")
  if m.family == "encoder_decoder":
    _need(d.source_len >= 0, f"data.source_len={d.source_len} must be >= 0 (0: data.seq_len)")
    src = d.source_len or d.seq_len
    _need(m.position != "learned" or src <= m.max_seq_len,
          f"data.source_len={src} is longer than model.max_seq_len={m.max_seq_len}; raise "
          "model.max_seq_len or shorten data.source_len")
    _need(0.0 < t.noise_density < 1.0, f"train.noise_density={t.noise_density} must be in (0, 1)")
    _need(t.mean_noise_span >= 1.0, f"train.mean_noise_span={t.mean_noise_span} must be >= 1")
    _need(t.span_sentinels >= 1, f"train.span_sentinels={t.span_sentinels} must be >= 1")


def _is_task_path(path: str) -> bool:
  from llmjax.data.formats import is_task_path
  return is_task_path(path)


def parse_steps(text: str) -> tuple[int, ...]:
  """'3,5, 7' -> (3, 5, 7) (train.inject_nan_grads)."""
  try:
    return tuple(sorted({int(x) for x in text.replace(" ", "").split(",") if x}))
  except ValueError:
    raise ConfigError(f"train.inject_nan_grads={text!r} must be comma-separated step numbers, "
                      "e.g. '5,6'") from None


def _validate_checkpointing(t) -> None:
  _need(t.checkpoint_every >= 0, f"train.checkpoint_every={t.checkpoint_every} must be >= 0")
  _need(t.keep_checkpoints >= 0, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 0 "
        "(0 keeps all)")
  _need(t.keep_checkpoint_period >= 0,
        f"train.keep_checkpoint_period={t.keep_checkpoint_period} must be >= 0 (0 disables)")
  _need(t.nonfinite_halt_after >= 1,
        f"train.nonfinite_halt_after={t.nonfinite_halt_after} must be at least 1")
  _need(t.z_loss >= 0, f"train.z_loss={t.z_loss} must be >= 0")
  parse_steps(t.inject_nan_grads)


MESH_AXES = ("data", "fsdp", "sequence", "tensor")  # outermost (DCN-friendly) to innermost


def _check_rules(config: ml_collections.ConfigDict) -> None:
  for name, value in config.mesh.rules.items():
    axes = [a.strip() for a in value.split(",") if a.strip()]
    for axis in axes:
      _need(axis in MESH_AXES, f"mesh.rules.{name}={value!r} names unknown mesh axis {axis!r}; "
            f"use a comma-separated subset of {', '.join(MESH_AXES)} or ''")
    _need(len(set(axes)) == len(axes), f"mesh.rules.{name}={value!r} repeats a mesh axis")


def _resolve(sizes: dict[str, int], total: int, what: str, unit: str, fix: str) -> dict[str, int]:
  """Fills the (at most one) -1 entry so that the sizes multiply to `total`."""
  free = [a for a, s in sizes.items() if s == -1]
  _need(len(free) <= 1, f"only one {what} size may be -1, got {', '.join(free)}")
  for axis, size in sizes.items():
    _need(size == -1 or size >= 1, f"{what}.{axis}={size} must be -1 or a positive integer")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    _need(total % fixed == 0,
          f"the {what} {_describe(sizes)} needs a multiple of {fixed} {unit} but there are "
          f"{total}; {fix}")
    sizes = dict(sizes, **{free[0]: total // fixed})
  _need(math.prod(sizes.values()) == total,
        f"the {what} {_describe(sizes)} multiplies to {math.prod(sizes.values())} but there are "
        f"{total} {unit}; {fix}")
  return sizes


def mesh_layout(config: ml_collections.ConfigDict, num_devices: int,
                num_slices: int | None = None) -> tuple[dict[str, int], dict[str, int]]:
  """(per-slice ICI sizes, across-slice DCN sizes), with -1 resolved; ConfigError if impossible.

  num_slices: TPU slices (or hosts, for multi-node GPUs) the devices span; None -> the product
  of the fixed mesh.dcn sizes (a -1 there then resolves to 1)."""
  ici = {a: int(config.mesh[a]) for a in MESH_AXES}
  dcn = {a: int(config.mesh.dcn[a]) for a in MESH_AXES}
  if num_slices is None:
    num_slices = math.prod(s for s in dcn.values() if s > 0)
  dcn = _resolve(dcn, num_slices, "mesh.dcn", "slices",
                 "slices are TPU slices, or processes when devices have no slice index; set "
                 "mesh.dcn.* to multiply to the slice count")
  _need(num_devices % num_slices == 0,
        f"{num_devices} devices cannot be split evenly into {num_slices} slices; check mesh.dcn.*")
  per_slice = num_devices // num_slices
  unit = "devices per slice" if num_slices > 1 else "devices"
  ici = _resolve(ici, per_slice, "mesh", unit,
                 f"make mesh.data*mesh.fsdp*mesh.sequence*mesh.tensor equal {per_slice} "
                 "(or set one of them to -1)")
  return ici, dcn


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int,
               num_slices: int | None = None) -> dict[str, int]:
  """Global size of every mesh axis (ICI x DCN); raises ConfigError when the sizes cannot
  multiply to the device count."""
  ici, dcn = mesh_layout(config, num_devices, num_slices)
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _describe(sizes: dict[str, int]) -> str:
  return " x ".join(f"{a}={s}" for a, s in sizes.items())


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> TransformerConfig:
  values = config.model.to_dict()
  if vocab_size is not None and not values["vocab_size"]:
    values["vocab_size"] = vocab_size
  return TransformerConfig.from_mapping(values)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config, merged over today's defaults so older runs still load."""
  config = default_config()
  config.update_from_flattened_dict(flatten(json.loads(text)))
  return config
