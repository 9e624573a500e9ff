"""KV-cached decoding equals the full forward pass; samplers; streaming; text; the CLI; a mesh."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import generate as gen
from llmjax.data import CharTokenizer
from llmjax.model import Transformer, TransformerConfig
from llmjax.sampling import Sampler, filter_logits, sample_logits, top_p_mask
from tests.conftest import run_cli

GPT2 = TransformerConfig(vocab_size=61, num_layers=2, num_heads=4, embed_dim=32, max_seq_len=48)
LLAMA = dataclasses.replace(GPT2, position="rotary", norm="rmsnorm", mlp="swiglu", num_kv_heads=2,
                            use_bias=False, tie_embeddings=False, mlp_dim=48)
MQA = dataclasses.replace(LLAMA, num_kv_heads=1)
VARIANTS = {"gpt2": GPT2, "llama_gqa": LLAMA, "mqa": MQA}
PROMPTS = [[5, 9, 2], [7, 1, 33, 4, 8, 19, 3, 11, 40], [12]]  # different lengths in one batch


def init(cfg, seed=0):
  model = Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
  # Sharper-than-init weights, so greedy choices are not decided by float noise.
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)
  return model, params


def full_logits(model, params, ids):
  """Logits of a plain full forward pass over `ids` (padded to the context: the model is causal,
  so padding after the sequence changes nothing before it, and one compiled program serves all)."""
  padded = np.zeros((1, model.cfg.max_seq_len), np.int32)
  padded[0, : len(ids)] = ids
  return np.asarray(_forward(model, params, jnp.asarray(padded))[0, : len(ids)])


_FORWARDS = {}


def _forward(model, params, tokens):
  if model not in _FORWARDS:
    _FORWARDS[model] = jax.jit(lambda p, t: model.apply({"params": p}, t))
  return _FORWARDS[model](params, tokens)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_and_greedy_tokens_equal_full_recompute(name):
  model, params = init(VARIANTS[name])
  n = 12
  out = gen.generate(model, params, PROMPTS, n, temperature=0.0, return_logits=True)
  assert out.logits.shape == (len(PROMPTS), n, model.cfg.vocab_size)
  for b, prompt in enumerate(PROMPTS):
    seq = prompt + out.tokens[b]
    assert len(out.tokens[b]) == n
    ref = full_logits(model, params, seq)
    # Logits at every generated position: the ones each new token was drawn from.
    np.testing.assert_allclose(out.logits[b], ref[len(prompt) - 1: len(seq) - 1], atol=1e-5, rtol=0)
    # Greedy continuation by full recompute, one token at a time.
    ids = list(prompt)
    for _ in range(n):
      ids.append(int(np.argmax(full_logits(model, params, ids)[-1])))
    assert ids[len(prompt):] == out.tokens[b]


@pytest.mark.parametrize("name", ["gpt2", "mqa"])
def test_streaming_equals_on_device_loop(name):
  model, params = init(VARIANTS[name])
  for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)):
    whole = gen.generate(model, params, PROMPTS, 10, **kwargs).tokens
    steps = np.stack(list(gen.stream_tokens(model, params, PROMPTS, 10, **kwargs)), axis=1)
    assert steps.tolist() == whole


def test_top_k_1_and_tiny_temperature_equal_greedy():
  model, params = init(LLAMA)
  greedy = gen.generate(model, params, PROMPTS, 10, temperature=0.0).tokens
  assert gen.generate(model, params, PROMPTS, 10, temperature=1.0, top_k=1, seed=5).tokens == greedy
  assert gen.generate(model, params, PROMPTS, 10, temperature=1e-6, seed=5).tokens == greedy
  sampled = gen.generate(model, params, PROMPTS, 10, temperature=1.0, seed=5).tokens
  assert sampled != greedy  # sampling really samples


def test_same_seed_same_tokens_other_seed_other_tokens():
  model, params = init(GPT2)
  a = gen.generate(model, params, PROMPTS, 16, temperature=1.0, seed=1).tokens
  assert gen.generate(model, params, PROMPTS, 16, temperature=1.0, seed=1).tokens == a
  assert gen.generate(model, params, PROMPTS, 16, temperature=1.0, seed=2).tokens != a


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
  probs = jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]])
  logits = jnp.log(probs)
  # Sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> cumulative 0.4, 0.7, 0.85, 0.95, 1.0
  expect = {0.3: [1], 0.4: [1], 0.5: [1, 3], 0.7: [1, 3], 0.71: [1, 3, 4], 0.9: [1, 3, 4, 2],
            1.0: [0, 1, 2, 3, 4]}
  for p, kept in expect.items():
    mask = np.asarray(top_p_mask(logits, p))[0]
    assert sorted(np.flatnonzero(mask).tolist()) == sorted(kept), p
  # And sampling only ever draws from that set, in proportion to the renormalized mass.
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(lambda k: sample_logits(k, logits, 1.0, 0, 0.75))(keys)[:, 0]
  counts = np.bincount(np.asarray(draws), minlength=5) / len(keys)
  np.testing.assert_allclose(counts, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.03)


def test_top_k_filter_and_sampler_validation():
  logits = jnp.asarray([[1.0, 5.0, 3.0, 4.0]])
  kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, top_k=2)))[0]
  assert kept.tolist() == [False, True, False, True]
  assert np.isfinite(np.asarray(filter_logits(logits, 1.0, top_k=1)))[0].tolist() == [0, 1, 0, 0]
  for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError):
      Sampler(**bad)


def test_eos_stops_each_sequence_and_the_loop():
  model, params = init(GPT2)
  free = gen.generate(model, params, PROMPTS, 12, temperature=0.0).tokens
  eos = free[0][3]
  out = gen.generate(model, params, PROMPTS, 12, temperature=0.0, eos_id=eos).tokens
  for row, ref in zip(out, free):
    cut = ref.index(eos) + 1 if eos in ref else len(ref)
    assert row == ref[:cut]
  streamed = list(gen.stream_tokens(model, params, PROMPTS, 12, temperature=0.0, eos_id=eos))
  assert len(streamed) == max(len(row) for row in out) < 12  # stops once every row has ended


def test_too_long_prompt_is_an_error_or_truncated_from_the_left():
  model, params = init(GPT2)
  long = list(range(1, 45)) * 2
  with pytest.raises(gen.GenerateError, match="context"):
    gen.generate(model, params, [long], 10)
  ids = gen.fit_prompt(long, 48, 10, truncate=True)
  assert ids == long[-39:]
  assert len(gen.generate(model, params, [ids], 10, temperature=0.0).tokens[0]) == 10


class _Tok(CharTokenizer):
  eos_id = None


def test_text_stream_stop_strings_and_eos():
  tok = _Tok(list("abcdefgh!"))
  s = gen.TextStream(tok, stop=["cd"])
  chunks = [s.add(tok.encode(c)[0]) for c in "abxcdef" if c in tok.chars]
  assert "".join(chunks) + s.finish() == "ab" and s.text == "ab" and s.stopped
  s = gen.TextStream(tok, eos_id=tok.encode("!")[0])
  chunks = [s.add(i) for i in tok.encode("hag!bb")]
  assert "".join(chunks) == "hag" and s.stopped


def test_generate_text_respects_stop_strings():
  model, params = init(GPT2)
  tok = _Tok([chr(ord("A") + i) for i in range(61)])
  free = gen.generate_text(model, params, tok, ["ABC"], 15, temperature=0.0)[0]
  assert len(free) == 15
  stop = free[5:7]
  cut = gen.generate_text(model, params, tok, ["ABC"], 15, temperature=0.0, stop=[stop])[0]
  assert cut == free[: free.index(stop)]


MESH_SCRIPT = """
import dataclasses, json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from llmjax import config as cfglib, sharding as shd, generate as gen
from llmjax.model import Transformer, TransformerConfig
cfg = TransformerConfig(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                        max_seq_len=48, position="rotary", norm="rmsnorm", mlp="swiglu")
model = Transformer(cfg)
params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)
prompts = [[5, 9, 2], [7, 1, 33, 4, 8, 19], [12]]
ref = gen.generate(model, params, prompts, 8, temperature=0.0, return_logits=True)
config = cfglib.default_config()
config.mesh.update(data=1, fsdp=2, tensor=2)
mesh = shd.make_mesh(config)
boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
shardings = shd.logical_to_sharding(nn.get_partition_spec(boxed), mesh, shd.DEFAULT_RULES)
sharded = jax.device_put(params, shardings)
out = gen.generate(model, sharded, prompts, 8, temperature=0.0, return_logits=True, mesh=mesh)
streamed = np.stack(list(gen.stream_tokens(model, sharded, prompts, 8, temperature=0.0, mesh=mesh)), 1)
cache = gen.init_cache(model, 4, 16, mesh=mesh)
print(json.dumps(dict(devices=jax.device_count(), same=out.tokens == ref.tokens,
    stream_same=streamed.tolist() == ref.tokens,
    max_diff=float(np.max(np.abs(out.logits - ref.logits))),
    cache_spec=str(jax.tree.leaves(cache)[0].sharding.spec),
    kernel_spec=str(sharded["layers"]["attn"]["query"]["kernel"].sharding.spec))))
"""


def test_decoding_on_a_4_device_mesh_matches_one_device():
  proc = run_cli(["-c", MESH_SCRIPT], devices=4, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4 and result["same"] and result["stream_same"]
  assert result["max_diff"] < 1e-5
  assert "tensor" in result["kernel_spec"] and "fsdp" in result["kernel_spec"]
  # Cache: batch over (data, fsdp), kv heads over tensor, like the training activations.
  assert "tensor" in result["cache_spec"] and "fsdp" in result["cache_spec"]
