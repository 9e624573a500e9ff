"""Hugging Face interop, checked against transformers + CPU torch (test-only dependencies).

Tiny randomly initialized HF models (2 layers, 64 wide; every weight perturbed so that no norm
scale is 1 and no bias is 0) are saved with save_pretrained; after import, llmjax's logits and
greedy continuations must match PyTorch's. torch and transformers are imported once per module.
"""
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from llmjax import convert
from llmjax.convert import files
from llmjax.generate import generate
from llmjax.model import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

VOCAB = 320          # > the tokenizer's 300 tokens, like real models padded to a multiple
TEXT = ("First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
        "First Citizen: You are all resolved rather to die than to famish?\n") * 20


def _tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT], trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _perturb(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.eval()


def _hf_configs():
  c = transformers
  common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  llama = dict(common, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5)
  return {
      "gpt2": (c.GPT2LMHeadModel, c.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **common)),
      # GQA, untied embeddings, non-default rope theta
      "llama": (c.LlamaForCausalLM, c.LlamaConfig(num_key_value_heads=2, rope_theta=500000.0,
                                                  tie_word_embeddings=False, **llama)),
      # tied embeddings, attention biases only, head_dim != hidden/heads, Llama 3.1 rope scaling
      # exercised beyond its original context of 32
      "llama3_bias": (c.LlamaForCausalLM, c.LlamaConfig(
          num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=False,
          tie_word_embeddings=True,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **llama)),
      "mistral_linear": (c.MistralForCausalLM, c.MistralConfig(
          num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False,
          rope_scaling={"rope_type": "linear", "factor": 2.0}, **llama)),
  }


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """name -> (torch model, directory written by save_pretrained with a tokenizer)."""
  tokenizer = _tokenizer()
  out = {}
  for seed, (name, (cls, config)) in enumerate(_hf_configs().items()):
    torch.manual_seed(1000 + seed)  # the constructor's own init draws from torch's global RNG
    model = _perturb(cls(config), seed)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    out[name] = (model, path)
  return out


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _ids(length=48, batch=2, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama3_bias", "mistral_linear"])
def test_imported_logits_match_pytorch(hf, name):
  model, path = hf[name]
  loaded = convert.load_hf(path)
  ids = _ids(length=60)
  ours = np.asarray(jax.jit(loaded.model.apply)({"params": loaded.params}, jnp.asarray(ids)))
  theirs = _torch_logits(model, ids)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs).max() > 0.5  # not a vacuous comparison of near-zero logits


