"""Hugging Face BERT interop and fill-mask, checked against transformers + CPU torch (test-only).

A WordPiece tokenizer is trained locally with the `tokenizers` library (no download); random
BertForMaskedLM / BertForPreTraining models are saved with save_pretrained next to it.
"""
import json

import jax
import numpy as np
import pytest

from conftest import run_cli
from llmjax import convert
from llmjax.fill_mask import FillMaskError, fill_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT = "the quick brown fox [MASK] over the lazy dog and the [MASK] barks."


def wordpiece(directory, specials=SPECIALS, vocab_size=300):
  """A BERT-style WordPiece tokenizer.json + tokenizer_config.json trained on the embedded corpus."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers

  from llmjax.data.sources import embedded_documents
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.train_from_iterator(embedded_documents()[:40], trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=list(specials)))
  if "[CLS]" in specials:
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
  tok.decoder = decoders.WordPiece()
  tok.save(str(directory / "tokenizer.json"))
  config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
  config.update({f"{t.strip('[]').lower()}_token": t for t in specials})
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return tok.get_vocab_size()


def _perturb(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """name -> (torch model, directory)."""
  out = {}
  for seed, (name, cls, extra) in enumerate([
      ("mlm", transformers.BertForMaskedLM, {}),
      ("pretraining", transformers.BertForPreTraining, dict(hidden_act="gelu_new",
                                                            type_vocab_size=3))]):
    path = tmp_path_factory.mktemp(name)
    vocab = wordpiece(path)
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, initializer_range=0.2, **extra)
    torch.manual_seed(100 + seed)
    model = _perturb(cls(config), seed)
    model.save_pretrained(path)
    out[name] = (model, path)
  return out


def _inputs(vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (2, 24))
  types = np.zeros_like(ids)
  types[:, 12:] = 1
  mask = np.ones_like(ids)
  mask[1, 17:] = 0  # the second row is padded
  return ids, types, mask


@pytest.mark.parametrize("name", ["mlm", "pretraining"])
def test_imported_bert_logits_match_pytorch_with_padding_and_token_types(hf, name):
  model, path = hf[name]
  imported = convert.load_hf(path)
  cfg = imported.model_config
  assert (cfg.family, cfg.norm_position, cfg.causal, cfg.type_vocab_size) == (
      "encoder", "post", False, model.config.type_vocab_size)
  assert cfg.pooler == cfg.nsp_head == (name == "pretraining")
  ids, types, mask = _inputs(cfg.vocab_size)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                attention_mask=torch.tensor(mask))
  apply = lambda **kw: imported.model.apply(  # noqa: E731
      {"params": imported.params}, ids, token_types=types, segment_ids=mask, **kw)
  real = mask.astype(bool)
  if name == "pretraining":
    logits, nsp = apply(return_nsp=True)
    np.testing.assert_allclose(nsp, ref.seq_relationship_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits)[real], ref.prediction_logits.numpy()[real],
                               atol=1e-4)
  else:
    np.testing.assert_allclose(np.asarray(apply())[real], ref.logits.numpy()[real], atol=1e-4)


def test_fill_mask_top5_equals_the_transformers_pipeline(hf):
  _, path = hf["mlm"]
  imported = convert.load_hf(path)
  ours = fill_mask(imported.model, imported.params, imported.tokenizer, TEXT, top_k=5)
  pipe = transformers.pipeline("fill-mask", model=str(path), tokenizer=str(path), device="cpu")
  theirs = pipe(TEXT, top_k=5)
  assert len(ours) == len(theirs) == 2
  for mine, ref in zip(ours, theirs):
    assert mine.ids == [r["token"] for r in ref]
    np.testing.assert_allclose(mine.probs, [r["score"] for r in ref], atol=1e-5)


def test_cli_import_fill_mask_and_export_round_trip_exactly(hf, tmp_path):
  model, path = hf["pretraining"]
  run = tmp_path / "run"
  r = run_cli(["-m", "llmjax.convert", "hf_import", f"--hf_dir={path}", f"--workdir={run}"])
  assert r.returncode == 0, r.stderr
  assert "imported bert" in r.stdout
  config = json.loads((run / "config.json").read_text())
  assert config["train"]["objective"] == "masked_lm" and config["model"]["family"] == "encoder"
  r = run_cli(["-m", "llmjax.fill_mask", f"--workdir={run}", f"--text={TEXT}", "--top_k=3",
               "--print_ids"])
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert [l.split(" (")[0] for l in lines if not l.startswith(" ")] == ["mask 1", "mask 2"]
  ids = [int(l.split("\t")[1]) for l in lines if l.startswith(" ")]
  imported = convert.load_hf(path)
  expected = fill_mask(imported.model, imported.params, imported.tokenizer, TEXT, top_k=3)
  assert ids == expected[0].ids + expected[1].ids

  out = tmp_path / "hf_out"
  r = run_cli(["-m", "llmjax.convert", "hf_export", f"--workdir={run}", f"--hf_dir={out}"])
  assert r.returncode == 0, r.stderr
  back = transformers.BertForPreTraining.from_pretrained(out).eval()
  theirs = model.state_dict()
  for key, value in back.state_dict().items():
    assert torch.equal(value, theirs[key]), key
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.mask_token == "[MASK]" and tok(TEXT)["input_ids"] == imported.tokenizer.encode(TEXT)
  again = convert.load_hf(out)
  assert again.model_config == imported.model_config
  jax.tree.map(np.testing.assert_array_equal, again.params, imported.params)


@pytest.mark.parametrize("change, message", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
])
def test_unsupported_bert_variants_are_refused_by_name(hf, tmp_path, change, message):
  _, path = hf["mlm"]
  for f in path.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  config = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(convert.ConversionError, match=message.replace("[", r"\[")):
    convert.load_hf(tmp_path)
  r = run_cli(["-m", "llmjax.convert", "hf_import", f"--hf_dir={tmp_path}",
               f"--workdir={tmp_path / 'run'}"])
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bert_without_masked_lm_head_or_with_extra_weights_is_refused(hf, tmp_path):
  from safetensors.numpy import save_file

  from llmjax.convert import files
  _, path = hf["mlm"]
  tensors = files.read_weights(path)
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  save_file({k: v for k, v in tensors.items() if not k.startswith("cls.")},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match="no masked-LM head"):
    convert.load_hf(tmp_path)
  save_file({**tensors, "classifier.weight": np.zeros((2, 32), np.float32)},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match="classifier.weight"):
    convert.load_hf(tmp_path)


def test_fill_mask_bad_input_is_one_line(hf, tmp_path):
  _, path = hf["mlm"]
  imported = convert.load_hf(path)
  with pytest.raises(FillMaskError, match="no mask token; write \\[MASK\\]"):
    fill_mask(imported.model, imported.params, imported.tokenizer, "no mask here")
  run = tmp_path / "run"
  convert.import_hf(path, run)
  r = run_cli(["-m", "llmjax.fill_mask", f"--workdir={run}", "--text=no mask here"])
  assert r.returncode == 2 and "no mask token" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_fill_mask_refuses_a_causal_model_and_a_tokenizer_without_mask(hf):
  import dataclasses
  _, path = hf["mlm"]
  imported = convert.load_hf(path)
  from llmjax.model import build_model
  causal = build_model(dataclasses.replace(imported.model_config, family="decoder", causal=True))
  with pytest.raises(FillMaskError, match="bidirectional"):
    fill_mask(causal, imported.params, imported.tokenizer, TEXT)
  from llmjax.data import CharTokenizer
  with pytest.raises(FillMaskError, match="no \\[MASK\\] token"):
    fill_mask(imported.model, imported.params, CharTokenizer(list("abc")), "a[MASK]")
