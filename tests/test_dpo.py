"""DPO (llmjax/objectives/dpo.py) and preference data (llmjax/data/preference.py)."""
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, run_cli
from llmjax import config as cfglib
from llmjax.data import DataError
from llmjax.data import formats
from llmjax.data.task_data import load_task_dataset
from llmjax.model import Transformer, TransformerConfig
from llmjax.model import lora as loralib
from llmjax.objectives.dpo import DPO

CFG = TransformerConfig(vocab_size=40, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=16)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_dpo_loss_matches_a_direct_computation():
  """A hand-made batch of two pairs (one a padding row): the objective's loss and metrics equal
  the DPO formula computed here in numpy from the model's own logits, with the reference being
  the base model (adapters off)."""
  spec = loralib.make_spec(CFG, 2, 4.0, "query,value")
  model = loralib.with_lora(Transformer(CFG), spec)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  adapter, base = loralib.split(params)
  adapter = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  params = loralib.combine(base, adapter)
  rows = lambda *r: np.asarray(r, np.int32)  # noqa: E731
  batch = {  # prompt tokens 1 2 3, then the response; the second pair is padding
      "chosen_inputs": rows([1, 2, 3, 7, 8, 0], [0] * 6),
      "chosen_targets": rows([2, 3, 7, 8, 9, 0], [0] * 6),
      "chosen_weights": np.asarray([[0, 0, 1, 1, 1, 0], [0] * 6], np.float32),
      "rejected_inputs": rows([1, 2, 3, 5, 0, 0], [0] * 6),
      "rejected_targets": rows([2, 3, 5, 6, 0, 0], [0] * 6),
      "rejected_weights": np.asarray([[0, 0, 1, 1, 0, 0], [0] * 6], np.float32),
  }
  config = cfglib.default_config()
  config.train.dpo_beta = 0.5
  objective = DPO(config, CFG)
  # every model call below is jitted: one compilation each instead of one per eager op (from an
  # empty compilation cache, as CI starts, that is the slower part on a CPU)
  loss, aux = jax.jit(lambda p: objective.loss(model, p, batch, jax.random.key(0), True))(params)

  def logp(apply_params, side, module):
    logits = np.asarray(jax.jit(module.apply)({"params": apply_params}, batch[f"{side}_inputs"][:1]))
    lp = _log_softmax(logits[0].astype(np.float64))
    t = batch[f"{side}_targets"][0]
    return float(np.sum(lp[np.arange(len(t)), t] * batch[f"{side}_weights"][0]))

  pc, pr = logp(params, "chosen", model), logp(params, "rejected", model)
  rc, rr = logp(base, "chosen", Transformer(CFG)), logp(base, "rejected", Transformer(CFG))
  margin = 0.5 * ((pc - rc) - (pr - rr))
  want = np.log1p(np.exp(-margin))  # -log sigmoid(margin)
  assert abs(margin) > 1e-3  # the adapters make policy and reference differ
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["reward_margin"]), margin, rtol=1e-5)
  np.testing.assert_allclose(float(aux["logp_chosen"]), pc, rtol=1e-5)
  np.testing.assert_allclose(float(aux["logp_rejected"]), pr, rtol=1e-5)
  assert float(aux["accuracy"]) == float(margin > 0) and float(aux["weight"]) == 1.0
  # gradients reach the adapters only through the policy; the base (reference) has none
  grads = jax.jit(jax.grad(lambda a: objective.loss(model, loralib.combine(base, a), batch,
                                                     jax.random.key(0), True)[0]))(adapter)
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(
      {k: v for k, v in _flat(grads).items() if k.endswith("lora_b")}))
  # eval sums over the batch, finalized on the host, agree with the loss
  sums = jax.device_get(jax.jit(lambda p: objective.eval_sums(model, p, batch, jax.random.key(0)))(params))
  final = objective.finalize({k: float(v) for k, v in sums.items()})
  np.testing.assert_allclose(final["loss"], want, rtol=1e-5)
  assert final["pairs"] == 1.0
  # RPO: + alpha * the chosen response's mean NLL (3 response tokens here)
  config.train.dpo_rpo_alpha = 0.5
  rpo, _ = jax.jit(lambda p: DPO(config, CFG).loss(model, p, batch, jax.random.key(0), True))(params)
  np.testing.assert_allclose(float(rpo), want + 0.5 * (-pc / 3), rtol=1e-5)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _data_config(path, **extra):
  c = cfglib.default_config()
  c.data.update(path=path, seq_len=24, tokenizer="char", **extra)
  return c.data