def test_imported_config_maps_every_feature(hf):
  llama = convert.load_hf(hf["llama"][1]).model_config
  assert (llama.num_kv_heads, llama.rope_theta, llama.tie_embeddings, llama.norm_eps) == (2, 5e5, False, 1e-5)
  scaled = convert.load_hf(hf["llama3_bias"][1]).model_config
  assert (scaled.rope_scaling, scaled.rope_scaling_factor, scaled.rope_original_max_len) == ("llama3", 8.0, 32)
  assert scaled.use_bias and scaled.tie_embeddings and scaled.dim_per_head == 32
  # transformers v4 style: top-level rope_theta, rope_scaling with "type", and class defaults left
  # out of config.json (save_pretrained wrote only non-default keys)
  from llmjax.convert import hf_config
  v4 = hf_config.to_llmjax({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                            "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 10,
                            "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert (v4.rope_theta, v4.rope_scaling, v4.rope_scaling_factor) == (5e5, "linear", 2.0)
  assert (v4.norm_eps, v4.max_seq_len, v4.kv_heads, v4.tie_embeddings) == (1e-6, 2048, 4, False)
  gpt2 = convert.load_hf(hf["gpt2"][1]).model_config
  assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.use_bias, gpt2.max_seq_len) == ("learned", "layernorm", "gelu", True, 64)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_matches_transformers(hf, name):
  model, path = hf[name]
  loaded = convert.load_hf(path)
  prompts = _ids(length=8, batch=2, seed=3)
  with torch.no_grad():
    theirs = model.generate(torch.as_tensor(prompts, dtype=torch.long),
                            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                            max_new_tokens=32, do_sample=False, pad_token_id=0)
  theirs = theirs[:, prompts.shape[1]:].numpy().tolist()
  ours = generate(loaded.model, loaded.params, prompts.tolist(), 32, temperature=0.0)
  for b, (mine, ref) in enumerate(zip(ours, theirs)):
    if mine == ref:
      continue
    # Greedy decoding is defined only up to exact ties, which a random model can produce: at the
    # first differing token both candidates must be tied (to fp32 noise) in transformers' logits.
    k = next(i for i, (a, t) in enumerate(zip(mine, ref)) if a != t)
    with torch.no_grad():
      logits = model(torch.as_tensor([prompts[b].tolist() + ref[:k]])).logits[0, -1]
    gap = abs(float(logits[mine[k]] - logits[ref[k]]))
    assert gap < 1e-5, f"sequence {b} differs at token {k} with a logit gap of {gap}"
  assert sum(a == t for a, t in zip(ours, theirs)) >= 1  # at least one exact continuation
  assert len(set(ours[0])) > 1  # a continuation that actually varies


def test_tokenizer_json_matches_transformers(hf, tmp_path):
  path = hf["gpt2"][1]
  theirs = transformers.AutoTokenizer.from_pretrained(path)
  ours = convert.load_hf(path).tokenizer
  text = "First Citizen: speak, speak! Ünïcode too.\n"
  assert ours.kind == "hf" and ours.vocab_size == len(theirs)
  assert ours.encode(text) == theirs(text)["input_ids"]
  assert ours.decode(ours.encode(text)) == text
  assert ours.eos_id == theirs.eos_token_id
  ours.save(tmp_path)  # into a run directory and back
  from llmjax.data import load_tokenizer
  again = load_tokenizer(tmp_path)
  assert again.encode(text) == ours.encode(text) and again.eos_id == ours.eos_id


def test_cli_import_makes_a_run_that_trains_loads_and_generates(hf, tmp_path):
  """hf_import via the CLI; llmjax.main keeps training the imported run (its config through
  experiments/from_run.py, its HF tokenizer on a new text file); load_run and generate accept it."""
  model, path = hf["llama"]
  workdir = tmp_path / "run"
  proc = run_cli(["-m", "llmjax.convert", "hf_import", f"--hf_dir={path}", f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr
  assert "imported llama" in proc.stdout
  from llmjax import runs
  run = runs.load_run(workdir)
  assert run.tokenizer.kind == "hf" and run.step == 0 and run.config.data.tokenizer == "hf"
  _assert_trees_equal(jax.tree.map(np.asarray, run.params), convert.load_hf(path).params)

  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT * 5)
  train = run_cli(["-m", "llmjax.main", f"--config=experiments/from_run.py:{workdir}",
                   f"--workdir={workdir}", f"--config.data.path={corpus}", "--config.data.seq_len=32",
                   "--config.data.batch_size=4", "--config.train.steps=2",
                   "--config.train.eval_every=0", "--config.train.eval_batches=1",
                   "--config.train.sample_tokens=0", "--config.train.progress=False",
                   "--config.train.tensorboard=False"])
  assert train.returncode == 0, train.stderr
  trained = runs.load_run(workdir)
  assert trained.step == 2
  assert not np.array_equal(np.asarray(trained.params["token_embedding"]),
                            np.asarray(run.params["token_embedding"]))
  out = generate(trained.model, trained.params, [trained.tokenizer.encode("First")], 4,
                 temperature=0.0)
  assert len(out[0]) == 4 and isinstance(trained.tokenizer.decode(out[0]), str)

  with pytest.raises(convert.ConversionError, match="already holds checkpoints"):
    convert.import_hf(path, workdir)  # never overwrite a run


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["gpt2", "llama3_bias"])
def test_round_trip_hf_llmjax_hf_llmjax_is_exact(hf, name, tmp_path):
  first = convert.load_hf(hf[name][1])
  convert.save_hf(first.model_config, first.params, tmp_path, tokenizer=first.tokenizer)
  second = convert.load_hf(tmp_path)
  assert second.model_config == first.model_config
  _assert_trees_equal(first.params, second.params)
  assert second.tokenizer.encode(TEXT[:80]) == first.tokenizer.encode(TEXT[:80])
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)  # the exported tokenizer
  assert theirs(TEXT[:80])["input_ids"] == first.tokenizer.encode(TEXT[:80])
  assert theirs.eos_token_id == first.tokenizer.eos_id


def _load_transformers(path, caplog):
  """from_pretrained with its loading report and logs; both must be free of weight warnings."""
  logger = logging.getLogger("transformers")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="transformers"):
    logger.addHandler(caplog.handler)
    try:
      model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
      logger.removeHandler(caplog.handler)
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(key), (key, info[key])
  text = caplog.text.lower()
  for phrase in ("not used", "newly initialized", "missing", "unexpected", "not initialized"):
    assert phrase not in text, caplog.text
  return model.eval()


