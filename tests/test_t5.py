"""Hugging Face T5 interop and encoder-decoder decoding, checked against transformers + CPU torch.

Tiny random T5ForConditionalGeneration models (v1.0: ReLU MLP, tied head scaled by d_model**-0.5;
v1.1: gated-GELU, unscaled head; and v1.1 with its own lm_head) are saved with save_pretrained,
together with a T5 sentencepiece tokenizer trained here (no downloads). Every weight is redrawn
with a spread that makes the models' outputs vary (HF's own init gives one repeated token), so
greedy and beam search really differ and EOS really ends hypotheses.
"""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from llmjax import convert, seq2seq_decode
from llmjax.convert import ConversionError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB = 70          # 60 sentencepiece pieces + 10 sentinels
EXTRA_IDS = 10
SOURCES = [[5, 9, 33, 2, 1], [7, 8, 9, 10, 11, 12, 13, 1], [3, 1], [40, 41, 42, 1]]
TEXT = (["the quick brown fox jumps over the lazy dog number %d" % i for i in range(200)]
        + ["un deux trois quatre cinq six sept huit neuf dix onze douze cent mille"] * 20)


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif "relative_attention_bias" in name or "shared" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
  return model.eval()


def _save_tokenizer(directory):
  import io
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=VOCAB - EXTRA_IDS,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  raw = directory / "raw"
  raw.mkdir()
  (raw / "spiece.model").write_bytes(buf.getvalue())
  tok = transformers.T5Tokenizer.from_pretrained(str(raw), extra_ids=EXTRA_IDS)
  tok.save_pretrained(str(directory))
  shutil.rmtree(raw)
  return tok


def _make(directory, variant, layers=(2, 2), seed=0):
  torch.manual_seed(seed)
  proj = "relu" if variant == "v1.0" else "gated-gelu"
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers[0],
      num_decoder_layers=layers[1], num_heads=4, feed_forward_proj=proj, decoder_start_token_id=0,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      tie_word_embeddings=variant == "v1.0")
  model = _randomize(transformers.T5ForConditionalGeneration(config), seed)
  model.save_pretrained(str(directory))
  if variant == "v1.1-untied":
    # A v1.1 checkpoint as Google's conversions ship it: its own lm_head and
    # tie_word_embeddings=false. transformers keeps distinct head weights untied.
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(directory / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=g)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)
    (directory / "config.json").write_text(json.dumps(cfg))
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(directory)).eval()
  _save_tokenizer(directory)
  return model


VARIANTS = ["v1.0", "v1.1", "v1.1-untied"]


@pytest.fixture(scope="module")
def t5_models(tmp_path_factory):
  out = {}
  for variant in VARIANTS:
    directory = tmp_path_factory.mktemp(variant)
    out[variant] = (directory, _make(directory, variant))
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_t5_logits_match_transformers(tmp_path, variant):
  # Unequal encoder/decoder depths and a padded source row.
  torch_model = _make(tmp_path, variant, layers=(2, 3), seed=3)
  hf = convert.load_hf(tmp_path)
  cfg = hf.model_config
  assert (cfg.family, cfg.num_encoder_layers, cfg.num_layers) == ("encoder_decoder", 2, 3)
  assert cfg.mlp == ("relu" if variant == "v1.0" else "geglu")
  assert cfg.tie_embeddings == (variant != "v1.1-untied")
  assert cfg.scale_decoder_outputs == (variant == "v1.0")
  g = torch.Generator().manual_seed(0)
  src = torch.randint(0, VOCAB, (2, 30), generator=g)
  tgt = torch.randint(0, VOCAB, (2, 25), generator=g)
  mask = torch.ones_like(src)
  mask[1, 17:] = 0
  with torch.no_grad():
    ref = torch_model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits.numpy()
  ours = hf.model.apply({"params": hf.params}, jnp.asarray(src.numpy()), jnp.asarray(tgt.numpy()),
                        encoder_segment_ids=jnp.asarray(mask.numpy()))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def _hf_generate(model, source, max_new, eos_id, **kw):
  with torch.no_grad():
    out = model.generate(torch.tensor([source]), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=0, **kw)[0].tolist()
  return out[1:]  # drop the decoder start token


def _assert_same(ours, ref):
  """Ours is cut after EOS; HF pads a batch's shorter rows (here: to max length) with pad=0."""
  assert ours == ref[: len(ours)], (ours, ref)
  assert all(t == 0 for t in ref[len(ours):]), (ours, ref)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("variant", [pytest.param("v1.0", marks=SLOW), "v1.1",
                                     pytest.param("v1.1-untied", marks=SLOW)])
