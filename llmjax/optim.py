"""The Optax chain: global-norm clipping, then AdamW with a decay mask, on a warmup + decay schedule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NO_DECAY_LEAVES = ("bias", "scale")                        # norms and biases
EMBEDDING_LEAVES = ("token_embedding", "position_embedding")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine / linear decay to lr*min_lr_ratio, or constant, or
  constant and a linear decay over the last `cooldown_frac` of the steps after warmup ('wsd')."""
  o = optim_config
  peak, warmup = o.lr, o.warmup_steps
  decay_steps = max((o.decay_steps or total_steps) - warmup, 1)
  end = o.lr * o.min_lr_ratio
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif o.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif o.schedule == "wsd":  # warmup-stable-decay (the modded-nanogpt speedrun's shape)
    cool = max(int(round(decay_steps * o.cooldown_frac)), 1)
    decay = optax.join_schedules([optax.constant_schedule(peak),
                                  optax.linear_schedule(peak, end, cool)], [decay_steps - cool])
  else:
    raise ValueError(f"optim.schedule={o.schedule!r} is not one of cosine, linear, constant, wsd")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params, decay_embeddings: bool = False):
  """True where weight decay applies: matrices, never norms or biases; embeddings if asked."""
  def decide(path, _):
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    if names[-1] in NO_DECAY_LEAVES:
      return False
    if names[-1] in EMBEDDING_LEAVES:
      return decay_embeddings
    return True
  return jax.tree_util.tree_map_with_path(decide, params)


# Which kernel axes a Muon update orthogonalizes over, by the layer that owns the kernel (its
# leading axes, e.g. the stacked 'layers' axis, are batch axes: one matrix per layer).
_ATTENTION_IN = ("query", "key", "value")   # [..., embed, heads, head_dim]
_ATTENTION_OUT = ("out",)                   # [..., heads, head_dim, embed]


def muon_dimension_numbers(params):
  """Per leaf: MuonDimensionNumbers for a layer's weight matrix, None (-> AdamW) for embeddings,
  the lm head, norms and biases (as in modded-nanogpt)."""
  from optax.contrib import MuonDimensionNumbers as Dims
  import flax.linen as nn
  # The train state is shaped from boxed (nn.Partitioned) params: decide on the plain arrays. The
  # plain tree is a prefix of the boxed one, which is all optax's masking needs.
  params = nn.meta.unbox(params)

  def decide(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    if names[-1] != "kernel" or len(names) < 2 or names[-2] == "lm_head":
      return None
    if names[-2] in _ATTENTION_IN:
      return Dims(reduction_axis=leaf.ndim - 3, output_axis=(leaf.ndim - 2, leaf.ndim - 1))
    if names[-2] in _ATTENTION_OUT:
      return Dims(reduction_axis=(leaf.ndim - 3, leaf.ndim - 2), output_axis=leaf.ndim - 1)
    return Dims(reduction_axis=leaf.ndim - 2, output_axis=leaf.ndim - 1)
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim_config, total_steps: int):
  o = optim_config
  schedule = learning_rate_schedule(o, total_steps)
  mask = lambda p: weight_decay_mask(p, o.decay_embeddings)  # noqa: E731
  if o.get("optimizer", "adamw") == "muon":
    from llmjax import muon
    ratio = o.muon_lr / o.lr  # the same warmup and decay, scaled to Muon's learning rate
    main = muon.muon(lambda step: schedule(step) * ratio, muon_dimension_numbers,
                     beta=o.muon_momentum, ns_steps=o.muon_ns_steps,
                     ns_dtype=jnp.dtype(o.muon_ns_dtype), weight_decay=o.weight_decay,
                     weight_decay_mask=mask, adam_b1=o.b1, adam_b2=o.b2,
                     adam_learning_rate=schedule, adam_weight_decay=o.weight_decay)
  else:
    main = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=mask)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  return optax.chain(*parts, main), schedule
