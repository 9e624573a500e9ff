"""tests/spmd_driver.py's 5 training steps with LoRA adapters (rank 4 on attention and MLP), on
several meshes in one process with 8 fake CPU devices: the adapters carry logical axis names, so
every layout must train like one device. Usage: python tests/lora_spmd_driver.py OUT.npz"""
import sys

import spmd_driver

LAYOUTS = ("single", "data8", "fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2")

if __name__ == "__main__":
  plain = spmd_driver.gpt_config

  def lora_config(**model):
    config = plain(**model)
    config.lora.update(rank=4, alpha=8.0, targets="attn,mlp")
    return config

  spmd_driver.gpt_config = lora_config
  spmd_driver.main(sys.argv[1], LAYOUTS, extras=False)