def test_t5_greedy_and_beam_match_transformers(t5_models, variant):
  directory, torch_model = t5_models[variant]
  hf = convert.load_hf(directory)
  saw_difference = saw_eos = False
  # eos 1 (never generated by these models: the max-length path) and a token they do produce
  # (hypotheses end early, the stopping heuristic decides).
  for eos_id in (1, _frequent_token(hf)):
    greedy = seq2seq_decode.generate(hf.model, hf.params, SOURCES, 12, temperature=0.0,
                                     eos_id=eos_id)
    beams = seq2seq_decode.generate(hf.model, hf.params, SOURCES, 12, num_beams=4, eos_id=eos_id)
    for source, g, b in zip(SOURCES, greedy, beams):
      _assert_same(g, _hf_generate(torch_model, source, 12, eos_id))
      _assert_same(b, _hf_generate(torch_model, source, 12, eos_id, num_beams=4))
      saw_difference |= g != b
      saw_eos |= eos_id in g + b
  assert saw_difference and saw_eos  # the test exercises what it claims to


def _frequent_token(hf):
  out = seq2seq_decode.generate(hf.model, hf.params, SOURCES, 12, num_beams=4, eos_id=None)
  counts = np.bincount(np.concatenate([np.asarray(o[1:4]) for o in out]), minlength=VOCAB)
  return int(np.argmax(counts))


@pytest.mark.parametrize("length_penalty,early_stopping", [
    (-1.0, True), pytest.param(2.0, False, marks=SLOW), pytest.param(1.0, "never", marks=SLOW)])
def test_t5_beam_options_match_transformers(t5_models, length_penalty, early_stopping):
  directory, torch_model = t5_models["v1.1"]
  hf = convert.load_hf(directory)
  eos_id = _frequent_token(hf)
  ours = seq2seq_decode.generate(hf.model, hf.params, SOURCES, 10, num_beams=3, eos_id=eos_id,
                                 length_penalty=length_penalty, early_stopping=early_stopping)
  for source, o in zip(SOURCES, ours):
    _assert_same(o, _hf_generate(torch_model, source, 10, eos_id, num_beams=3,
                                 length_penalty=length_penalty, early_stopping=early_stopping))
  if length_penalty < 0:  # favours short hypotheses: some end with EOS before the limit
    assert any(o[-1] == eos_id and len(o) < 10 for o in ours)


def test_cached_decoding_equals_recomputation(t5_models):
  directory, _ = t5_models["v1.0"]
  hf = convert.load_hf(directory)
  cached = seq2seq_decode.generate(hf.model, hf.params, SOURCES, 20, temperature=0.0)
  assert cached == seq2seq_decode.recompute_generate(hf.model, hf.params, SOURCES, 20)


def test_t5_tokenizer_imported(t5_models):
  directory, _ = t5_models["v1.1"]
  hf = convert.load_hf(directory)
  ref = transformers.AutoTokenizer.from_pretrained(str(directory))
  text = "the quick brown fox <extra_id_0> over"
  assert hf.tokenizer.encode(text) == ref(text)["input_ids"]   # sentinels and the final </s>
  assert hf.tokenizer.eos_id == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_t5_export_round_trips_exactly(t5_models, tmp_path, variant):
  directory, torch_model = t5_models[variant]
  hf = convert.load_hf(directory)
  convert.save_hf(hf.model_config, hf.params, tmp_path / "out", tokenizer=hf.tokenizer)
  back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
  ref_state, back_state = torch_model.state_dict(), back.state_dict()
  assert set(ref_state) == set(back_state)
  for name, value in ref_state.items():
    assert torch.equal(value, back_state[name]), name
  assert back.config.scale_decoder_outputs == torch_model.config.scale_decoder_outputs
  # ... and back into llmjax: the same tree, bit for bit.
  again = convert.load_hf(tmp_path / "out")
  assert again.model_config == hf.model_config
  for a, b in zip(jax_leaves(hf.params), jax_leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert ref_tok("the lazy dog")["input_ids"] == hf.tokenizer.encode("the lazy dog")


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_unsupported_t5_variants_refused_by_name(t5_models, tmp_path):
  directory, _ = t5_models["v1.1"]
  for change, words in [({"feed_forward_proj": "gated-silu"}, "gated-silu"),
                        ({"architectures": ["T5EncoderModel"]}, "T5EncoderModel"),
                        ({"model_type": "mt5"}, "mt5")]:
    target = tmp_path / words
    shutil.copytree(directory, target)
    cfg = json.loads((target / "config.json").read_text())
    cfg.update(change)
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=words):
      convert.load_hf(target)
  result = run_cli(["-m", "llmjax.convert", "hf_import", f"--hf_dir={tmp_path / 'gated-silu'}",
                    f"--workdir={tmp_path / 'run'}"])
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "gated-silu" in lines[0]
