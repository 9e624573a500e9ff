"""llmjax.eval.scoring.Scorer equals plain full forward passes, batched and padded or not."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as cfglib
from llmjax import generate as gen
from llmjax import sharding as shd
from llmjax.data import CharTokenizer
from llmjax.eval.scoring import Scorer, encode_pair
from llmjax.model import Transformer, TransformerConfig

CHARS = "abcdefghijklmnopqrstuvwxyz .,+=0123456789\n"
CFG = TransformerConfig(vocab_size=len(CHARS), num_layers=2, num_heads=2, embed_dim=32,
                        max_seq_len=24)


@pytest.fixture(scope="module")
def scorer():
  model = Transformer(CFG)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
  params = nn.meta.unbox(init(jax.random.key(0)))
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)  # sharper than init
  config = cfglib.default_config()
  mesh = shd.make_mesh(config, devices=jax.devices()[:1])
  # batch_size 3: the requests below fill one batch and a partial one (padding rows)
  return Scorer(model, params, CharTokenizer(CHARS), mesh, shd.logical_rules(config), batch_size=3)


@jax.jit
def _forward(params, tokens):
  return Transformer(CFG).apply({"params": params}, tokens)


def reference_logprobs(scorer, seq):
  """log p(seq[i] | seq[:i]) for i >= 1, from one plain forward pass (padded after the sequence
  to the context: the model is causal, so that changes nothing before it)."""
  padded = np.zeros((1, CFG.max_seq_len), np.int32)
  padded[0, : len(seq) - 1] = seq[:-1]
  logits = _forward(scorer.params, jnp.asarray(padded))[0, : len(seq) - 1]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  return logp[np.arange(len(seq) - 1), seq[1:]], np.argmax(logp, -1) == np.asarray(seq[1:])


def test_loglikelihood_equals_a_full_forward_pass(scorer):
  rng = np.random.default_rng(0)
  requests = [(list(rng.integers(0, CFG.vocab_size, n)), list(rng.integers(0, CFG.vocab_size, m)))
              for n, m in ((5, 3), (1, 1), (10, 7), (0, 4), (3, 2))]
  got = scorer.loglikelihood(requests)
  for (context, continuation), (ll, greedy) in zip(requests, got):
    seq = context + continuation
    logp, argmax = reference_logprobs(scorer, seq)
    scored = len(continuation) if context else len(continuation) - 1
    assert ll == pytest.approx(float(logp[-scored:].sum()), abs=1e-4)
    assert greedy == bool(argmax[-scored:].all())
  # a continuation that is the greedy one is recognized as such
  context = requests[2][0]
  nxt = scorer.tokenizer.encode(scorer.generate([context], 3)[0])
  assert scorer.loglikelihood([(context, nxt)])[0][1] is True


def test_overlong_request_keeps_its_last_context_tokens(scorer):
  seq = list(np.random.default_rng(1).integers(0, CFG.vocab_size, 40))
  before = scorer.counts.truncated_contexts
  (ll, _), = scorer.loglikelihood([(seq[:35], seq[35:])])
  kept = seq[-(CFG.max_seq_len + 1):]
  logp, _ = reference_logprobs(scorer, kept)
  assert ll == pytest.approx(float(logp[-5:].sum()), abs=1e-4)
  assert scorer.counts.truncated_contexts == before + 1


def test_rolling_loglikelihood_windows(scorer):
  rng = np.random.default_rng(2)
  short = list(rng.integers(0, CFG.vocab_size, 10))
  logp, _ = reference_logprobs(scorer, [7] + short)
  total, n = scorer.rolling_loglikelihood(short, prefix=7)
  assert n == 10 and total == pytest.approx(float(logp.sum()), abs=1e-4)
  logp, _ = reference_logprobs(scorer, short)
  total, n = scorer.rolling_loglikelihood(short, prefix=None)  # first token unscored
  assert n == 9 and total == pytest.approx(float(logp.sum()), abs=1e-4)
  # 60 tokens with a context of 24: windows predict tokens 1..24, 25..48, 49..59, each given up to
  # 24 preceding tokens (the last one as many as fit)
  long = list(rng.integers(0, CFG.vocab_size, 60))
  total, n = scorer.rolling_loglikelihood(long, prefix=None)
  want = 0.0
  for a, b in ((1, 25), (25, 49), (49, 60)):
    start = max(0, b - 1 - CFG.max_seq_len)
    lp, _ = reference_logprobs(scorer, long[start:b])
    want += float(lp[-(b - a):].sum())
  assert n == 59 and total == pytest.approx(want, abs=1e-3)


def test_generate_is_batched_greedy_decoding_cut_at_stop_strings(scorer):
  tok = scorer.tokenizer
  prompts = [tok.encode(p) for p in ("abc", "hello there", "1+2=")]
  texts = scorer.generate(prompts, 6)
  direct = gen.generate(scorer.model, scorer.params, prompts, 6, temperature=0.0,
                        mesh=scorer.mesh, rules=scorer.rules)
  assert texts == [tok.decode(ids) for ids in direct.tokens]
  # a stop string cuts the text before it
  first = texts[0]
  stop = first[2:4]
  cut = scorer.generate(prompts[:1], 6, stop=[stop])[0]
  assert cut == first[: first.find(stop)]
  sampled = scorer.generate(prompts, 6, temperature=1.0, seed=3)
  assert sampled == scorer.generate(prompts, 6, temperature=1.0, seed=3)


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
  tok = CharTokenizer(CHARS)
  assert encode_pair(tok, "a b ", "c") == (tok.encode("a b"), tok.encode(" c"))
  assert encode_pair(tok, "", "cd") == ([], tok.encode("cd"))


MESH_SCRIPT = r"""
import json
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from llmjax import config as cfglib, sharding as shd
from llmjax.data import CharTokenizer
from llmjax.eval.scoring import Scorer
from llmjax.model import Transformer, TransformerConfig
chars = "abcdefghijklmnopqrstuvwxyz .,+=0123456789\n"
cfg = TransformerConfig(vocab_size=len(chars), num_layers=2, num_heads=4, embed_dim=32, max_seq_len=24)
model = Transformer(cfg)
boxed = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.key(0))
params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, nn.meta.unbox(boxed))
rng = np.random.default_rng(0)
requests = [(list(rng.integers(0, cfg.vocab_size, n)), list(rng.integers(0, cfg.vocab_size, m)))
            for n, m in ((5, 3), (1, 1), (10, 7), (0, 4), (30, 2))]
