"""LoRA adapters: the model side (llmjax/model/lora.py) and LoRA runs (llmjax/adapters.py).

Tiny char-level models on the embedded corpus, trained in process. A base run is trained once per
module; LoRA runs start from it with train.init_from.
"""
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from llmjax import checkpoint as ckpt
from llmjax import experiment
from llmjax import config as cfglib
from llmjax import loop, quantize, runs, sharding as shd
from llmjax import program as programlib
from llmjax.generate import generate
from llmjax.model import Transformer, TransformerConfig
from llmjax.model import lora as loralib

_exp = experiment.load_module("shakespeare_char")


def tiny(**fields):
  """shakespeare_char shrunk to seconds; fields: {'section.name': value}."""
  c = _exp.get_config()
  c.model.update(num_layers=2, embed_dim=32, num_heads=2, max_seq_len=32, vocab_size=128)
  c.data.update(seq_len=32, batch_size=8)
  c.train.update(steps=6, grad_accum_steps=1, log_every=1, eval_every=0, eval_batches=2,
                 sample_tokens=0, progress=False, tensorboard=False, peak_flops=1e12,
                 checkpoint_every=3)
  c.optim.update(warmup_steps=1, lr=1e-2)
  for key, value in fields.items():
    section, name = key.split(".")
    c[section][name] = value
  cfglib.validate(c)
  return c


LORA = {"lora.rank": 4, "lora.targets": "attn,mlp"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("base")
  loop.train(tiny(), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora")
  loop.train(tiny(**LORA, **{"train.init_from": base_run}), str(workdir))
  return str(workdir)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# -------------------------------------------------------------------------------- the model
LLAMA = TransformerConfig(vocab_size=61, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                          max_seq_len=32, position="rotary", norm="rmsnorm", mlp="swiglu",
                          use_bias=False, tie_embeddings=False)


def _init(cfg, spec, seed=0):
  model = loralib.with_lora(Transformer(cfg), spec)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))["params"]
  return model, params


def _perturbed(params, seed=1):
  adapter, base = loralib.split(params)
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return loralib.combine(base, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize("scan", [True, False])
def test_untrained_adapter_is_the_base_model_exactly(scan):
  cfg = TransformerConfig(**{**LLAMA.to_dict(), "scan_layers": scan})
  spec = loralib.make_spec(cfg, 4, 8.0, "attn,mlp,lm_head")
  model, params = _init(cfg, spec)
  adapter, base = loralib.split(params)
  # every targeted layer has A (random, PEFT's uniform bound 1/sqrt(fan_in)) and B (zero)
  assert set(adapter["layers"]["attn"]) == {"query", "key", "value", "out"}
  assert set(adapter["layers"]["mlp"]) == {"gate", "up", "proj"} and "lm_head" in adapter
  a = np.asarray(adapter["layers"]["attn"]["query"]["lora_a"])
  assert a.shape == (2, 32, 4) and 0 < np.abs(a).max() <= 32 ** -0.5
  assert not any(np.any(np.asarray(b)) for b in jax.tree.leaves(
      jax.tree.map(lambda x: x, {k: v for k, v in _by_name(adapter, "lora_b").items()})))
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
  plain = Transformer(cfg).apply({"params": base}, tokens)
  np.testing.assert_array_equal(model.apply({"params": params}, tokens), plain)
  # decoding (per-layer weights, KV cache) too
  prompts = [[1, 2, 3], [4, 5]]
  assert generate(model, params, prompts, 6, temperature=0.0) == \
      generate(Transformer(cfg), base, prompts, 6, temperature=0.0)


def _by_name(tree, name, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_by_name(v, name, f"{prefix}{k}/"))
    elif k == name:
      out[prefix + k] = v
  return out


def test_adapter_logical_axes_scanned_unrolled_merged_and_switched_off():
  spec = loralib.make_spec(LLAMA, 4, 8.0, "all")
  model, params = _init(LLAMA, spec)
  boxed = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  names = nn.get_partition_spec(boxed)
  assert tuple(names["layers"]["attn"]["query"]["lora_a"]) == ("layers", "embed", "lora_rank")
  assert tuple(names["layers"]["attn"]["out"]["lora_a"]) == ("layers", "heads", "kv", "lora_rank")
  assert tuple(names["layers"]["attn"]["key"]["lora_b"]) == ("layers", "lora_rank", "kv_heads", "kv")
  params = _perturbed(params)
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, LLAMA.vocab_size)
  scanned = model.apply({"params": params}, tokens)
  unrolled_cfg = TransformerConfig(**{**LLAMA.to_dict(), "scan_layers": False})
  unrolled = loralib.with_lora(Transformer(unrolled_cfg), spec).apply({"params": params}, tokens)
  np.testing.assert_allclose(unrolled, scanned, atol=1e-5)
  base = loralib.split(params)[1]
  plain = Transformer(LLAMA).apply({"params": base}, tokens)
  assert np.abs(scanned - plain).max() > 1e-2  # the adapters matter
  np.testing.assert_array_equal(model.apply({"params": params}, tokens, adapters=False), plain)
  merged = loralib.merge(params, spec)
  assert "lora_a" not in merged["layers"]["attn"]["query"]
  np.testing.assert_allclose(Transformer(LLAMA).apply({"params": merged}, tokens), scanned,
                             atol=2e-5)
  # unmerged (adapters applied while decoding) and merged give the same tokens
  prompts = [[1, 2, 3, 4], [5, 6]]
  assert generate(model, params, prompts, 12, temperature=0.0) == \
      generate(Transformer(LLAMA), merged, prompts, 12, temperature=0.0)


