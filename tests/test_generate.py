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
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
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


N = 12  # new tokens in every test, so the tests share compiled programs


def run(model, params, prompts=PROMPTS, **kwargs):
  return gen.generate(model, params, prompts, N, return_logits=True, **kwargs)


@pytest.mark.parametrize("name", [
    "llama_gqa", pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("mqa", marks=pytest.mark.slow)])
def test_cached_logits_and_greedy_tokens_equal_full_recompute(name):
  model, params = init(VARIANTS[name])
  n = N
  out = run(model, params, temperature=0.0)
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


SAMPLED = dict(temperature=1.0, top_k=20, top_p=0.9)


def test_streaming_equals_on_device_loop():
  model, params = init(LLAMA)
  for kwargs in (dict(temperature=0.0), dict(SAMPLED, seed=3)):
    whole = run(model, params, **kwargs).tokens
    steps = np.stack(list(gen.stream_tokens(model, params, PROMPTS, N, **kwargs)), axis=1)
    assert steps.tolist() == whole


def test_top_k_1_and_tiny_temperature_equal_greedy():
  model, params = init(LLAMA)
  greedy = run(model, params, temperature=0.0).tokens
  assert run(model, params, temperature=1.0, top_k=1, seed=5).tokens == greedy
  assert run(model, params, temperature=1e-6, seed=5).tokens == greedy
  sampled = run(model, params, temperature=1.0, seed=5).tokens
  assert sampled != greedy  # sampling really samples


def test_same_seed_same_tokens_other_seed_other_tokens():
  model, params = init(LLAMA)
  a = run(model, params, **SAMPLED, seed=1).tokens
  assert run(model, params, **SAMPLED, seed=1).tokens == a
  assert run(model, params, **SAMPLED, seed=2).tokens != a


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
  model, params = init(LLAMA)
  free = run(model, params, temperature=0.0).tokens
  eos = free[0][3]
  out = run(model, params, temperature=0.0, eos_id=eos).tokens
  for row, ref in zip(out, free):
    cut = ref.index(eos) + 1 if eos in ref else len(ref)
    assert row == ref[:cut]
  streamed = list(gen.stream_tokens(model, params, PROMPTS, N, temperature=0.0, eos_id=eos))
  assert len(streamed) == max(len(row) for row in out)  # stops once every row has ended
  # A batch whose every row ends early stops the on-device loop early too.
  alone = run(model, params, [PROMPTS[0]] * 3, temperature=0.0, eos_id=eos)
  assert alone.logits.shape[1] == len(alone.tokens[0]) == free[0].index(eos) + 1 < N


def test_fit_prompt_is_an_error_or_truncated_from_the_left():
  long = list(range(1, 45)) * 2
  with pytest.raises(gen.GenerateError, match="truncate_prompt"):
    gen.fit_prompt(long, 48, N)
  ids = gen.fit_prompt(long, 48, N, truncate=True)
  assert ids == long[-(48 - N + 1):]


def window_reference(model, params, prompt, n):
  """Greedy tokens and their logits by direct recomputation: each token from a plain forward pass
  over the sequence's last max_seq_len tokens (nanoGPT's sample.py loop)."""
  ids, logits = list(prompt), []
  for _ in range(n):
    row = full_logits(model, params, ids[-model.cfg.max_seq_len:])[-1]
    logits.append(row)
    ids.append(int(np.argmax(row)))
  return ids[len(prompt):], np.stack(logits)


PAST = 70  # new tokens past the context of 48, from prompts of 3, 9 and 1 tokens


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])  # learned and rotary positions
def test_generation_past_the_context_equals_recomputing_the_window(name):
  model, params = init(VARIANTS[name])
  out = gen.generate(model, params, PROMPTS, PAST, temperature=0.0, return_logits=True)
  assert out.logits.shape == (len(PROMPTS), PAST, model.cfg.vocab_size)
  for b, prompt in enumerate(PROMPTS):
    assert len(out.tokens[b]) == PAST and len(prompt) + PAST > model.cfg.max_seq_len
    tokens, logits = window_reference(model, params, prompt, PAST)
    assert out.tokens[b] == tokens
    np.testing.assert_allclose(out.logits[b], logits, atol=1e-4, rtol=0)