def test_preference_batches_weight_the_responses_only(tmp_path):
  records = [{"prompt": f"q{i}?", "chosen": " yes", "rejected": " no"} for i in range(10)]
  records += [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello",
               "rejected": [{"role": "assistant", "content": "go away"}]}]
  ex = formats.read_examples(_write(tmp_path / "p.jsonl", records[:10]))
  assert ex.format == "preference"
  chat = formats.read_examples(_write(tmp_path / "c.jsonl", records[10:]))
  assert chat.examples[0].is_chat and chat.examples[0].chosen == (("assistant", "hello"),)
  data = load_task_dataset(_data_config(str(tmp_path / "p.jsonl"), val_fraction=0.2), seed=0,
                           preference=True)
  batch = data.batch("train", 3, 4)
  assert set(batch) == {f"{s}_{n}" for s in ("chosen", "rejected")
                        for n in ("inputs", "targets", "weights")}
  tok = data.tokenizer
  for r in range(4):
    w = batch["chosen_weights"][r]
    response = tok.decode(batch["chosen_targets"][r][w > 0].tolist())
    assert response.startswith(" yes")  # " yes" (+ EOS when the tokenizer has one)
    w = batch["rejected_weights"][r]
    assert tok.decode(batch["rejected_targets"][r][w > 0].tolist()).startswith(" no")
  again = load_task_dataset(_data_config(str(tmp_path / "p.jsonl"), val_fraction=0.2), seed=0,
                            preference=True)
  for k in batch:  # a pure function of (seed, split, step)
    np.testing.assert_array_equal(batch[k], again.batch("train", 3, 4)[k])
  val = data.batch("val", 0, 4)
  assert val["chosen_weights"][2:].sum() == 0  # two val pairs, then padding rows


def test_identical_chosen_and_rejected_is_a_one_line_error(tmp_path):
  path = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": " x", "rejected": " y"},
                                         {"prompt": "b", "chosen": " z", "rejected": " z"}])
  with pytest.raises(DataError, match=r"bad.jsonl:2: \"chosen\" and \"rejected\" are identical"):
    formats.read_examples(path)


@pytest.mark.parametrize("extra,message", [
    ([], "train.objective='dpo' needs the starting model"),
    (["--config.train.init_from=runs/sft"], "train.objective='dpo' trains LoRA adapters"),
])
def test_dpo_without_a_reference_compatible_start_exits_2(tmp_path, extra, message):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " x", "rejected": " y"}] * 4)
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={tmp_path / 'run'}", "--config.train.objective=dpo",
                  f"--config.data.path={path}", *extra])
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.slow
def test_dpo_learns_a_synthetic_preference(tmp_path):
  """SFT answers "Y"/"N" at random; DPO (LoRA) must make the held-out preference accuracy and
  the greedy answers follow the rule (benchmarks/dpo_preference.py's defaults)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import dpo_preference as bench
  from llmjax import loop
  sft, train, test = bench.datasets(0, 1500, 200)
  paths = {k: bench.write_jsonl(tmp_path / f"{k}.jsonl", v)
           for k, v in (("sft", sft), ("train", train), ("test", test))}
  loop.train(bench.sft_config(paths["sft"], 300), str(tmp_path / "sft"))
  before = bench.judge(str(tmp_path / "sft"), test)
  assert 0.25 < before["preference_accuracy"] < 0.75  # chance: the SFT data had no preference
  final = loop.train(bench.dpo_config(str(tmp_path / "sft"), paths["train"], paths["test"], 300,
                                      0.1, 8, rpo_alpha=1.0), str(tmp_path / "dpo"))
  after = bench.judge(str(tmp_path / "dpo"), test)
  assert final["accuracy"] >= 0.9 and after["preference_accuracy"] >= 0.9
  assert after["greedy_follows"] >= 0.9