prompts = [r[0] or [1] for r in requests]
out = {}
for name, mesh_shape in (("one", None), ("fsdp2_tensor2", dict(data=1, fsdp=2, tensor=2))):
  config = cfglib.default_config()
  if mesh_shape:
    config.mesh.update(**mesh_shape)
    mesh = shd.make_mesh(config)
  else:
    mesh = shd.make_mesh(config, devices=jax.devices()[:1])
  shardings = shd.logical_to_sharding(nn.get_partition_spec(boxed), mesh, shd.logical_rules(config))
  scorer = Scorer(model, jax.device_put(params, shardings), CharTokenizer(chars), mesh,
                  shd.logical_rules(config), batch_size=3)
  out[name] = dict(ll=scorer.loglikelihood(requests), text=scorer.generate(prompts, 5),
                   batch=scorer.batch_size)
print(json.dumps(dict(devices=jax.device_count(), **out)))
"""


@pytest.mark.slow  # a 4-device subprocess: about a minute on a loaded 2-core machine
def test_scores_on_a_device_mesh_equal_one_device():
  """Rows split over fsdp, weights over fsdp x tensor: the same numbers as on one device (the
  batch of 3 is rounded up to 4 rows so it splits evenly)."""
  import json
  from tests.conftest import run_cli
  proc = run_cli(["-c", MESH_SCRIPT], devices=4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["devices"] == 4 and got["fsdp2_tensor2"]["batch"] == 4
  one, mesh = got["one"], got["fsdp2_tensor2"]
  np.testing.assert_allclose([ll for ll, _ in mesh["ll"]], [ll for ll, _ in one["ll"]], atol=1e-4)
  assert [g for _, g in mesh["ll"]] == [g for _, g in one["ll"]]
  assert mesh["text"] == one["text"]
