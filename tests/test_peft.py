"""LoRA adapters in Hugging Face PEFT's format, checked against the peft library on CPU torch.

Random HF GPT-2 and Llama (grouped-query attention) models from tests/test_convert.py are imported;
adapters go both ways: llmjax -> adapter_config.json + adapter_model.safetensors ->
peft.PeftModel.from_pretrained (no missing/unexpected keys, same logits), and an adapter made by
peft itself -> llmjax (same logits).
"""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import convert
from llmjax.convert import peft as peftconv
from llmjax.model import lora as loralib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_convert import VOCAB, _hf_configs, _perturb, _tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """name -> (torch model, its directory) for a random GPT-2 and a random GQA Llama."""
  tokenizer = _tokenizer()
  out = {}
  for seed, name in enumerate(("gpt2", "llama")):
    cls, config = _hf_configs()[name]
    torch.manual_seed(2000 + seed)
    model = _perturb(cls(config), seed)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    out[name] = (model, path)
  return out


def _ids(length=24, batch=2, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _random_adapter(params, seed):
  """Every adapter leaf random (B too), so the comparison exercises every block of every matrix."""
  adapter, base = loralib.split(params)
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return loralib.combine(base, jax.tree.unflatten(tree, leaves))


def _lora_params(loaded, spec, seed=0):
  model = loralib.with_lora(loaded.model, spec)
  init = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  adapter, _ = loralib.split(jax.tree.map(np.asarray, flax_unbox(init)))
  return model, _random_adapter(loralib.combine(loaded.params, adapter), seed)


def flax_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name,targets", [
    ("gpt2", "query,value,out,mlp"),          # a fused c_attn of rank 2r, both c_proj modules
    ("gpt2", "key"),                          # a single block of c_attn
    ("llama", "attn,mlp,lm_head"),            # every Llama target, GQA k/v, untied head
])
def test_exported_adapter_loads_in_peft_with_same_logits(hf, tmp_path, name, targets):
  model, path = hf[name]
  loaded = convert.load_hf(path)
  spec = loralib.make_spec(loaded.model_config, 4, 8.0, targets)
  lmodel, params = _lora_params(loaded, spec, seed=1)
  adapter, _ = loralib.split(params)
  written = peftconv.save_adapter(loaded.family, adapter, spec, loaded.model_config, tmp_path)
  assert written == ["adapter_config.json", "adapter_model.safetensors"]
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["fan_in_fan_out"] is (name == "gpt2")

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_model = peft.PeftModel.from_pretrained(_fresh(name, path), tmp_path).eval()
  # PEFT warns about adapter keys it misses or does not expect
  assert not [w for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
  state = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
  from safetensors.numpy import load_file
  saved = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert sorted(k.replace(".weight", "") for k in state) == \
      sorted(k.replace(".weight", "") for k in saved)  # no missing / unexpected keys
  ids = _ids()
  ours = np.asarray(lmodel.apply({"params": params}, jnp.asarray(ids)))
  theirs = _torch_logits(peft_model, ids)
  base = _torch_logits(model, ids)
  assert np.abs(theirs - base).max() > 1e-2  # the adapter changes the output
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _fresh(name, path):
  cls, _ = _hf_configs()[name]
  return cls.from_pretrained(path).eval()


@pytest.mark.parametrize("name,modules,extra", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"], dict(fan_in_fan_out=True)),
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
     dict(rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3.0}, use_rslora=True)),
])
def test_adapter_made_by_peft_imports(hf, tmp_path, name, modules, extra):
  _, path = hf[name]
  torch.manual_seed(7)
  config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=modules, lora_dropout=0.0,
                           init_lora_weights=False, task_type="CAUSAL_LM", **extra)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fan_in_fan_out notices
    peft_model = peft.get_peft_model(_fresh(name, path), config).eval()
  peft_model.save_pretrained(tmp_path)
  loaded = convert.load_hf(path)
  cfg_json, tensors = peftconv.read_adapter(tmp_path)
  spec, adapter = peftconv.peft_to_adapter(loaded.family, cfg_json, tensors, loaded.model_config)
  params = loralib.combine(loaded.params, adapter)
  lmodel = loralib.with_lora(loaded.model, spec)
  ids = _ids(seed=5)
  ours = np.asarray(lmodel.apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(ours, _torch_logits(peft_model, ids), atol=1e-4, rtol=0)


def test_import_refuses_a_base_of_another_shape(hf, tmp_path):
  _, path = hf["llama"]
  loaded = convert.load_hf(path)
  spec = loralib.make_spec(loaded.model_config, 2, 4.0, "query")
  _, params = _lora_params(loaded, spec)
  peftconv.save_adapter(loaded.family, loralib.split(params)[0], spec, loaded.model_config, tmp_path)
  import dataclasses
  wider = dataclasses.replace(loaded.model_config, embed_dim=96)
  cfg_json, tensors = peftconv.read_adapter(tmp_path)
  with pytest.raises(convert.ConversionError, match="base of another shape"):
    peftconv.peft_to_adapter(loaded.family, cfg_json, tensors, wider)
  shallower = dataclasses.replace(loaded.model_config, num_layers=1)
  with pytest.raises(convert.ConversionError, match="base of another shape"):
    peftconv.peft_to_adapter(loaded.family, cfg_json, tensors, shallower)
  with pytest.raises(convert.ConversionError, match="not a PEFT adapter directory"):
    peftconv.read_adapter(tmp_path / "nothing")


def _greedy_matches(torch_model, ours, prompts, steps=32):
  """Greedy continuations agree, up to exact ties of the reference's logits (a random model can
  produce them: at the first differing token both candidates must be tied to fp32 noise)."""
  with torch.no_grad():
    theirs = torch_model.generate(torch.as_tensor(prompts, dtype=torch.long),
                                  attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                  max_new_tokens=steps, do_sample=False, pad_token_id=0)
  theirs = theirs[:, prompts.shape[1]:].numpy().tolist()
  for b, (mine, ref) in enumerate(zip(ours, theirs)):
    if mine == ref:
      continue
    k = next(i for i, (a, t) in enumerate(zip(mine, ref)) if a != t)
    with torch.no_grad():
      logits = torch_model(torch.as_tensor([prompts[b].tolist() + ref[:k]])).logits[0, -1]
    gap = abs(float(logits[mine[k]] - logits[ref[k]]))
    assert gap < 1e-5, f"sequence {b} differs at token {k} with a logit gap of {gap}"
  assert sum(a == t for a, t in zip(ours, theirs)) >= 1


@pytest.mark.slow  # minutes: an import, a LoRA training run, two exports and a peft_import each
@pytest.mark.parametrize("name,targets", [("gpt2", "query,value,out,mlp"),
                                          ("llama", "attn,mlp,lm_head")])
def test_peft_round_trip_after_fine_tuning(hf, tmp_path, name, targets):
  """The bar: HF import -> LoRA fine-tune a few steps -> adapter export -> PeftModel on the HF
  base gives llmjax's logits (1e-4) and 32-token greedy continuation; the merged export loads in
  plain transformers with the same logits."""
  from llmjax import loop, runs
  from llmjax.generate import generate
  from test_convert import TEXT
  model, path = hf[name]
  base = tmp_path / "base"
  convert.import_hf(path, base)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT * 5)
  config = runs.read_config(base)
  config.data.update(path=str(corpus), seq_len=32, batch_size=4)
  config.lora.update(rank=4, alpha=8.0, targets=targets)
  config.optim.update(lr=5e-3, warmup_steps=0)
  config.train.update(steps=4, init_from=str(base), eval_every=0, eval_batches=1,
                      sample_tokens=0, progress=False, tensorboard=False, checkpoint_every=0)
  loop.train(config, str(tmp_path / "lora"))
  tuned = runs.load_run(tmp_path / "lora")
  adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
  convert.export_adapter(tmp_path / "lora", adapter_dir)
  convert.export_hf(tmp_path / "lora", merged_dir, merge=True)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_model = peft.PeftModel.from_pretrained(_fresh(name, path), adapter_dir).eval()
  ids = _ids(length=20, seed=9)
  ours = np.asarray(tuned.model.apply({"params": tuned.params}, jnp.asarray(ids)))
  theirs = _torch_logits(peft_model, ids)
  assert np.abs(theirs - _torch_logits(model, ids)).max() > 1e-3  # fine-tuning changed the model
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  prompts = _ids(length=8, seed=3)
  _greedy_matches(peft_model, generate(tuned.model, tuned.params, prompts.tolist(), 32,
                                       temperature=0.0), prompts)
  cls, _ = _hf_configs()[name]
  merged = cls.from_pretrained(merged_dir).eval()
  np.testing.assert_allclose(_torch_logits(merged, ids), ours, atol=1e-4, rtol=0)
  # and the adapter comes back into llmjax: peft_import onto the imported base
  convert.import_peft(adapter_dir, base, tmp_path / "back")
  back = runs.load_run(tmp_path / "back")
  np.testing.assert_allclose(np.asarray(back.model.apply({"params": back.params},
                                                          jnp.asarray(ids))), ours, atol=1e-5)
