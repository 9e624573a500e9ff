"""Data-parallel gradients with ONE flat all-reduce per step (CPU meshes; issue 12).

Under plain SPMD, XLA reduces the partial gradients of a data-parallel step as one all-reduce
of a tuple of every parameter's gradient. On the CPU that all-reduce goes through gloo, where a
tuple of 27 arrays (3.2 MB, nanoGPT's shakespeare_char model) took 83-118 ms between two local
processes against 3.5-5.5 ms for the same bytes as one array (benchmarks/RESULTS.md, "Issue 12").
So on a CPU mesh over several processes whose only split axis is the batch (mesh.cpu_processes
data parallelism), the gradient runs under `shard_map`: each device differentiates its own rows
(accumulating its share of every micro-batch), then the gradients and metrics travel as one
flat float32 vector in a single `psum`, as PyTorch DDP buckets them.

The result is the global gradient of the same loss as the SPMD step, up to float rounding: every
objective's loss is a weighted mean with its total weight in aux['weight'] (tokens, examples,
pairs), so device d's gradient enters with factor W_d / W (per micro-batch, W its global weight;
one scalar psum per micro-batch), exactly the weighting of the mean over the global rows.
Dropout masks are drawn per device (the key folded with the device index), so with dropout > 0
the masks, not the expectation, differ from a one-device run.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P



def applies(mesh) -> bool:
  """A CPU mesh over several processes (gloo collectives) split only along the batch (data;
  fsdp and every other axis 1): there the one-vector all-reduce replaces XLA's tuple
  all-reduce. In-process CPU devices (mesh.cpu_devices) do not go through gloo and keep plain
  SPMD, as do GPUs/TPUs, where XLA overlaps per-layer all-reduces with the backward pass (a
  single psum at the end would lose that)."""
  sizes = dict(mesh.shape)
  devices = list(mesh.devices.flat)
  if devices[0].platform != "cpu" or len({d.process_index for d in devices}) < 2:
    return False
  return all(size == 1 for axis, size in sizes.items() if axis != "data")


def micro_batches(batch, steps: int):
  """[B, ...] -> [steps, B/steps, ...] with micro-batch m = rows m, m+steps, m+2*steps, ...:
  strided, so that on a batch split over devices every micro-batch takes the same number of
  rows from each device (a contiguous split would move rows between devices)."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1), batch)


def make(grad_fn: Callable, mesh, grad_accum_steps: int) -> Callable:
  """grad_fn(params, batch, rng, frozen) -> ((loss, aux), grads) on some rows;
  returns f(params, batch, rng, frozen) -> (aux, grads) over the global batch (aux: micro-batch
  means of every entry, 'weight' summed), with one flat psum of gradients and metrics."""
  axis = "data"

  def local(params, batch, rng, frozen):
    # the model's activation constraints name mesh axes; inside shard_map every row is local
    with nn.logical_axis_rules(()):
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))  # this device's dropout masks

      def one(mb, key):
        (_, aux), grads = grad_fn(params, mb, key, frozen)
        total = jax.lax.psum(aux["weight"].astype(jnp.float32), axis)
        scale = aux["weight"].astype(jnp.float32) / jnp.maximum(total, 1.0)
        scaled = {k: v * scale for k, v in aux.items() if k != "weight"}
        scaled["weight"] = aux["weight"].astype(jnp.float32)
        return scaled, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)

      if grad_accum_steps == 1:
        aux, grads = one(batch, rng)
      else:
        micro = micro_batches(batch, grad_accum_steps)
        shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def accumulate(carry, xs):
          i, mb = xs
          return jax.tree.map(jnp.add, carry, one(mb, jax.random.fold_in(rng, i))), None

        (aux, grads), _ = jax.lax.scan(accumulate, zeros,
                                       (jnp.arange(grad_accum_steps), micro))
        aux = {k: v if k == "weight" else v / grad_accum_steps for k, v in aux.items()}
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      flat, unravel = ravel_pytree((aux, grads))
      # the one all-reduce (weight: each device's share of the total, summed)
      return unravel(jax.lax.psum(flat.astype(jnp.float32), axis).astype(flat.dtype))

  def sharded(params, batch, rng, frozen):
    rows = jax.tree.map(lambda x: P(axis, *([None] * (x.ndim - 1))), batch)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, P(), P()),
                         out_specs=(P(), P()), check_vma=False)(params, batch, rng, frozen)

  return sharded