def test_prompt_longer_than_the_context_slides_from_its_last_window():
  model, params = init(LLAMA)
  long = [(7 * i) % 61 for i in range(90)]
  out = gen.generate(model, params, [long, [3]], N, temperature=0.0).tokens
  assert out[0] == window_reference(model, params, long, N)[0]
  # Only the last max_seq_len tokens are ever seen: cropping the prompt changes nothing.
  assert gen.generate(model, params, [long[-48:]], N, temperature=0.0).tokens[0] == out[0]


def test_streaming_and_eos_past_the_context_equal_the_on_device_loop():
  model, params = init(LLAMA)
  whole = gen.generate(model, params, PROMPTS, PAST, **SAMPLED, seed=3).tokens
  steps = np.stack(list(gen.stream_tokens(model, params, PROMPTS, PAST, **SAMPLED, seed=3)), axis=1)
  assert steps.tolist() == whole
  # An end token first drawn in the sliding part (the cache serves the first 40 tokens).
  cached = 48 - max(map(len, PROMPTS)) + 1
  eos = next(t for t in whole[0][cached:] if all(t not in row[:cached] for row in whole))
  out = gen.generate(model, params, PROMPTS, PAST, **SAMPLED, seed=3, eos_id=eos).tokens
  for row, ref in zip(out, whole):
    assert row == (ref[: ref.index(eos) + 1] if eos in ref else ref)
  streamed = list(gen.stream_tokens(model, params, PROMPTS, PAST, **SAMPLED, seed=3, eos_id=eos))
  assert len(streamed) == max(len(row) for row in out)


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
  model, params = init(LLAMA)
  tok = _Tok([chr(ord("A") + i) for i in range(61)])
  free = gen.generate_text(model, params, tok, ["ABC", "DE", "F"], N, temperature=0.0)[0]
  assert len(free) == N
  stop = free[5:7]
  cut = gen.generate_text(model, params, tok, ["ABC", "DE", "F"], N, temperature=0.0, stop=[stop])[0]
  assert cut == free[: free.index(stop)]


MESH_SCRIPT = """
import dataclasses, json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from llmjax import config as cfglib, sharding as shd, generate as gen
from llmjax.model import Transformer, TransformerConfig
cfg = TransformerConfig(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                        max_seq_len=48, position="rotary", norm="rmsnorm", mlp="swiglu")
model = Transformer(cfg)
params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)
prompts = [[5, 9, 2], [7, 1, 33, 4, 8, 19], [12]]
ref = gen.generate(model, params, prompts, 8, temperature=0.0, return_logits=True)
config = cfglib.default_config()
config.mesh.update(data=1, fsdp=2, tensor=2)
mesh = shd.make_mesh(config)
boxed = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
shardings = shd.logical_to_sharding(nn.get_partition_spec(boxed), mesh, shd.logical_rules(config))
sharded = jax.device_put(params, shardings)
out = gen.generate(model, sharded, prompts, 8, temperature=0.0, return_logits=True, mesh=mesh)
streamed = np.stack(list(gen.stream_tokens(model, sharded, prompts, 8, temperature=0.0, mesh=mesh)), 1)
cache = gen.init_cache(model, 4, 16, mesh=mesh)
sampler = gen.Sampler(temperature=0.0)
tokens = jnp.zeros((4,), jnp.int32)
hlo = gen.decode_step.lower(model, gen._placement(mesh, None), sampler.static, gen.decode_params(sharded),
                            cache, tokens, tokens, jax.random.key(0), jnp.int32(1),
                            sampler.dynamic()).as_text()
print(json.dumps(dict(devices=jax.device_count(), same=out.tokens == ref.tokens,
    constraints=hlo.count("sharding_constraint") + hlo.count("@Sharding"),
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
  # The model's activation constraints reach the decode step (flax drops them silently unless
  # the abstract mesh is set while tracing).
  assert result["constraints"] >= 4, result["constraints"]
  assert "tensor" in result["kernel_spec"] and "fsdp" in result["kernel_spec"]
  # Cache: batch over (data, fsdp), kv heads over tensor, like the training activations.
  assert "tensor" in result["cache_spec"] and "fsdp" in result["cache_spec"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run directory (config, char tokenizer, checkpoint) holding a small random model."""
  from llmjax import config as cfglib
  from llmjax import runs
  workdir = tmp_path_factory.mktemp("run")
  config = cfglib.default_config()
  config.model.update(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=48,
                      position="rotary", norm="rmsnorm", mlp="swiglu", use_bias=False)
  tokenizer = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .,!\n"))
  model_cfg = cfglib.model_config(config, tokenizer.vocab_size)
  model, params = init(model_cfg)
  runs.create_run(workdir, config, params, tokenizer)
  return workdir, model, params, tokenizer