def test_adapter_dropout_only_in_training():
  spec = loralib.make_spec(LLAMA, 4, 8.0, "query", dropout=0.5)
  model, params = _init(LLAMA, spec)
  params = _perturbed(params)
  tokens = jnp.ones((1, 8), jnp.int32)
  a = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)})
  b = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert np.abs(a - b).max() > 0
  np.testing.assert_array_equal(model.apply({"params": params}, tokens),
                                model.apply({"params": params}, tokens))


@pytest.mark.parametrize("cfg,rank,targets,message", [
    (TransformerConfig(mlp="gelu"), 4, "gate", "names 'gate', which names no layer"),
    (TransformerConfig(tie_embeddings=True), 4, "lm_head", "tied to the token embedding"),
    (TransformerConfig(), 4, "qurey", "names 'qurey'"),
    (TransformerConfig(), 0, "query", "lora.rank=0 must be positive"),
    (TransformerConfig(embed_dim=32, num_heads=4), 33, "query", "larger than the query layer"),
    (TransformerConfig(family="encoder_decoder"), 4, "embedding", "keeps its own token tables"),
])
def test_bad_lora_settings_name_the_fix(cfg, rank, targets, message):
  with pytest.raises(loralib.LoraError, match=message):
    loralib.make_spec(cfg, rank, 8.0, targets)


def test_bad_lora_config_is_one_line_exit_2(tmp_path):
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={tmp_path / 'x'}", "--config.lora.rank=4",
                  "--config.lora.targets=query,gate", "--config.train.steps=1"])
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "lora.targets names 'gate'" in lines[0], proc.stderr


def test_adapter_gradients_follow_the_merged_weight():
  """The adapters' gradients are the chain rule through W' = W + s A B: dL/dB = s A^T dL/dW' and
  dL/dA = s dL/dW' B^T for every targeted kernel (stacked layers included), and for the token
  table dL/dA = s dL/dE' B^T (E' the adapted table, which a tied head reads too)."""
  cfg = TransformerConfig(**{**LLAMA.to_dict(), "tie_embeddings": True})
  spec = loralib.make_spec(cfg, 4, 8.0, "all,embedding")
  model, params = _init(cfg, spec)
  params = _perturbed(params)
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, cfg.vocab_size)

  def loss(logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], -1))
  # jitted: one compilation instead of one per eager op of the scanned backward (empty-cache CI)
  g_lora = jax.jit(jax.grad(lambda p: loss(model.apply({"params": p}, tokens))))(params)
  merged = loralib.merge(params, spec)
  g_plain = jax.jit(jax.grad(lambda p: loss(Transformer(cfg).apply({"params": p}, tokens))))(merged)
  checked = 0
  for key, a in _by_name(params, "lora_a").items():
    where = key.rsplit("/", 2)[0]
    b = _by_name(params, "lora_b")[key.replace("lora_a", "lora_b")]
    ga = _by_name(g_lora, "lora_a")[key]
    gb = _by_name(g_lora, "lora_b")[key.replace("lora_a", "lora_b")]
    if where == loralib.EMBEDDING_ADAPTER:
      gw, lead = g_plain["token_embedding"], ()
    else:
      gw = _by_name(g_plain, "kernel")[key.replace("lora_a", "kernel")]
      lead = a.shape[:1]  # this config stacks layers: every adapter has the 'layers' axis
    a2, b2 = a.reshape(*lead, -1, 4), b.reshape(*lead, 4, -1)
    gw2 = gw.reshape(*lead, a2.shape[-2], b2.shape[-1])
    np.testing.assert_allclose(gb.reshape(b2.shape), spec.scale * jnp.einsum("...ir,...io->...ro", a2, gw2),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ga.reshape(a2.shape), spec.scale * jnp.einsum("...io,...ro->...ir", gw2, b2),
                               rtol=1e-4, atol=1e-6)
    checked += 1
  assert checked == 8  # query, key, value, out, gate, up, down and the token table


