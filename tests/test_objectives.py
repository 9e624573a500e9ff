"""The objective interface (llmjax/objectives): registry, causal LM with loss weights, masked LM,
eval sums, frozen parameters, the program built around an objective; model families and the
classification head."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import config as cfglib
from llmjax import evaluate as evallib
from llmjax import objectives
from llmjax import program as programlib
from llmjax import sharding as shd
from llmjax import train as trainlib
from llmjax.model import FAMILIES, Transformer, TransformerConfig, build_model, num_params

CFG = TransformerConfig(vocab_size=29, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=16)


def small_config(**train):
  c = cfglib.default_config()
  c.model.update(num_layers=2, num_heads=2, embed_dim=32, max_seq_len=16)
  c.data.update(seq_len=8, batch_size=4)
  c.train.update(steps=10, **train)
  c.optim.warmup_steps = 1
  return c


def params_for(cfg, shape=(2, 8)):
  return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros(shape, jnp.int32))["params"])


def lm_batch(rows=2, length=8, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def test_registry_lists_landed_objectives_and_validation_uses_it():
  assert {"causal_lm", "masked_lm"} <= set(objectives.names())
  c = small_config(objective="nope")
  with pytest.raises(cfglib.ConfigError, match="train.objective='nope' is not one of causal_lm"):
    cfglib.validate(c)

  @objectives.register("test_only_objective")
  class Custom(objectives.CausalLM):
    pass
  try:
    cfglib.validate(small_config(objective="test_only_objective"))  # the registry is the schema
    assert isinstance(objectives.build(small_config(objective="test_only_objective"), CFG), Custom)
  finally:
    objectives._REGISTRY.pop("test_only_objective")


def test_causal_lm_weights_select_tokens():
  """batch["weights"] makes the loss the weighted mean over exactly the weighted tokens: the loss
  with weights on the first half equals the loss of that half alone, and aux["weight"] counts them."""
  model, params = Transformer(CFG), params_for(CFG)
  obj = objectives.build(small_config(), CFG)
  batch = lm_batch()
  logits = model.apply({"params": params}, batch["inputs"])
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = np.zeros((2, 8), np.float32)
  weights[:, :4] = 1.0
  weights[0, 6] = 2.0
  loss, aux = obj.loss(model, params, dict(batch, weights=jnp.asarray(weights)), jax.random.key(0), True)
  want = float(jnp.sum(per_token * weights) / weights.sum())
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(aux["weight"]) == weights.sum() == 10.0
  # no weights: every token, as before
  plain, aux = obj.loss(model, params, batch, jax.random.key(0), True)
  np.testing.assert_allclose(float(plain), float(per_token.mean()), rtol=1e-6)
  assert float(aux["weight"]) == 16


def test_z_loss_only_in_differentiated_loss():
  model, params = Transformer(CFG), params_for(CFG)
  plain = objectives.build(small_config(), CFG)
  with_z = objectives.build(small_config(z_loss=1e-2), CFG)
  batch = lm_batch()
  l0, a0 = plain.loss(model, params, batch, jax.random.key(0), True)
  l1, a1 = with_z.loss(model, params, batch, jax.random.key(0), True)
  assert float(l1) > float(l0)
  np.testing.assert_allclose(float(a1["loss"]), float(a0["loss"]), rtol=1e-7)


def test_eval_sums_average_exactly_across_batch_splits():
  """evaluate_params sums eval_sums over batches; one batch of 4 rows == two of 2 rows."""
  model, params = Transformer(CFG), params_for(CFG)
  obj = objectives.build(small_config(), CFG)
  step = jax.jit(trainlib.make_eval_step(model, obj, seed=0))
  batch = lm_batch(rows=4, seed=3)
  w = np.ones((4, 8), np.float32)
  w[0, :5] = 0
  batch["weights"] = jnp.asarray(w)

  class Tok:
    kind = "byte"
  whole = evallib.evaluate_params(step, params, lambda i: batch, 1, Tok, 1.0, obj)
  halves = evallib.evaluate_params(
      step, params, lambda i: jax.tree.map(lambda x: x[2 * i:2 * i + 2], batch), 2, Tok, 1.0, obj)
  np.testing.assert_allclose(whole["loss"], halves["loss"], rtol=1e-6)
  assert set(whole) == {"loss", "perplexity", "bpb"}
  np.testing.assert_allclose(whole["perplexity"], np.exp(whole["loss"]), rtol=1e-6)


def test_train_step_takes_the_objective_and_logs_extra_aux():
  """The step reports aux["loss"] and any extra aux entry (not aux["weight"])."""
  class WithExtra(objectives.CausalLM):
    def loss(self, model, params, batch, rng, deterministic):
      loss, aux = super().loss(model, params, batch, rng, deterministic)
      return loss, dict(aux, tokens_trained=aux["weight"])

  model = Transformer(CFG)
  obj = WithExtra(small_config(), CFG)
  opt = optax.sgd(0.1)
  params = params_for(CFG)
  state = trainlib.TrainState.create(0, params, opt.init(params))
  step = jax.jit(trainlib.make_train_step(model, opt, lambda s: 0.1, obj, seed=0,
                                          grad_accum_steps=2))
  batch = lm_batch(rows=4)
  new, metrics = step(state, batch)
  assert "weight" not in metrics
  assert float(metrics["tokens_trained"]) == 16.0  # extra aux: averaged over the micro-batches
  loss, _ = obj.loss(model, params, batch, jax.random.key(0), True)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)


def test_frozen_leaves_get_no_update_and_no_optimizer_state():
  """objective.trainable: the program masks frozen leaves out of the optimizer (no Adam moments)
  and their gradient is zero, so they never move."""
  class HeadOnly(objectives.CausalLM):
    def trainable(self, params):
      return {k: jax.tree.map(lambda _: k == "final_norm", v) for k, v in params.items()}

  objectives.register("test_head_only")(HeadOnly)
  try:
    c = small_config(objective="test_head_only")
    c.optim.weight_decay = 0.0
    mesh = shd.make_mesh(c)
    prog = programlib.build(c, mesh, cfglib.model_config(c, CFG.vocab_size))
    state = prog.init(jax.random.key(0))
    before = jax.device_get(state.params)
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_norm = sum(x.size for x in jax.tree.leaves(before["final_norm"]))
    assert n_opt <= 2 * n_norm + 8  # moments for final_norm only (+ counters)
    with prog.scope():
      for _ in range(2):  # step 0 has lr 0 (warmup)
        state, metrics = prog.train_step(state, shd.put_batch(
            jax.tree.map(np.asarray, lm_batch(rows=4)), mesh))
    after = jax.device_get(state.params)
    for name in before:
      moved = any(not np.array_equal(a, b) for a, b in
                  zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
      assert moved == (name == "final_norm"), name
  finally:
    objectives._REGISTRY.pop("test_head_only")


def test_program_abstract_batch_follows_batch_spec(tmp_path):
  c = small_config()
  prog = programlib.build(c, shd.make_mesh(c), cfglib.model_config(c, CFG.vocab_size))
  assert set(prog.abstract_batch()) == {"inputs", "targets"}
  assert isinstance(prog.objective, objectives.CausalLM)
  c.data.packing = True
  assert set(objectives.build(c, CFG).batch_spec(c)) == {"inputs", "targets", "segment_ids",
                                                         "positions"}
  c.data.path = str(tmp_path / "train.jsonl")
  spec = objectives.build(c, CFG).batch_spec(c)
  assert spec["weights"].dtype == np.float32 and spec["weights"].shape == (4, 8)


def test_build_model_dispatches_on_family():
  assert FAMILIES["decoder"] is Transformer
  assert isinstance(build_model(CFG), Transformer)
  with pytest.raises(ValueError, match="model.family='nope'"):
    build_model(dataclasses.replace(CFG, family="nope"))
  c = small_config()
  c.model.family = "nope"
  with pytest.raises(cfglib.ConfigError, match="model.family='nope' is not one of decoder"):
    cfglib.validate(c)


def test_pooling_functions_pick_the_right_positions():
  """llmjax/model/pooling.py on hand-made hidden states: last / first real token, the mean over
  real tokens only, 'auto' by causality, and no segment ids = the whole row is real."""
  from llmjax.model import pooling
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  seg = jnp.asarray([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], jnp.int32)  # row 1: padding in front
  np.testing.assert_array_equal(pooling.pool_last(x, seg), jnp.stack([x[0, 2], x[1, 4]]))
  np.testing.assert_array_equal(pooling.pool_first(x, seg), jnp.stack([x[0, 0], x[1, 1]]))
  np.testing.assert_allclose(pooling.pool_mean(x, seg),
                             jnp.stack([x[0, :3].mean(0), x[1, 1:].mean(0)]), rtol=1e-6)
  np.testing.assert_array_equal(pooling.pool_last(x, None), x[:, -1])
  np.testing.assert_array_equal(pooling.pool_first(x, None), x[:, 0])
  np.testing.assert_allclose(pooling.pool_mean(x, None), x.mean(1), rtol=1e-6)
  assert pooling.resolve("auto", True) == "last" and pooling.resolve("auto", False) == "first"
  assert pooling.resolve("mean", True) == "mean"
  np.testing.assert_array_equal(pooling.pool_hidden(x, seg, causal=False), pooling.pool_first(x, seg))


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_mean_pooling_classifier_ignores_padding(family):
  """model.pooling=mean: the classifier reads the mean of the final hidden states over real
  tokens, so changing the ids of padding tokens does not move the logits (decoder and encoder)."""
  cfg = dataclasses.replace(CFG, num_labels=3, pooling="mean", family=family,
                            causal=family == "decoder")
  model = build_model(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))["params"])
  tokens = np.asarray([[5, 6, 7, 8, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
  seg = np.asarray([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8], np.int32)
  out = model.apply({"params": params}, tokens, segment_ids=seg)
  other_pad = tokens.copy()
  other_pad[0, 4:] = [9, 3, 11, 2]
  np.testing.assert_allclose(model.apply({"params": params}, other_pad, segment_ids=seg), out,
                             rtol=1e-6, atol=1e-6)
  hidden = model.apply({"params": params}, tokens, segment_ids=seg, return_hidden=True)
  means = jnp.stack([hidden[0, :4].mean(0), hidden[1].mean(0)])
  want = means @ params["classifier"]["kernel"] + params["classifier"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  last = build_model(dataclasses.replace(cfg, pooling="last")).apply({"params": params}, tokens,
                                                                     segment_ids=seg)
  assert not np.allclose(last, out)  # the pooling is what changed


def test_classifier_head_pools_the_last_real_token():
  """num_labels > 0: label logits from the last token with segment id > 0 (causal), so padding
  after it changes nothing; bidirectional models pool the first token. Param count matches."""
  cfg = dataclasses.replace(CFG, num_labels=3)
  model = Transformer(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
  params = nn.meta.unbox(variables["params"])
  assert params["classifier"]["kernel"].shape == (32, 3)
  assert nn.get_partition_spec(variables)["params"]["classifier"]["kernel"] == \
      jax.sharding.PartitionSpec("embed", "labels")
  assert sum(x.size for x in jax.tree.leaves(params)) == num_params(cfg)
  tokens = np.asarray([[5, 6, 7, 8, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
  seg = np.asarray([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8], np.int32)
  out = model.apply({"params": params}, tokens, segment_ids=seg)
  assert out.shape == (2, 3) and out.dtype == jnp.float32
  other_pad = tokens.copy()
  other_pad[0, 4:] = 9
  np.testing.assert_allclose(model.apply({"params": params}, other_pad, segment_ids=seg), out,
                             rtol=1e-6, atol=1e-6)
  # equals the head applied to the hidden state at position 3 of an unpadded row
  hidden = model.apply({"params": params}, tokens[:1, :4], return_hidden=True)
  want = hidden[:, 3] @ params["classifier"]["kernel"] + params["classifier"]["bias"]
  np.testing.assert_allclose(out[:1], want, rtol=1e-5, atol=1e-5)
  bidir = Transformer(dataclasses.replace(cfg, causal=False))
  hidden = bidir.apply({"params": params}, tokens, segment_ids=seg, return_hidden=True)
  want = hidden[:, 0] @ params["classifier"]["kernel"] + params["classifier"]["bias"]
  np.testing.assert_allclose(bidir.apply({"params": params}, tokens, segment_ids=seg), want,
                             rtol=1e-5, atol=1e-5)
