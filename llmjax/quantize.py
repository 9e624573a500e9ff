"""int8 weight-only quantization for inference, with one float32 scale per output channel.

`quantize_params(params)` replaces every matrix of the model (the stacked attention and MLP
kernels, the token embedding, an untied output head) by a `QArray`: int8 values plus per-channel
scales, symmetric (scale = max|w| / 127 over the input dimensions). Norm scales, biases and the
learned position table stay in their float dtype: they are tiny and numerically sensitive.

A QArray is a pytree, so it goes through `jit`, `nn.scan`, the per-layer split that decoding does
(llmjax.model.unstack_layers) and device placement like any array. The model turns a layer's
weights back into floats just before its matmul (`llmjax.model.layers.dense_weight`, which calls
`dequantize_after` so the float copy cannot be scheduled earlier), and looks up embedding rows with
`take_rows`, so the stored weights stay int8 and only one layer is ever float at a time. The model
knows nothing of this module: `astype`, `shape`, `dtype`, `dequantize_after`, `take_rows` and
`__jax_array__` are all it uses.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

MODES = ("none", "int8")
# Weights named here are kept in float: norm scales, biases, the position table (see above).
_KEEP_FLOAT = ("scale", "bias", "position_embedding")
# How many leading input dimensions each matrix contracts, after the stacked 'layers' axis.
# The attention output projection contracts (heads, head_dim); every other kernel contracts one.
_TWO_INPUT_DIMS = ("out",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QArray:
  """w ~= values * scale, values int8, scale float32 broadcastable to values (kept dims = 1)."""
  values: jax.Array
  scale: jax.Array

  @property
  def shape(self):
    return self.values.shape

  @property
  def ndim(self):
    return self.values.ndim

  @property
  def size(self):
    return self.values.size

  @property
  def dtype(self):
    return self.scale.dtype  # the dtype it stands for

  @property
  def nbytes(self):
    return self.values.nbytes + self.scale.nbytes

  def astype(self, dtype):
    return self.values.astype(dtype) * self.scale.astype(dtype)

  def dequantize(self):
    return self.astype(self.scale.dtype)

  def dequantize_after(self, x, dtype):
    """The float weights, computed only once the activation `x` they multiply exists.

    Without the dependency, XLA:CPU's default scheduler dequantizes every layer up front in an
    unrolled decode step: float temporaries the size of the fp32 model and a 10-20x slower step
    (benchmarks/RESULTS.md). `0 * x[0]` is not folded away for floats (it is NaN for NaN x), so
    the order survives compilation; the cost is one scalar."""
    zero = jnp.zeros((), dtype) * x.reshape(-1)[0].astype(dtype)
    return self.values.astype(dtype) * (self.scale.astype(dtype) + zero)

  def take_rows(self, indices):
    """Rows of a row-scaled matrix (the token embedding) without dequantizing the whole table."""
    rows = jnp.take(self.values, indices, axis=0).astype(self.scale.dtype)
    return rows * jnp.take(self.scale, indices, axis=0)

  def __jax_array__(self):  # any other array use sees the dequantized weights
    return self.dequantize()


def quantize_array(w, reduce_axes: tuple[int, ...]) -> QArray:
  """Symmetric int8 with one scale per slice along the axes not in `reduce_axes`."""
  w32 = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w32), axis=reduce_axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return QArray(values, scale.astype(w.dtype))


def _input_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
  """The contracted (input) axes of the weight at `path`, or None to keep it in float."""
  name = path[-1]
  if name in _KEEP_FLOAT or ndim < 2:
    return None
  if name == "token_embedding":
    return (1,)  # [vocab, embed]: one scale per token row (lookup rows = tied-logit channels)
  if name == "kernel":
    first = 1 if path[0] == "layers" else 0  # stacked kernels: axis 0 is the layer
    count = 2 if len(path) >= 2 and path[-2] in _TWO_INPUT_DIMS else 1
    return tuple(range(first, first + count))
  return None


def _paths(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _map(tree, fn, prefix=()):
  return {k: (_map(v, fn, prefix + (k,)) if isinstance(v, dict) else fn(prefix + (k,), v))
          for k, v in tree.items()}


def quantize_params(params, mode: str = "int8"):
  """The params with every matrix int8-quantized (mode 'int8'), or unchanged (mode 'none').

  Shardings carry over: values keep their array's sharding and scales keep it minus the input
  axes, so a sharded model stays sharded."""
  if mode not in MODES:
    raise ValueError(f"quantize={mode!r} is not one of {', '.join(MODES)}")
  if mode == "none":
    return params

  def convert(path, w):
    axes = _input_axes(path, w.ndim)
    if axes is None:
      return w
    sharding = getattr(w, "sharding", None)
    if isinstance(sharding, NamedSharding):
      spec = tuple(sharding.spec) + (None,) * (w.ndim - len(sharding.spec))
      scale_spec = P(*(None if i in axes else s for i, s in enumerate(spec)))
      out = QArray(sharding, NamedSharding(sharding.mesh, scale_spec))
      return jax.jit(lambda x: quantize_array(x, axes), out_shardings=out)(w)
    return jax.jit(lambda x: quantize_array(x, axes))(w)
  return _map(params, convert)


def quantize_abstract(abstract_params):
  """What quantize_params makes of sharded ShapeDtypeStructs, without computing anything: the
  state layout of a program whose frozen weights are int8 (QLoRA)."""
  def convert(path, w):
    axes = _input_axes(path, len(w.shape))
    if axes is None:
      return w
    scale_shape = tuple(1 if i in axes else n for i, n in enumerate(w.shape))
    sharding = getattr(w, "sharding", None)
    scale_sharding = None
    if isinstance(sharding, NamedSharding):
      spec = tuple(sharding.spec) + (None,) * (len(w.shape) - len(sharding.spec))
      scale_sharding = NamedSharding(sharding.mesh,
                                     P(*(None if i in axes else s for i, s in enumerate(spec))))
    return QArray(jax.ShapeDtypeStruct(w.shape, jnp.int8, sharding=sharding),
                  jax.ShapeDtypeStruct(scale_shape, w.dtype, sharding=scale_sharding))
  return _map(abstract_params, convert)


def dequantize_params(params):
  """Float params back from quantized ones (for comparisons and export)."""
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QArray) else x, params,
                      is_leaf=lambda x: isinstance(x, QArray))


def weight_bytes(params) -> int:
  """Bytes the weights occupy (int8 values and their scales counted as stored)."""
  return sum(x.nbytes for x in jax.tree.leaves(params))


def quantized_fraction(params) -> float:
  """The fraction of parameters stored as int8."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
  total = sum(x.size for x in leaves)
  return sum(x.size for x in leaves if isinstance(x, QArray)) / max(total, 1)