def test_token_embedding_adapter_feeds_input_and_tied_head():
  """lora.targets 'embedding': the token table becomes E + scale A B (A [vocab, r] at zero, B
  random, as PEFT initializes embedding adapters); with tied embeddings the output head reads
  the same adapted table, and merging folds the adapter into the one table."""
  cfg = TransformerConfig(**{**LLAMA.to_dict(), "tie_embeddings": True})
  spec = loralib.make_spec(cfg, 4, 8.0, "query,value,embedding")
  assert spec.targets == ("query", "value", "embedding")
  model, params = _init(cfg, spec)
  adapter, base = loralib.split(params)
  table = adapter[loralib.EMBEDDING_ADAPTER]
  assert table["lora_a"].shape == (61, 4) and not np.any(np.asarray(table["lora_a"]))
  assert table["lora_b"].shape == (4, 32) and np.all(np.asarray(table["lora_b"]) != 0)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
  plain = Transformer(cfg).apply({"params": base}, tokens)
  np.testing.assert_array_equal(model.apply({"params": params}, tokens), plain)
  moved = _perturbed(params)
  merged = loralib.merge(moved, spec)
  assert set(merged) == set(base)  # the table's adapter is folded in, not left behind
  got = model.apply({"params": moved}, tokens)
  assert np.abs(got - plain).max() > 1e-2
  np.testing.assert_allclose(got, Transformer(cfg).apply({"params": merged}, tokens), atol=2e-5)
  np.testing.assert_array_equal(model.apply({"params": moved}, tokens, adapters=False), plain)
  # the output side: the logits are the final hidden states against the adapted table
  hidden = model.apply({"params": moved}, tokens, return_hidden=True)
  want = jnp.einsum("btd,vd->btv", hidden, merged["token_embedding"])
  np.testing.assert_allclose(got, want, atol=2e-5)
  prompts = [[1, 2, 3], [4, 5]]
  assert generate(model, moved, prompts, 6, temperature=0.0) == \
      generate(Transformer(cfg), merged, prompts, 6, temperature=0.0)


