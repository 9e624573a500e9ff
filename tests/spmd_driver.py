"""Runs the same 5 training steps on several meshes in ONE process with 8 fake CPU devices and
writes what tests/test_sharding.py compares (losses, final params, memory figures) to a .npz file.

One process for every layout saves JAX start-up and lets XLA reuse work between compiles.
Usage (tests do this through conftest.run_cli with devices=8):
  python tests/spmd_driver.py OUT.npz [LAYOUT,LAYOUT,...]   (default: DEFAULT_LAYOUTS + extras)
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from llmjax import config as cfglib
from llmjax import plan as planlib
from llmjax import sharding as shd

STEPS = 5
VOCAB = 256
LAYOUTS = {  # name -> mesh sizes (data, fsdp, sequence, tensor)
    "single": dict(data=1, fsdp=1, sequence=1, tensor=1),
    "data8": dict(data=8, fsdp=1, sequence=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, sequence=1, tensor=1),
    "fsdp4_tensor2": dict(data=1, fsdp=4, sequence=1, tensor=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, sequence=1, tensor=2),
    "data2_sequence2_tensor2": dict(data=2, fsdp=1, sequence=2, tensor=2),
}
DEFAULT_LAYOUTS = ("single", "data8", "fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2")


def gpt_config(**model):
  """A small GPT-2-style model (biases, learned positions, tied embeddings) in float32."""
  c = cfglib.default_config()
  c.model.update(dict(dict(vocab_size=VOCAB, num_layers=2, num_heads=4, embed_dim=128,
                           max_seq_len=32, dtype="float32", param_dtype="float32"), **model))
  c.data.update(seq_len=32, batch_size=16)
  c.optim.update(lr=3e-3, warmup_steps=1)
  c.train.update(steps=STEPS)
  return c


def batches(config):
  rng = np.random.default_rng(0)
  shape = (config.data.batch_size, config.data.seq_len + 1)
  for _ in range(STEPS):
    tokens = rng.integers(0, VOCAB, shape, dtype=np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def train(config, devices, state=None, sharded_init=False):
  """5 steps on a mesh over `devices`. Returns (losses, final params, initial params, memory)."""
  mesh = shd.make_mesh(config, devices)
  built = planlib.build(config, mesh, VOCAB)
  if state is None or sharded_init:
    state = built.init(jax.random.key(config.train.seed))
  else:  # the same initial values, placed onto this mesh's shardings
    state = jax.device_put(state, built.state_shardings)
  init_params = jax.tree.map(np.asarray, state.params)
  initial = jax.device_get(state)  # a host copy: the compiled step donates `state`
  with built.scope():
    compiled = built.train_step.lower(built.abstract_state, built.abstract_batch()).compile()
    losses = []
    for batch in batches(config):
      state, metrics = compiled(state, jax.device_put(batch, built.batch_sharding))
      losses.append(float(metrics["loss"]))
  stats = compiled.memory_analysis()
  memory = {"argument": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes,
            "state": shd.bytes_per_device(built.abstract_state.params)
            + shd.bytes_per_device(built.abstract_state.opt_state),
            "batch": shd.bytes_per_device(built.abstract_batch())}
  hlo = compiled.as_text()
  return losses, jax.tree.map(np.asarray, state.params), init_params, memory, hlo, initial


def flat(tree, prefix):
  return {f"{prefix}/{jax.tree_util.keystr(k)}": v
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(out_path: str, layouts=DEFAULT_LAYOUTS, extras: bool = True) -> None:
  devices = jax.devices()
  assert len(devices) == 8, f"run with 8 fake devices, got {len(devices)}"
  arrays, info = {}, {"losses": {}, "memory": {}, "collectives": {}}
  single_state = None
  for name in layouts:
    sizes = LAYOUTS[name]
    config = gpt_config()
    config.mesh.update(sizes)
    use = devices[:1] if name == "single" else devices
    losses, params, init_params, memory, hlo, initial = train(
        config, use, state=single_state, sharded_init=(name == "fsdp4_tensor2"))
    if name == "single":
      single_state = initial  # every other layout starts from these values (one init compile)
    info["losses"][name] = losses
    info["memory"][name] = memory
    info["collectives"][name] = sum(hlo.count(op) for op in ("all-reduce", "all-gather",
                                                             "reduce-scatter", "all-to-all"))
    arrays.update(flat(params, name))
    arrays.update(flat(init_params, f"init_{name}"))

  if not extras:
    np.savez(out_path, **arrays)
    with open(out_path + ".json", "w") as f:
      json.dump(info, f)
    return

  # Scanned vs unrolled layers (the same stacked parameters, fully unrolled loop), one device.
  config = gpt_config(scan_layers=False)
  config.mesh.update(LAYOUTS["single"])
  losses, params, *_ = train(config, devices[:1], state=single_state)
  info["losses"]["unrolled"] = losses
  arrays.update(flat(params, "unrolled"))

  # Remat policies: gradients of the same loss, and the compiler's temporary (activation) bytes.
  from llmjax import train as trainlib
  from llmjax.model import Transformer
  from llmjax.model.transformer import REMAT_POLICIES
  batch = next(batches(config))
  info["remat_temp"] = {}
  with jax.default_device(devices[0]):
    for policy in REMAT_POLICIES:
      model = Transformer(cfglib.model_config(gpt_config(remat_policy=policy), VOCAB))
      loss_fn = trainlib.make_loss_fn(model)
      grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, jax.random.key(0), True)[0]))
      compiled = grad_fn.lower(single_state.params, batch).compile()
      arrays.update(flat(jax.device_get(compiled(single_state.params, batch)), f"grads_{policy}"))
      info["remat_temp"][policy] = compiled.memory_analysis().temp_size_in_bytes
  np.savez(out_path, **arrays)
  with open(out_path + ".json", "w") as f:
    json.dump(info, f)


if __name__ == "__main__":
  if len(sys.argv) > 2:  # an explicit layout list: just those layouts (the first must be 'single')
    main(sys.argv[1], tuple(sys.argv[2].split(",")), extras=False)
  else:
    main(sys.argv[1])
