"""Encoder-decoder models, seq2seq data and objectives, span corruption, decoding and beam search.

HF parity of T5 lives in tests/test_t5.py; here the native family (learned / sinusoidal / relative
positions, shared or separate embeddings) is checked for internal consistency: parameter counts,
scanned == unrolled, packed pairs == pairs alone, cached decoding == recomputation, and the data
and objective plumbing through `python -m llmjax.main` / `llmjax.generate`.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from llmjax import beam_search, seq2seq_decode
from llmjax import config as cfglib
from llmjax.data import DataError
from llmjax.data import seq2seq as s2s
from llmjax.model import TransformerConfig, build_model, num_params
from llmjax.model import encoder_decoder as ed
from llmjax.model.layers import relative_position_bucket


def _cfg(**kw):
  base = dict(family="encoder_decoder", vocab_size=40, num_layers=2, encoder_layers=1, num_heads=4,
              embed_dim=32, mlp_dim=48, max_seq_len=32, position="learned", norm="rmsnorm",
              use_bias=False)
  base.update(kw)
  return TransformerConfig(**base)


def _init(cfg, src_len=12, tgt_len=10, seed=0):
  model = build_model(cfg)
  # jitted: initializing op by op costs 2-3x more than compiling the init once
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((2, src_len), jnp.int32),
                               jnp.zeros((2, tgt_len), jnp.int32))["params"]
  return model, nn.meta.unbox(params)


VARIANTS = [dict(position="learned"), dict(position="sinusoidal", share_embeddings=False),
            dict(position="relative", tie_embeddings=False, mlp="geglu"),
            dict(position="relative", scale_attention=False, scale_decoder_outputs=True, mlp="relu",
                 num_kv_heads=2)]


@pytest.mark.parametrize("kw", VARIANTS)
def test_param_count_and_logical_axes(kw):
  cfg = _cfg(**kw)
  boxed = jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                         jnp.zeros((1, 4), jnp.int32))["params"]  # shapes and names only
  leaves = jax.tree.leaves(boxed, is_leaf=lambda b: hasattr(b, "names"))
  assert all(hasattr(b, "names") for b in leaves)  # every parameter has logical axis names
  assert sum(b.value.size for b in leaves) == num_params(cfg)


@pytest.mark.parametrize("kw", VARIANTS[1:3])
def test_scanned_and_unrolled_layers_agree(kw):
  model, params = _init(_cfg(**kw))
  unrolled = build_model(_cfg(scan_layers=False, **kw))
  src = jax.random.randint(jax.random.key(1), (2, 12), 0, 40)
  tgt = jax.random.randint(jax.random.key(2), (2, 10), 0, 40)
  a = model.apply({"params": params}, src, tgt)
  b = unrolled.apply({"params": params}, src, tgt)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("kw", VARIANTS[::3])
def test_packed_pairs_see_only_their_own_segment(kw):
  """Two pairs packed into one row give the logits each pair gives alone (both sides packed)."""
  model, params = _init(_cfg(**kw))
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(1, 40, 5).tolist(), rng.integers(1, 40, 4).tolist()),
           (rng.integers(1, 40, 6).tolist(), rng.integers(1, 40, 5).tolist())]
  packed = s2s.pack(pairs, 12, 10, True, 0)
  assert len(packed["inputs"]) == 1
  assert packed["encoder_segment_ids"][0].tolist() == [1] * 5 + [2] * 6 + [0]
  together = model.apply({"params": params}, packed["encoder_inputs"], packed["inputs"],
                         packed["encoder_positions"], packed["positions"],
                         packed["encoder_segment_ids"], packed["segment_ids"])
  single = s2s.pack(pairs, 12, 10, False, 0)
  alone = model.apply({"params": params}, single["encoder_inputs"], single["inputs"],
                      single["encoder_positions"], single["positions"],
                      single["encoder_segment_ids"], single["segment_ids"])
  np.testing.assert_allclose(np.asarray(together[0, :4]), np.asarray(alone[0, :4]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(together[0, 4:9]), np.asarray(alone[1, :5]), atol=1e-5)
  assert (packed["inputs"][0, :4].tolist() == [0] + pairs[0][1][:3])  # decoder start + shifted


@pytest.mark.parametrize("kw", VARIANTS[:2])
def test_cached_decoding_equals_recomputation(kw):
  model, params = _init(_cfg(init_std=0.5, **kw), seed=3)  # wide init: varied outputs
  sources = [[3, 4, 5, 6, 1], [7, 8, 1], [9, 10, 11, 12, 13, 14, 1]]
  cached = seq2seq_decode.generate(model, params, sources, 12, temperature=0.0)
  assert cached == seq2seq_decode.recompute_generate(model, params, sources, 12)
  assert len({t for row in cached for t in row}) > 1  # not one repeated token
  # beam search with one beam is greedy
  batch = seq2seq_decode._prepare(model, sources, 12)
  best, _, lengths = seq2seq_decode._beams_on_device(
      model, batch.cache_len, 12, beam_search.BeamConfig(1), params, batch.tokens,
      batch.segment_ids, jnp.int32(-1))
  assert np.asarray(best).tolist() == cached


def test_sampling_is_seeded():
  model, params = _init(_cfg(), seed=4)
  sources = [[3, 4, 5, 1]] * 3
  a = seq2seq_decode.generate(model, params, sources, 8, temperature=1.0, seed=7)
  assert a == seq2seq_decode.generate(model, params, sources, 8, temperature=1.0, seed=7)
  assert len({tuple(r) for r in a}) > 1  # rows draw different tokens


def test_relative_buckets():
  # (sinusoidal positions, shared with decoders and encoders: tests/test_encoder.py)
  rel = jnp.arange(-200, 201)
  both = np.asarray(relative_position_bucket(rel, True, 32, 128))
  causal = np.asarray(relative_position_bucket(rel, False, 32, 128))
  assert both.min() == 0 and both.max() == 31 and causal.max() == 31
  assert (causal[rel > 0] == 0).all()                        # the future is one bucket
  assert both[200] == 0 and both[201] == 17 and both[199] == 1   # exact near 0, sign split


# -- beam search --------------------------------------------------------------------------------
def test_decoder_only_beam_search_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from llmjax import convert
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # a spread of weights that makes the continuations vary
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.3)
  model.save_pretrained(str(tmp_path))
  hf = convert.load_hf(tmp_path)
  prompts = [[5, 6, 7], [11, 3, 42, 8, 9]]
  found_difference = False
  for eos_id in (2, 17):
    ours = beam_search.generate_beams(hf.model, hf.params, prompts, 10, num_beams=4, eos_id=eos_id)
    for prompt, row in zip(prompts, ours):
      with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, num_beams=4,
                             do_sample=False, eos_token_id=eos_id, pad_token_id=0)[0].tolist()
      ref = ref[len(prompt):]
      assert row == ref[: len(row)] and all(t == 0 for t in ref[len(row):]), (row, ref)
      with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                eos_token_id=eos_id, pad_token_id=0)[0].tolist()[len(prompt):]
      found_difference |= greedy[: len(row)] != row
  assert found_difference


def test_num_beams_below_one_refused():
  model = build_model(_cfg())
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 12), jnp.int32),
                          jnp.zeros((2, 10), jnp.int32))["params"]  # refused before any compute
  with pytest.raises(ValueError, match="num_beams=0"):
    seq2seq_decode.generate(model, params, [[3, 1]], 4, num_beams=0)
  with pytest.raises(beam_search.BeamSearchError, match="num_beams=0"):
    beam_search.BeamConfig(0)


# -- span corruption ----------------------------------------------------------------------------
def test_span_corruption_statistics_and_reconstruction():
  rng = np.random.default_rng(0)
  sentinels = list(range(999, 899, -1))
  hidden = total = spans = 0
  for i in range(400):
    tokens = rng.integers(0, 500, 100)
    src, tgt = s2s.span_corrupt(tokens, np.random.default_rng(i), sentinels, 0.15, 3.0, eos_id=1)
    assert src[-1] == 1 and tgt[-1] == 1
    used = [t for t in src if t in sentinels]
    assert used == sentinels[: len(used)]                  # sentinels in order
    # putting the hidden spans back gives the original window
    pieces = {}
    cur = None
    for t in tgt[:-1]:
      if t in sentinels:
        cur = t
        pieces[cur] = []
      else:
        pieces[cur].append(t)
    rebuilt = [x for t in src[:-1] for x in (pieces[t] if t in sentinels else [t])]
    assert rebuilt == tokens.tolist()
    hidden += sum(len(v) for v in pieces.values())
    total += len(tokens)
    spans += len(pieces)
  assert hidden / total == pytest.approx(0.15, abs=0.005)
  assert hidden / spans == pytest.approx(3.0, abs=0.1)


# -- data and the command line ------------------------------------------------------------------
def _write_pairs(path, n=60):
  words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  fr = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"]
  with open(path, "w") as f:
    for i in range(n):
      a, b = i % 10, (i // 10) % 10
      f.write(json.dumps({"source": f"{words[b]} {words[a]}", "target": f"{fr[b]} {fr[a]}"},
                         ensure_ascii=False) + "\n")


def _config(path, **train):
  c = cfglib.default_config()
  c.model.update(family="encoder_decoder", num_layers=1, encoder_layers=1, num_heads=2,
                 embed_dim=32, max_seq_len=32, position="sinusoidal")
  c.data.update(path=str(path), tokenizer="sentencepiece", sp_vocab_size=300, seq_len=24,
                source_len=24, batch_size=4, packing=True)
  c.train.update(objective="seq2seq", steps=4, **train)
  return c


def test_seq2seq_batches_are_a_pure_function_of_the_step(tmp_path):
  _write_pairs(tmp_path / "pairs.jsonl")
  config = _config(tmp_path / "pairs.jsonl")
  a = s2s.load_seq2seq_dataset(config)
  b = s2s.load_seq2seq_dataset(config, a.tokenizer)
  for step in (0, 7, 31):  # later epochs too (47 training pairs, packed several per row)
    x, y = a.batch("train", step, 4), b.batch("train", step, 4)
    assert set(x) == set(s2s.batch_fields(config.data))
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  x = a.batch("train", 0, 4)
  assert x["encoder_segment_ids"].max() > 1  # packing put several pairs in a row
  assert (x["weights"] == (x["segment_ids"] > 0)).all()  # loss on target tokens only
  eos = a.tokenizer.eos_id
  for r in range(4):  # every packed target ends with EOS
    ends = np.flatnonzero(np.diff(x["segment_ids"][r], append=0) != 0)
    assert all(x["targets"][r, e] == eos for e in ends if x["segment_ids"][r, e] > 0)
  halves = [a.batch("train", 3, 4, p, 2) for p in (0, 1)]  # each process builds its own rows
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]),
                                a.batch("train", 3, 4)["inputs"])


def test_train_generate_and_resume_from_the_command_line(tmp_path):
  _write_pairs(tmp_path / "pairs.jsonl")
  common = ["-m", "llmjax.main", "--config=experiments/translate_numbers.py",
            f"--config.data.path={tmp_path / 'pairs.jsonl'}", "--config.data.val_path=",
            "--config.model.num_layers=1", "--config.model.encoder_layers=1",
            "--config.model.embed_dim=32", "--config.data.batch_size=4",
            "--config.data.sp_vocab_size=300", "--config.train.eval_every=2",
            "--config.train.eval_batches=1", "--config.train.checkpoint_every=2",
            "--config.train.progress=False", "--config.train.tensorboard=False",
            "--config.train.async_checkpointing=False",
            # a schedule that does not depend on train.steps, so 2 steps + 2 more == 4 steps
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=0"]
  straight = run_cli(common + [f"--workdir={tmp_path / 'a'}", "--config.train.steps=4"])
  assert straight.returncode == 0, straight.stderr[-2000:]
  first = run_cli(common + [f"--workdir={tmp_path / 'b'}", "--config.train.steps=2"])
  assert first.returncode == 0, first.stderr[-2000:]
  second = run_cli(common + [f"--workdir={tmp_path / 'b'}", "--config.train.steps=4"])
  assert second.returncode == 0, second.stderr[-2000:]
  from llmjax import runs
  a, b = runs.load_run(tmp_path / "a"), runs.load_run(tmp_path / "b")
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))   # bit-exact resumption
  metrics = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  assert any("accuracy" in json.dumps(m) for m in metrics if m.get("split") == "val")
  out = run_cli(["-m", "llmjax.generate", f"--workdir={tmp_path / 'a'}", "--prompt=one two",
                 "--num_beams=3", "--max_new_tokens=6", "--print_ids"])
  assert out.returncode == 0, out.stderr[-2000:]
  ids = [int(x) for x in out.stdout.strip().split(",")]
  assert 1 <= len(ids) <= 6
  bad = run_cli(["-m", "llmjax.generate", f"--workdir={tmp_path / 'a'}", "--prompt=one",
                 "--num_beams=0"])
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "num_beams=0" in bad.stderr
  # evaluation: BLEU/chrF on seq2seq data; the wrong kind of data for the run is one line
  (tmp_path / "text.jsonl").write_text('{"prompt": "one", "completion": "un"}\n')
  ev = run_cli(["-m", "llmjax.evaluate", f"--workdir={tmp_path / 'a'}",
                f"--data={tmp_path / 'pairs.jsonl'}", "--metrics=bleu,bleu_intl,chrf,rougeL",
                "--max_new_tokens=8", "--num_beams=2"])
  assert ev.returncode == 0, ev.stderr[-2000:]
  summary = json.loads(ev.stdout.strip().splitlines()[-1])
  assert summary["format"] == "seq2seq" and summary["examples"] == 60
  assert all(0 <= summary[m] <= 100 for m in ("bleu", "bleu_intl", "chrf"))
  wrong = run_cli(["-m", "llmjax.evaluate", f"--workdir={tmp_path / 'a'}",
                   f"--data={tmp_path / 'text.jsonl'}"])
  assert wrong.returncode == 2 and "encoder-decoder" in wrong.stderr
  assert len(wrong.stderr.strip().splitlines()) == 1


def test_bad_seq2seq_input_is_one_line_exit_2(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"source": "one", "target": "un"}\n{"source": "two"}\n')
  base = ["-m", "llmjax.main", "--config=experiments/translate_numbers.py",
          f"--workdir={tmp_path / 'run'}", "--config.train.steps=1"]
  cases = [
      ([f"--config.data.path={bad}", "--config.data.val_path="], f"{bad}:2"),
      # a decoder-only model asked for encoder inputs ...
      (["--config.model.family=decoder"], "model.family=encoder_decoder"),
      # ... and an encoder-decoder asked to train on plain tokens
      (["--config.train.objective=causal_lm"], "needs encoder inputs"),
  ]
  for extra, words in cases:
    result = run_cli(base + extra)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_seq2seq_file_for_a_text_objective_and_wrong_format_refused(tmp_path):
  text = tmp_path / "text.jsonl"
  text.write_text('{"text": "hello"}\n{"text": "world"}\n')
  config = _config(text)
  with pytest.raises(DataError, match="holds text examples"):
    s2s.load_seq2seq_dataset(config)


def test_sentinels_need_room_above_the_tokenizer():
  class Tok:
    vocab_size = 100
  with pytest.raises(DataError, match="model.vocab_size >= 110"):
    s2s.sentinel_ids(Tok(), 100, 10)
  assert s2s.sentinel_ids(Tok(), 110, 10) == list(range(109, 99, -1))


def test_span_corruption_trains_in_process(tmp_path):
  """The span_corruption objective's rows go through the same program and step as seq2seq."""
  from llmjax import objectives, program
  from llmjax import sharding as shd
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(" ".join(f"word{i % 37}" for i in range(3000)))
  c = _config(corpus)
  c.data.update(tokenizer="char", seq_len=16, source_len=24, packing=False)
  c.model.vocab_size = 120
  c.train.update(objective="span_corruption", span_sentinels=20)
  cfglib.validate(c)
  dataset = objectives.get("span_corruption").load_dataset(c)
  tokenizer = dataset.tokenizer
  # char tokenizer: no EOS; the rows still carry the corruption
  batch = dataset.batch("train", 0, 4)
  assert (batch["encoder_inputs"] >= 100).any()  # sentinels (the top model ids) in the sources
  mesh = shd.make_mesh(c)
  prog = program.build(c, mesh, cfglib.model_config(c, tokenizer.vocab_size))
  state = prog.init(jax.random.key(0))
  losses = []
  for step in range(3):
    with prog.scope():
      state, metrics = prog.train_step(state, shd.put_batch(dataset.batch("train", 0, 4), mesh))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]


def test_seq2seq_data_on_a_decoder_only_run_is_refused(tmp_path):
  """The reverse of the above: a decoder-only run asked to translate (encoder inputs)."""
  from llmjax import runs
  from llmjax.data.tokenizers import CharTokenizer
  from llmjax.eval import runner
  from llmjax.eval.tasks import TaskError
  c = cfglib.default_config()
  c.model.update(num_layers=1, num_heads=2, embed_dim=16, max_seq_len=16)
  tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
  model = build_model(cfglib.model_config(c, tok.vocab_size))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  runs.create_run(tmp_path / "lm", c, params, tok)
  _write_pairs(tmp_path / "pairs.jsonl", 3)
  with pytest.raises(TaskError, match="need an encoder-decoder"):
    runner.evaluate_file(str(tmp_path / "lm"), str(tmp_path / "pairs.jsonl"))