LLMJAX_MODELS = {
    # (LayerNorm without biases, what shakespeare_char trains, is tested by the next test)
    "gpt2_untied": dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True,
                        tie_embeddings=False, mlp_dim=96),
    "llama_tied": dict(position="rotary", norm="rmsnorm", mlp="swiglu", use_bias=False,
                       tie_embeddings=True, rope_theta=20000.0),
    "llama_bias_scaled": dict(position="rotary", norm="rmsnorm", mlp="swiglu", use_bias=True,
                              num_kv_heads=2, tie_embeddings=False, rope_theta=1234.0,
                              rope_scaling="llama3", rope_scaling_factor=4.0,
                              rope_original_max_len=16, mlp_dim=80),
}


@pytest.mark.parametrize("name", LLMJAX_MODELS)
def test_export_loads_in_transformers_sharded_and_round_trips(name, tmp_path, caplog):
  """llmjax -> HF (sharded) -> transformers gives the same logits with no weight warnings, and
  HF -> llmjax gives back exactly the same parameters."""
  from llmjax.model import TransformerConfig
  import flax.linen as nn
  cfg = TransformerConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, embed_dim=64,
                          max_seq_len=64, norm_eps=1e-5, **LLMJAX_MODELS[name])
  model = Transformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(2)  # random everywhere, so norms and biases carry information
  params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32),
                        nn.meta.unbox(shapes))
  written = convert.save_hf(cfg, params, tmp_path, max_shard_bytes=40_000)
  assert files.INDEX in written and len([w for w in written if w.endswith(".safetensors")]) > 1
  torch_model = _load_transformers(tmp_path, caplog)
  ids = _ids(length=40, seed=5)
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids))),
                             _torch_logits(torch_model, ids), atol=1e-4, rtol=0)
  back = convert.load_hf(tmp_path)  # a sharded directory imports
  assert back.model_config == cfg
  _assert_trees_equal(jax.tree.map(np.asarray, params), back.params)


def test_shakespeare_char_run_exports_to_transformers(tmp_path, caplog):
  """Train the shakespeare_char configuration (shrunk) for a few steps with the CLI, export it
  with the CLI, and compare transformers' logits and tokenizer with llmjax's."""
  workdir, out = tmp_path / "run", tmp_path / "hf"
  train = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                   f"--workdir={workdir}", "--config.model.num_layers=2",
                   "--config.model.embed_dim=64", "--config.train.steps=3",
                   "--config.train.eval_every=0", "--config.train.eval_batches=1",
                   "--config.train.sample_tokens=0", "--config.train.progress=False",
                   "--config.train.tensorboard=False", "--config.optim.warmup_steps=1",
                   # float32 matmuls: the logits below are compared with transformers' at 1e-4
                   "--config.model.matmul_dtype=compute"])
  assert train.returncode == 0, train.stderr
  export = run_cli(["-m", "llmjax.convert", "hf_export", f"--workdir={workdir}", f"--hf_dir={out}"])
  assert export.returncode == 0, export.stderr
  assert (out / files.SINGLE).exists() and (out / "config.json").exists()
  from llmjax import runs
  run = runs.load_run(workdir)
  assert run.step == 3 and not run.model_config.use_bias
  torch_model = _load_transformers(out, caplog)
  text = "To be, or not to be: that is the question.\n"
  ids = np.asarray([run.tokenizer.encode(text)], np.int32)
  np.testing.assert_allclose(np.asarray(jax.jit(run.model.apply)({"params": run.params}, jnp.asarray(ids))),
                             _torch_logits(torch_model, ids), atol=1e-4, rtol=0)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok(text)["input_ids"] == run.tokenizer.encode(text)
  assert hf_tok.decode(run.tokenizer.encode(text)) == text
  # Exporting again over an existing export is refused (never overwrite a user's weights).
  with pytest.raises(convert.ConversionError, match="already holds safetensors"):
    convert.export_hf(workdir, out)


def test_pickle_only_directory_is_refused_with_a_fix(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1,
                                                    "n_head": 2, "n_positions": 8, "vocab_size": 8}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded, ever")
  with pytest.raises(convert.ConversionError, match="pickle.*safe_serialization=True"):
    convert.load_hf(tmp_path)
  proc = run_cli(["-m", "llmjax.convert", "hf_import", f"--hf_dir={tmp_path}",
                  f"--workdir={tmp_path / 'run'}"])
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("llmjax: error:") and "pickle" in lines[0]


