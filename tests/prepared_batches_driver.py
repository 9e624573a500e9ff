"""Assembles 3 global training batches from a prepared directory and from a mixture, the way the
training loop does (this process's rows -> put_batch), and saves this process's rows and the
gathered global batch to OUT_p<rank>.npz. tests/test_prepare_train.py runs it as 2 processes x 4
devices (launch/local.py, which appends the --coordinator_address/--num_processes/--process_id
flags) and as 1 process x 8 devices, and compares.

  python tests/prepared_batches_driver.py PREPARED_DIR MIXTURE_SPEC OUT [launch flags]
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from llmjax import config as cfglib
from llmjax import distributed
from llmjax import sharding as shd
from llmjax.data import load_dataset


def main(argv):
  prepared, spec, out = argv[1:4]
  flags = dict(a[2:].split("=", 1) for a in argv[4:])
  config = cfglib.default_config()
  distributed.apply_flags(config, flags.get("coordinator_address", ""),
                          int(flags.get("num_processes", 0)), int(flags.get("process_id", -1)))
  distributed.initialize(config)
  n = jax.process_count()
  config.mesh.update(data=8 // n)
  config.mesh.dcn.data = n
  mesh = shd.make_mesh(config)
  saved = {}
  for name, data in (("dir", dict(path=prepared)), ("mix", dict(mixture=spec))):
    config.data.update(dict(dict(tokenizer="byte", seq_len=16, batch_size=16, path="", mixture=""),
                            **data))
    dataset = load_dataset(config.data, seed=0)
    for step in range(3):
      rows = dataset.batch("train", step, 16, jax.process_index(), n)
      global_batch = shd.put_batch(rows, mesh)
      full = multihost_utils.process_allgather(global_batch["inputs"], tiled=True)
      saved[f"local_{name}_{step}"] = rows["inputs"]
      saved[f"global_{name}_{step}"] = np.asarray(full)
  np.savez(f"{out}_p{jax.process_index()}.npz", **saved)
  print(f"process {jax.process_index()} of {n}: saved {len(saved)} arrays", flush=True)


if __name__ == "__main__":
  main(sys.argv)