def _cli(*args):
  return run_cli(["-m", "llmjax.generate", *args], timeout=300)


def test_cli_print_ids_and_text_match_the_api(run_dir):
  workdir, model, params, tok = run_dir
  prompt = [3, 1, 4, 1, 5]
  proc = _cli(f"--workdir={workdir}", "--prompt_ids=3,1,4,1,5", "--print_ids", "--num_samples=2",
              "--temperature=1.0", "--top_k=8", "--seed=7", "--max_new_tokens=12")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  expect = gen.generate(model, params, [prompt] * 2, 12, temperature=1.0, top_k=8, seed=7).tokens
  assert [[int(x) for x in line.split(",")] for line in lines] == expect
  # Text mode streams the prompt and the same continuation, cut before a stop string.
  greedy = gen.generate(model, params, [tok.encode("abc")], 20, temperature=0.0).tokens[0]
  text = tok.decode(greedy)
  stop = text[8:10]
  proc = _cli(f"--workdir={workdir}", "--prompt=abc", "--temperature=0", "--max_new_tokens=20",
              f"--stop={stop}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout == "abc" + text[: text.index(stop)] + "\n"


def test_cli_errors_are_one_line(run_dir):
  workdir = run_dir[0]
  proc = _cli(f"--workdir={workdir}", "--prompt=" + "ab" * 30, "--max_new_tokens=5")
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("llmjax: error:") and "--truncate_prompt" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  # Truncated to the context of 48, then 60 new tokens: the window slides past the context.
  proc = _cli(f"--workdir={workdir}", "--prompt=" + "ab" * 30, "--max_new_tokens=60",
              "--truncate_prompt", "--print_ids", "--temperature=0", "--quantize=int8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len(proc.stdout.strip().split(",")) == 60


@pytest.mark.slow
def test_cli_rejects_bad_options_in_one_line(run_dir):
  for bad in ("--top_p=0", "--step=99", "--prompt=ABC", "--prompt_ids=1,x", "--num_samples=0"):
    proc = _cli(f"--workdir={run_dir[0]}", bad)
    assert proc.returncode == 2 and proc.stderr.startswith("llmjax: error:"), (bad, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_default_job_sample_has_the_requested_length_past_the_context(tmp_path):
  """The README's first command (experiments/shakespeare_char.py) on tiny shapes: the end-of-training
  sample.txt holds the prompt plus every requested character, 3x the model's context."""
  workdir = tmp_path / "run"
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={workdir}", "--config.model.num_layers=2", "--config.model.embed_dim=32",
                  "--config.model.num_heads=2", "--config.data.seq_len=32",
                  "--config.model.max_seq_len=32", "--config.data.batch_size=6",
                  "--config.train.steps=3", "--config.train.eval_every=3",
                  "--config.train.eval_batches=1", "--config.train.checkpoint_every=3",
                  "--config.train.sample_tokens=96", "--config.train.sample_prompt=ROMEO:",
                  "--config.train.progress=False"], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = (workdir / "sample.txt").read_text(encoding="utf-8")
  assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 96, repr(text)