# -------------------------------------------------------------------------------- LoRA runs
def test_lora_run_trains_adapters_only(base_run, lora_run):
  base = runs.load_run(base_run)
  tuned = runs.load_run(lora_run)
  adapter, frozen = loralib.split(tuned.params)
  # the base is bit-for-bit the base run's weights; the adapters moved (B left zero)
  for got, want in zip(_leaves(frozen), _leaves(base.params)):
    np.testing.assert_array_equal(got, want)
  assert all(np.any(b) for b in _leaves(_by_name(adapter, "lora_b")))
  # the checkpoint holds the adapters only, and names its base
  checkpointer = ckpt.Checkpointer(lora_run, read_only=True)
  try:
    saved = checkpointer.restore_numpy()
    meta = checkpointer.read_meta()
  finally:
    checkpointer.close()
  leaf_names = {str(p[-1]) for p, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
  assert leaf_names == {"['lora_a']", "['lora_b']"}
  assert meta["lora_base"]["step"] == base.step and meta["lora"]["rank"] == 4
  saved_bytes = sum(x.nbytes for x in jax.tree.leaves(saved))
  full_bytes = sum(x.nbytes for x in jax.tree.leaves(ckpt.Checkpointer(base_run, read_only=True)
                                                     .restore_numpy()))
  assert saved_bytes < 0.5 * full_bytes
  # the logged metrics
  lines = [json.loads(x) for x in open(f"{lora_run}/metrics.jsonl")]
  assert [x["step"] for x in lines if "loss" in x and "grad_norm" in x] == list(range(1, 7))


def test_frozen_base_has_no_optimizer_state(base_run):
  config = tiny(**LORA)
  mesh = shd.make_mesh(config)
  lora_prog = programlib.build(config, mesh, cfglib.model_config(config, 103))
  full_prog = programlib.build(tiny(), mesh, cfglib.model_config(tiny(), 103))
  lora_opt = shd.bytes_per_device(lora_prog.abstract_state.opt_state)
  full_opt = shd.bytes_per_device(full_prog.abstract_state.opt_state)
  adapter_bytes = sum(x.size * 4 for x in jax.tree.leaves(
      loralib.split(lora_prog.abstract_state.params)[0]))
  # Adam: two moments of the adapters (plus a few scalar counts), nothing for the base
  assert 2 * adapter_bytes <= lora_opt <= 2 * adapter_bytes + 64
  assert lora_opt < full_opt / 4


def test_lora_resumes_bit_for_bit(base_run, lora_run, tmp_path):
  again = tmp_path / "again"
  shutil.copytree(lora_run, again)
  shutil.rmtree(again / "checkpoints" / "6")
  loop.train(tiny(**LORA, **{"train.init_from": base_run}), str(again))
  for a, b in zip(_leaves(runs.load_run(lora_run).params), _leaves(runs.load_run(again).params)):
    np.testing.assert_array_equal(a, b)


def _one_step(config, params, batch):
  program = programlib.build(config, shd.make_mesh(config), cfglib.model_config(config, 103))
  state = program.state_from_params(params)
  with program.scope():
    new, metrics = program.train_step(state, jax.device_put(batch, program.batch_sharding))
  return jax.device_get(new), jax.device_get(metrics)


def test_grad_accumulation_and_nonfinite_guard(lora_run, base_run):
  params = runs.load_run(lora_run).params
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 103, (8, 33)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  one, m1 = _one_step(tiny(**LORA), params, batch)
  two, m2 = _one_step(tiny(**LORA, **{"train.grad_accum_steps": 2}), params, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  for a, b in zip(_leaves(one.params), _leaves(two.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  bad, m3 = _one_step(tiny(**LORA, **{"train.inject_nan_grads": "1",
                                      "train.nonfinite_policy": "skip"}), params, batch)
  assert int(m3["nonfinite_skipped"]) == 1
  for a, b in zip(_leaves(bad.params), _leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_lora_plus_trains_b_at_lr_ratio_times_the_rate(lora_run):
  """lora.lr_ratio (LoRA+): one step moves B lr_ratio times as far as plain LoRA does and A
  exactly as far; the optimizer state is unchanged in size."""
  params = runs.load_run(lora_run).params
  tokens = np.random.default_rng(0).integers(0, 103, (8, 33)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  steady = {"optim.warmup_steps": 0}  # (a warmup's first step has learning rate 0)
  plain, _ = _one_step(tiny(**LORA, **steady), params, batch)
  plus, _ = _one_step(tiny(**LORA, **steady, **{"lora.lr_ratio": 4.0}), params, batch)
  start = loralib.split(params)[0]
  for name, ratio in (("lora_a", 1.0), ("lora_b", 4.0)):
    for key, p0 in _by_name(start, name).items():
      d_plain = np.asarray(_by_name(loralib.split(plain.params)[0], name)[key]) - np.asarray(p0)
      d_plus = np.asarray(_by_name(loralib.split(plus.params)[0], name)[key]) - np.asarray(p0)
      assert np.abs(d_plain).max() > 0
      np.testing.assert_allclose(d_plus, ratio * d_plain, rtol=1e-4, atol=1e-7)
  with pytest.raises(cfglib.ConfigError, match="lora.lr_ratio=0.0 must be positive"):
    tiny(**LORA, **{"lora.lr_ratio": 0.0})


def test_token_embedding_adapter_run(base_run, tmp_path):
  """A run with the token table adapted: only adapters (the table's included) move, the run
  reloads, and the PEFT export refuses it with the fix (merged export) named."""
  from llmjax.convert import peft
  from llmjax.convert.hf_config import ConversionError
  workdir = str(tmp_path / "emb")
  loop.train(tiny(**{"lora.rank": 4, "lora.targets": "query,value,embedding",
                     "train.init_from": base_run}), workdir)
  tuned, base = runs.load_run(workdir), runs.load_run(base_run)
  adapter, frozen = loralib.split(tuned.params)
  assert np.any(np.asarray(adapter[loralib.EMBEDDING_ADAPTER]["lora_a"]))
  for got, want in zip(_leaves(frozen), _leaves(base.params)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ConversionError, match="export merged weights with --merge"):
    peft.adapter_to_peft("gpt2", adapter, tuned.model.lora, tuned.model_config)


def test_qlora_int8_base(base_run, tmp_path):
  workdir = str(tmp_path / "qlora")
  loop.train(tiny(**LORA, **{"train.init_from": base_run, "lora.base_dtype": "int8"}), workdir)
  tuned = runs.load_run(workdir)
  adapter, frozen = loralib.split(tuned.params)
  kernel = frozen["layers"]["attn"]["query"]["kernel"]
  assert isinstance(kernel, quantize.QArray) and kernel.values.dtype == jnp.int8
  assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(adapter))
  float_base = loralib.split(runs.load_run(base_run).params)[1]
  matrices = lambda tree: [x for p, x in jax.tree_util.tree_flatten_with_path(  # noqa: E731
      tree, is_leaf=lambda x: isinstance(x, quantize.QArray))[0]
      if "kernel" in str(p) or "token_embedding" in str(p)]
  ratio = sum(x.nbytes for x in matrices(frozen)) / sum(x.nbytes for x in matrices(float_base))
  assert ratio <= 0.30, ratio
  # the adapters trained on the int8 base; merging dequantizes into float32
  merged = loralib.merge(tuned.params, tuned.model.lora)
  assert merged["layers"]["attn"]["query"]["kernel"].dtype == jnp.float32


def test_several_adapters_swap_on_one_base(base_run, lora_run, tmp_path):
  other = str(tmp_path / "other")
  loop.train(tiny(**{"lora.rank": 2, "lora.targets": "query,value", "train.init_from": base_run,
                     "train.seed": 5}), other)
  first, second = runs.load_run(lora_run), runs.load_run(other)
  base = loralib.split(runs.load_run(base_run).params)[1]
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 103, (2, 16)), jnp.int32)
  for run in (first, second):
    adapter = loralib.split(run.params)[0]
    swapped = loralib.combine(base, adapter)
    # the loaded base arrays are used as they are: nothing is copied or reloaded
    assert swapped["layers"]["attn"]["query"]["kernel"] is base["layers"]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(run.model.apply({"params": swapped}, tokens),
                                  run.model.apply({"params": run.params}, tokens))
  a = first.model.apply({"params": first.params}, tokens)
  b = second.model.apply({"params": second.params}, tokens)
  assert np.abs(a - b).max() > 1e-4


def test_generate_cli_applies_the_adapter(lora_run):
  tuned = runs.load_run(lora_run)
  prompt = tuned.tokenizer.encode("The ")
  merged = loralib.merge(tuned.params, tuned.model.lora)
  want = generate(Transformer(tuned.model_config), merged, [prompt], 12, temperature=0.0)[0]
  assert want == generate(tuned.model, tuned.params, [prompt], 12, temperature=0.0)[0]
  proc = run_cli(["-m", "llmjax.generate", f"--workdir={lora_run}", "--prompt=The ",
                  "--max_new_tokens=12", "--temperature=0"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert tuned.tokenizer.decode(want) in proc.stdout


def test_adapter_export_errors_are_one_line(base_run, tmp_path):
  proc = run_cli(["-m", "llmjax.convert", "hf_export", f"--workdir={base_run}",
                  f"--hf_dir={tmp_path / 'out'}", "--adapter"])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"llmjax: error: {base_run} was not trained with LoRA (lora.rank=0), so it has no adapter; "
      "export its full weights without --adapter"]


@pytest.mark.slow
def test_lora_trains_alike_on_every_mesh(tmp_path):
  """5 LoRA steps on the fake 8-device layouts (tests/lora_spmd_driver.py) give one device's
  losses and adapters; the base never moves."""
  from test_sharding import FAST_XLA
  out = str(tmp_path / "run.npz")
  proc = run_cli(["tests/lora_spmd_driver.py", out], timeout=1200, env_extra={
      "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_XLA}"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.load(open(out + ".json"))
  arrays = dict(np.load(out))
  ref = np.array(info["losses"]["single"])
  for layout in ("data8", "fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2"):
    np.testing.assert_allclose(info["losses"][layout], ref, rtol=1e-5, atol=0)
    for key, value in arrays.items():
      if key.startswith(f"{layout}/"):
        # Adam divides by sqrt(v): a near-zero gradient's reduction-order noise (other meshes sum
        # in another order) becomes an update difference of ~1e-5 after 5 steps at lr 3e-3
        np.testing.assert_allclose(value, arrays["single/" + key.split("/", 1)[1]], atol=1e-4)
  moved = [k for k in arrays if k.startswith("single/") and
           np.abs(arrays[k] - arrays["init_" + k]).max() > 0]
  assert moved and all("lora_" in k for k in moved), moved
