"""benchmarks/lora.py's base-shape flags (--base_layers/--base_width/--base_heads/--matmul_dtype)
and its exact trainable-share and optimizer-byte figures, on abstract programs (nothing trains)."""
import argparse
import sys

import pytest

from conftest import ROOT
from llmjax import config as cfglib
from llmjax import program as programlib
from llmjax import runs
from llmjax import sharding as shd

sys.path.insert(0, str(ROOT / "benchmarks"))
import finetune_addition as fa  # noqa: E402
import lora as lora_bench  # noqa: E402


def _args(*flags):
  p = argparse.ArgumentParser()
  fa.add_recipe_args(p)
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--lora_alpha", type=float, default=16.0)
  p.add_argument("--lora_targets", default="all")
  p.add_argument("--lora_lr", type=float, default=2e-3)
  p.add_argument("--lora_lr_ratio", type=float, default=1.0)
  p.add_argument("--train_seed", type=int, default=None)
  return p.parse_args(list(flags))


def test_base_shape_flags_reach_the_base_config_and_defaults_stay_issue_9s():
  default = fa.base_config_from_args(_args()).model
  assert (default.num_layers, default.embed_dim, default.num_heads, default.matmul_dtype) == (
      4, 128, 4, "compute")
  c = fa.base_config_from_args(_args("--base_layers=2", "--base_width=96", "--base_heads=3",
                                     "--matmul_dtype=bfloat16", "--pretrain_steps=7",
                                     "--pretrain_lr=5e-4"))
  assert (c.model.num_layers, c.model.embed_dim, c.model.num_heads, c.model.matmul_dtype) == (
      2, 96, 3, "bfloat16")
  assert c.train.steps == 7 and c.optim.lr == 5e-4
  cfglib.validate(c)  # a valid pretraining config


def _base_dir(tmp_path, *flags):
  """A directory with only the base run's config.json: what finetune.get_config and the shape
  check read (the programs below are abstract: no checkpoint is loaded)."""
  base = tmp_path / "base"
  base.mkdir()
  c = fa.base_config_from_args(_args(*flags))
  c.model.vocab_size = 512
  (base / runs.CONFIG_FILE).write_text(cfglib.to_json(c))
  return str(base)


def test_reused_base_of_another_shape_is_named(tmp_path):
  base = _base_dir(tmp_path, "--base_layers=2", "--base_width=64", "--base_heads=2")
  assert fa.base_shape_mismatch(base, _args("--base_layers=2", "--base_width=64",
                                            "--base_heads=2")) == ""
  why = fa.base_shape_mismatch(base, _args("--base_layers=2", "--base_width=96",
                                           "--base_heads=2"))
  assert "embed_dim=64 (flags ask 96)" in why and "--workdir" in why and "\n" not in why


def test_trainable_share_and_optimizer_bytes_are_exact(tmp_path):
  """lora.memory() on a 2 x 64 base: rank 8 on all seven matrices plus the token table is
  exactly the adapter count, and AdamW holds two float32 moments of the trainable leaves only."""
  flags = ("--base_layers=2", "--base_width=64", "--base_heads=2")
  base = _base_dir(tmp_path, *flags)
  args = _args(*flags, "--lora_targets=all,embedding")
  paths = {"train": str(tmp_path / "t.jsonl"), "val": str(tmp_path / "v.jsonl")}
  programs = {}
  for name in ("full", "lora_r8"):
    c = lora_bench.lora_config(base, paths, args, *lora_bench.variants(args)[name])
    programs[name] = programlib.build(c, shd.make_mesh(c), cfglib.model_config(c, 512))
  m = lora_bench.memory(programs)
  d, f, layers, vocab, r = 64, 256, 2, 512, 8
  base_params = layers * (4 * d * d + 3 * d * f + 2 * d) + vocab * d + d
  adapters = layers * r * (4 * 2 * d + 2 * (d + f) + (f + d)) + r * (vocab + d)
  assert m["full"]["params"] == m["full"]["trainable"] == base_params
  assert m["lora_r8"]["trainable"] == adapters
  assert m["lora_r8"]["params"] == base_params + adapters
  assert m["lora_r8"]["trainable_fraction"] == pytest.approx(adapters / (base_params + adapters))
  # two float32 moments per trainable parameter, plus a few scalar counters
  assert 8 * adapters <= m["lora_r8"]["optimizer_bytes"] < 8 * adapters + 64
  assert 8 * base_params <= m["full"]["optimizer_bytes"] < 8 * base_params + 64


def test_runs_with_other_seeds_or_targets_get_their_own_directories():
  """A shared --workdir reuses a run only when it was made with the same settings."""
  assert lora_bench.run_name("full", _args()) == "ft_completion"
  assert lora_bench.run_name("lora_r8", _args()) == "ft_lora_r8"
  assert lora_bench.run_name("lora_r8_qve", _args()) == "ft_lora_r8_qve"
  assert lora_bench.run_name("lora_r8", _args("--lora_targets=all,embedding")) == (
      "ft_lora_r8_all-embedding")
  assert lora_bench.run_name("full", _args("--train_seed=1")) == "ft_completion_seed1"
  assert lora_bench.run_name("qlora_r8", _args("--lora_targets=all,embedding",
                                               "--train_seed=1")) == (
      "ft_qlora_r8_all-embedding_seed1")


def test_reused_run_of_another_recipe_is_named(tmp_path):
  """Run directories are named by variant and seed only; a run of another budget, learning rate
  or weight decay in the same --workdir is refused by name, not measured as this recipe's."""
  base = _base_dir(tmp_path)
  paths = {"train": "train.jsonl", "val": "val.jsonl"}
  args = _args("--finetune_steps=800")
  table = lora_bench.variants(args)
  work = tmp_path / "ft_lora_r8"
  work.mkdir()
  (work / runs.CONFIG_FILE).write_text(cfglib.to_json(
      lora_bench.lora_config(base, paths, args, *table["lora_r8"])))
  same = lora_bench.lora_config(base, paths, _args("--finetune_steps=800"), *table["lora_r8"])
  assert lora_bench.reused_run_mismatch(str(work), same) == ""
  other = _args("--finetune_steps=1500", "--weight_decay=0.1")
  why = lora_bench.reused_run_mismatch(str(work), lora_bench.lora_config(
      base, paths, other, *lora_bench.variants(other)["lora_r8"]))
  assert "train.steps=800 (flags ask 1500)" in why and "optim.weight_decay=0.0 (flags ask 0.1)" in why
  assert "fresh --workdir" in why and "\n" not in why
  full = lora_bench.lora_config(base, paths, args, *table["full"])  # no adapters: lora.rank 0
  assert "lora.rank=8 (flags ask 0)" in lora_bench.reused_run_mismatch(str(work), full)
