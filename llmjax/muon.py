"""Muon (momentum orthogonalized by Newton-Schulz), with the matrices of one shape orthogonalized
together and the iteration's matmuls in bf16 if asked.

The update is optax.contrib.muon's (the same Nesterov momentum with bias correction, Frobenius
pre-scaling, quintic Newton-Schulz coefficients, width scaling sqrt(max(1, fan_out/fan_in)), AdamW
on everything else); `tests/test_optim.py` checks it against optax's within float32 rounding. What
differs is how the iteration runs, for speed on a CPU (issue 12, benchmarks/RESULTS.md):

- every matrix is viewed as [batch, rows, cols] with rows <= cols (the iteration is the same on
  the transpose), and all matrices of one such shape are concatenated, so a model's q/k/v/out
  kernels are one [4*layers, d, d] stack and its MLP kernels one [2*layers, d, 4d] stack: two
  chains of batched matmuls instead of one per parameter;
- `ns_dtype='bfloat16'` runs the iteration's matmuls on bf16 operands with float32 accumulation
  (preferred_element_type), the form this CPU's AVX-512 BF16 units run about twice as fast as
  float32; bf16 accumulation was slower here, not faster;
- `ns_steps` sets the iteration count (5 as in modded-nanogpt).
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic iteration (as optax's default)


class MuonState(NamedTuple):
  count: jax.Array  # int32 scalar
  mu: Any           # first moment, like the params


def _axes(x, dims) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, reduction, output) axes of `x` under MuonDimensionNumbers `dims`."""
  norm = lambda a: tuple(i % x.ndim for i in ((a,) if isinstance(a, int) else a))  # noqa: E731
  red, out = norm(dims.reduction_axis), norm(dims.output_axis)
  batch = tuple(i for i in range(x.ndim) if i not in red + out)
  return batch, red, out


def matrix_view(x, dims) -> tuple[jax.Array, Callable[[jax.Array], jax.Array], float]:
  """x as [batch, rows, cols] with rows <= cols; the inverse; sqrt(max(1, fan_out/fan_in))."""
  batch, red, out = _axes(x, dims)
  size = lambda axes: math.prod(x.shape[i] for i in axes)  # noqa: E731
  fan_in, fan_out = size(red), size(out)
  order = batch + red + out
  m = x.transpose(order).reshape(size(batch), fan_in, fan_out)
  flip = fan_in > fan_out
  if flip:
    m = m.transpose(0, 2, 1)
  inverse_order = tuple(sorted(range(x.ndim), key=lambda i: order[i]))
  shape = tuple(x.shape[i] for i in order)

  def inverse(y):
    y = y.transpose(0, 2, 1) if flip else y
    return y.reshape(shape).transpose(inverse_order)
  return m, inverse, math.sqrt(max(1.0, fan_out / fan_in))


def newton_schulz(x, steps: int, dtype=jnp.float32, eps: float = 1e-8,
                  coeffs=NS_COEFFS) -> jax.Array:
  """Approximately orthogonalizes each [rows, cols] matrix of x [n, rows, cols] (rows <= cols):
  Frobenius-normalize, then `steps` quintic iterations X <- aX + (bA + cA^2)X, A = XX^T."""
  a, b, c = coeffs
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True)) + eps)
  dot = lambda spec, p, q: jnp.einsum(spec, p.astype(dtype), q.astype(dtype),  # noqa: E731
                                      preferred_element_type=jnp.float32)
  for _ in range(steps):
    gram = dot("nij,nkj->nik", x, x)
    poly = b * gram + c * dot("nij,njk->nik", gram, gram)
    x = a * x + dot("nij,njk->nik", poly, x)
  return x


def orthogonalize(updates: list, dims: list, steps: int, dtype, eps: float) -> list:
  """Newton-Schulz on every array of `updates` (with its MuonDimensionNumbers), the arrays of one
  matrix shape stacked into a single batch; each result scaled by its width factor."""
  views = [matrix_view(u, d) for u, d in zip(updates, dims)]
  groups = collections.defaultdict(list)  # (rows, cols) -> indices
  for i, (m, _, _) in enumerate(views):
    groups[m.shape[1:]].append(i)
  out = [None] * len(updates)
  for members in groups.values():
    stack = jnp.concatenate([views[i][0] for i in members]) if len(members) > 1 else views[members[0]][0]
    result = newton_schulz(stack.astype(jnp.float32), steps, dtype, eps)
    start = 0
    for i in members:
      m, inverse, scale = views[i]
      part = result[start:start + m.shape[0]]
      start += m.shape[0]
      out[i] = (scale * inverse(part)).astype(updates[i].dtype)
  return out


def _is_dims(x) -> bool:
  from optax.contrib import MuonDimensionNumbers
  return isinstance(x, MuonDimensionNumbers)


def scale_by_muon(dimension_numbers: Callable, beta: float = 0.95, ns_steps: int = 5,
                  ns_dtype=jnp.float32, eps: float = 1e-8,
                  nesterov: bool = True) -> optax.GradientTransformation:
  """Momentum, then Newton-Schulz orthogonalization and width scaling of every leaf that
  `dimension_numbers(tree)` gives MuonDimensionNumbers (the leaves it maps to None are passed
  through unchanged; under optax.partition they are masked out anyway)."""

  def init(params):
    return MuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params))

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    if nesterov:  # as optax.contrib.scale_by_muon: both terms bias-corrected
      mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                            optax.tree.bias_correction(updates, beta, count))
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count)
    leaves, treedef = jax.tree.flatten(mu_hat)
    dims = jax.tree.leaves(dimension_numbers(mu_hat), is_leaf=lambda d: d is None or _is_dims(d))
    if len(dims) != len(leaves):
      raise ValueError(f"muon: {len(dims)} dimension numbers for {len(leaves)} arrays")
    chosen = [i for i, d in enumerate(dims) if d is not None]
    done = orthogonalize([leaves[i] for i in chosen], [dims[i] for i in chosen], ns_steps,
                         ns_dtype, eps)
    for i, value in zip(chosen, done):
      leaves[i] = value
    return jax.tree.unflatten(treedef, leaves), MuonState(count=count, mu=mu)

  return optax.GradientTransformation(init, update)


def muon(learning_rate, dimension_numbers: Callable, *, beta: float = 0.95, ns_steps: int = 5,
         ns_dtype=jnp.float32, weight_decay: float = 0.0, weight_decay_mask=None,
         adam_learning_rate=None, adam_b1: float = 0.9, adam_b2: float = 0.999,
         adam_weight_decay: float = 0.0, eps: float = 1e-8) -> optax.GradientTransformation:
  """Muon on the leaves `dimension_numbers(params)` gives MuonDimensionNumbers, AdamW (Nesterov,
  as optax.contrib.muon) on the leaves it maps to None."""
  def labels(params):
    return jax.tree.map(lambda d: "adam" if d is None else "muon", dimension_numbers(params),
                        is_leaf=lambda d: d is None or _is_dims(d))

  return optax.partition(
      {"muon": optax.chain(
          scale_by_muon(dimension_numbers, beta, ns_steps, ns_dtype, eps),
          optax.add_decayed_weights(weight_decay, weight_decay_mask),
          optax.scale_by_learning_rate(learning_rate)),
       "adam": optax.adamw(adam_learning_rate if adam_learning_rate is not None else learning_rate,
                           b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=adam_weight_decay,
                           nesterov=True)},
      labels)