@pytest.mark.parametrize("change, message", [
    ({"model_type": "roberta", "architectures": ["RobertaForMaskedLM"]},
     "unsupported.*'roberta'.*RobertaForMaskedLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not implemented"),
    ({"model_type": "mistral", "sliding_window": 64}, "sliding_window=64"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_features_are_refused_by_name(hf, tmp_path, change, message):
  config = json.loads((hf["llama"][1] / "config.json").read_text())
  config.update(change)
  config.pop("rope_parameters", None) if "rope_scaling" in change else None
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.ConversionError, match=message):
    convert.load_hf(tmp_path)


def test_unexpected_or_missing_weights_are_refused(hf, tmp_path):
  from safetensors.numpy import save_file
  from llmjax.convert.files import read_weights
  tensors = read_weights(hf["llama"][1])
  (tmp_path / "config.json").write_text((hf["llama"][1] / "config.json").read_text())
  save_file({**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match="extra.weight.*drop them silently"):
    convert.load_hf(tmp_path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match="layers.1.mlp.up_proj.weight.*missing"):
    convert.load_hf(tmp_path)


def test_export_refuses_models_without_an_hf_twin(tmp_path):
  from llmjax.model import TransformerConfig
  with pytest.raises(convert.ConversionError, match="no Hugging Face architecture"):
    convert.save_hf(TransformerConfig(position="rotary", norm="layernorm"), {}, tmp_path)
  with pytest.raises(convert.ConversionError, match="bidirectional"):
    convert.save_hf(TransformerConfig(causal=False), {}, tmp_path)
  assert not list(tmp_path.iterdir())


def test_import_without_a_tokenizer_is_refused_but_load_hf_works(hf, tmp_path):
  import shutil
  for name in ("config.json", "model.safetensors"):
    shutil.copyfile(hf["gpt2"][1] / name, tmp_path / name)
  assert convert.load_hf(tmp_path).tokenizer is None
  with pytest.raises(convert.ConversionError, match="no tokenizer.json or tokenizer.model"):
    convert.import_hf(tmp_path, tmp_path / "run")


def test_byte_tokenizer_exports_exactly(tmp_path):
  from llmjax.convert import tokenizer_export
  from llmjax.data import ByteTokenizer
  tok = ByteTokenizer()
  tokenizer_export.save(tok, tmp_path)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  text = " two  spaces\nÜnïcode ☃\t"
  assert theirs(text)["input_ids"] == tok.encode(text)
  assert theirs.decode(tok.encode(text)) == text


def test_sentencepiece_tokenizer_model_imports_and_exports(tmp_path, monkeypatch):
  """An HF directory with only tokenizer.model (Llama-2 style) gives a sentencepiece-backed HF
  tokenizer honouring tokenizer_config.json; an llmjax sentencepiece run exports for LlamaTokenizer."""
  import shutil
  from llmjax.convert import tokenizer_export
  from llmjax.data import load_tokenizer
  from llmjax.data.hf_tokenizer import HFTokenizer
  from llmjax.data.tokenizers import train_sentencepiece
  monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
  sp = train_sentencepiece(TEXT, 400)
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  shutil.copyfile(sp.model_file, hf_dir / "tokenizer.model")
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": True, "eos_token": "</s>"}))
  tok = HFTokenizer.from_hf_dir(hf_dir)
  text = "First Citizen: speak, speak!"
  assert tok.backend == "sentencepiece" and tok.eos_id == sp.eos_id
  assert tok.encode(text) == sp.encode(text) + [sp.eos_id]
  assert tok.decode(tok.encode(text)) == text
  tok.save(tmp_path / "run")
  again = load_tokenizer(tmp_path / "run")
  assert again.encode(text) == tok.encode(text) and again.vocab_size == sp.vocab_size

  out = tmp_path / "export"
  out.mkdir()
  with pytest.warns(UserWarning, match="normalization"):
    tokenizer_export.save(sp, out)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert theirs(text)["input_ids"] == sp.encode(text)


def test_bfloat16_import_and_export_keep_the_dtype(hf, tmp_path):
  import ml_dtypes
  loaded = convert.load_hf(hf["llama"][1], param_dtype="bfloat16")
  assert loaded.model_config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {np.dtype(ml_dtypes.bfloat16)}
  convert.save_hf(loaded.model_config, loaded.params, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  _assert_trees_equal(loaded.params, convert.load_hf(tmp_path, param_dtype="bfloat16").params)
  with pytest.raises(convert.ConversionError, match="param_dtype"):
    convert.load_hf(hf["llama"][1], param_dtype="float16")


def test_rope_scaling_config_is_validated():
  from llmjax import config as cfglib
  c = cfglib.default_config()
  c.model.update(position="rotary", rope_scaling="yarn")
  with pytest.raises(cfglib.ConfigError, match="model.rope_scaling='yarn' is not one of"):
    cfglib.validate(c)
  c.model.update(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)
  with pytest.raises(cfglib.ConfigError, match="rope_high_freq_factor > rope_low_freq_factor"):
    cfglib.validate(c)


def test_hub_ids_download_only_safe_files(hf, monkeypatch):
  """No network here: a stand-in snapshot_download checks what llmjax asks the hub for (never
  pickles or code) and serves the local directory; a failed download is one clear error."""
  import huggingface_hub
  calls = []

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None):
    calls.append((repo_id, revision, allow_patterns))
    if repo_id == "org/missing":
      raise OSError("Repository Not Found\nmore detail")
    return str(hf["gpt2"][1])

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  loaded = convert.load_hf("org/tiny-gpt2", revision="main")
  assert loaded.family == "gpt2" and calls[0][:2] == ("org/tiny-gpt2", "main")
  patterns = calls[0][2]
  assert "*.safetensors" in patterns and not any(p.endswith((".bin", ".pt", ".py")) for p in patterns)
  with pytest.raises(convert.ConversionError, match="cannot download org/missing.*Repository Not Found"):
    convert.load_hf("org/missing")
  with pytest.raises(FileNotFoundError, match="not a directory"):
    convert.load_hf("./no/such/dir")


def test_missing_tokenizers_library_says_how_to_install(hf, monkeypatch):
  from llmjax.data import DataError
  from llmjax.data.hf_tokenizer import HFTokenizer
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
  with pytest.raises(DataError, match=r"pip install llmjax\[hf\]"):
    HFTokenizer.from_hf_dir(hf["gpt2"][1])


def test_data_tokenizer_hf_reads_an_hf_or_run_directory(hf, tmp_path):
  from llmjax import config as cfglib
  from llmjax.data import build_tokenizer
  c = cfglib.default_config()
  c.data.tokenizer = "hf"
  with pytest.raises(cfglib.ConfigError, match="data.tokenizer='hf' needs data.tokenizer_path"):
    cfglib.validate(c)
  c.data.tokenizer_path = str(hf["gpt2"][1])
  tok = build_tokenizer(c.data, corpus_text=None)
  assert tok.kind == "hf" and tok.vocab_size == 300
  tok.save(tmp_path)  # an llmjax run directory: its tokenizer.json is llmjax's spec
  c.data.tokenizer_path = str(tmp_path)
  assert build_tokenizer(c.data, corpus_text=None).encode(TEXT[:50]) == tok.encode(TEXT[:50])
  c.data.tokenizer_path = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
    build_tokenizer(c.data, corpus_text=None)


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(hf, tmp_path):
  """The hub's gpt2 checkpoint was saved from GPT2Model: bare names and causal-mask buffers."""
  from safetensors.numpy import save_file
  import shutil
  tensors = files.read_weights(hf["gpt2"][1])
  bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  save_file(bare, str(tmp_path / "model.safetensors"))
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(hf["gpt2"][1] / name, tmp_path / name)
  _assert_trees_equal(convert.load_hf(tmp_path).params, convert.load_hf(hf["gpt2"][1]).params)


def test_tied_checkpoint_that_stores_its_head_is_checked(hf, tmp_path):
  from safetensors.numpy import save_file
  tensors = files.read_weights(hf["llama3_bias"][1])  # tie_word_embeddings=true, no lm_head
  (tmp_path / "config.json").write_text((hf["llama3_bias"][1] / "config.json").read_text())
  embedding = tensors["model.embed_tokens.weight"]
  save_file({**tensors, "lm_head.weight": embedding.copy()}, str(tmp_path / "model.safetensors"))
  _assert_trees_equal(convert.load_hf(tmp_path).params, convert.load_hf(hf["llama3_bias"][1]).params)
  save_file({**tensors, "lm_head.weight": embedding + 1}, str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match="lm_head.weight differs from the embedding"):
    convert.load_hf(tmp_path)
