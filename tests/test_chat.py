"""Chat templates (llmjax/data/chat.py) against transformers' apply_chat_template, and chat loss
weights checked token by token, for an HF tokenizer with its own template and for an llmjax
(sentencepiece) tokenizer with the default template."""
import json

import numpy as np
import pytest

from llmjax import config as cfglib
from llmjax.data import DataError
from llmjax.data import formats as fm
from llmjax.data.chat import DEFAULT_TEMPLATE, ChatFormatter, ChatTemplateError, encode_plain
from llmjax.data.hf_tokenizer import HFTokenizer
from llmjax.data.task_data import Encoder, EncodeStats

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# the same layout with transformers' {% generation %} marks, so transformers computes the
# assistant mask itself (an independent reference for our weights)
CHATML_GEN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
              "{% endgeneration %}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + "
              "message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "I am fine"}, {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine, world"}]


def hf_dir(tmp_path, template):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world, how are you? I am fine. be nice there"] * 20, trainer)
  d = tmp_path / "hf"
  d.mkdir(exist_ok=True)
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>",
      "tokenizer_class": "PreTrainedTokenizerFast"}))
  return d


def data_config(**kw):
  d = cfglib.default_config().data
  d.update(seq_len=128, **kw)
  return d


@pytest.mark.parametrize("template", [CHATML, CHATML_GEN])
def test_rendering_and_ids_match_transformers(tmp_path, template):
  transformers = pytest.importorskip("transformers")
  d = hf_dir(tmp_path, template)
  ref = transformers.AutoTokenizer.from_pretrained(str(d))
  ours = ChatFormatter(HFTokenizer.from_hf_dir(d))
  for gen in (False, True):
    msgs = CHAT[:4] if gen else CHAT
    assert ours.render(msgs, add_generation_prompt=gen) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=gen)
  # the encoded example is exactly transformers' token ids for the chat
  ex = fm.ChatExample(tuple((m["role"], m["content"]) for m in CHAT), "x.jsonl:1")
  item = Encoder(HFTokenizer.from_hf_dir(d), data_config()).encode(ex, EncodeStats())
  want = ref.apply_chat_template(CHAT, return_dict=True)["input_ids"]
  assert item.tokens.tolist() == list(want)


def test_chat_weights_equal_transformers_assistant_mask(tmp_path):
  """Our spans come from prefix renderings; transformers' from {% generation %}: token by token
  the same, and the weighted tokens decode to exactly the assistant turns + <|im_end|>\\n."""
  transformers = pytest.importorskip("transformers")
  d = hf_dir(tmp_path, CHATML_GEN)
  ref = transformers.AutoTokenizer.from_pretrained(str(d))
  out = ref.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
  tok = HFTokenizer.from_hf_dir(d)
  ex = fm.ChatExample(tuple((m["role"], m["content"]) for m in CHAT), "x.jsonl:1")
  item = Encoder(tok, data_config()).encode(ex, EncodeStats())
  assert item.weights.tolist() == [float(m) for m in out["assistant_masks"]]
  on = item.tokens[item.weights > 0]
  assert tok._tok.decode(on.tolist(), skip_special_tokens=False) == \
      "I am fine<|im_end|>\nfine, world<|im_end|>\n"
  # last_turn: only the second assistant turn; all: every token
  last = Encoder(tok, data_config(train_on="last_turn")).encode(ex, EncodeStats())
  assert tok._tok.decode(last.tokens[last.weights > 0].tolist(), skip_special_tokens=False) == \
      "fine, world<|im_end|>\n"
  every = Encoder(tok, data_config(train_on="all")).encode(ex, EncodeStats())
  assert every.weights.min() == 1.0


def test_default_template_weights_for_an_llmjax_tokenizer(tmp_path, monkeypatch):
  """sentencepiece (has an EOS): assistant turns are ' <content><EOS>\\n' after 'Assistant:'."""
  monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
  from llmjax.data.tokenizers import train_sentencepiece
  sp = train_sentencepiece("User: hello there. Assistant: I am fine, how are you?\n" * 50 +
                           "be nice to the world and everyone in it\n" * 20, 320)
  f = ChatFormatter(sp)
  assert f.is_default and f.source == DEFAULT_TEMPLATE
  text, spans = f.assistant_spans(CHAT)
  assert [text[a:b] for a, b, _ in spans] == [" I am fine\x00<eos>\x00\n", " fine, world\x00<eos>\x00\n"]
  assert f.render(CHAT[:2], add_generation_prompt=True) == "be nice\n\nUser: hello there\nAssistant:"
  ex = fm.ChatExample(tuple((m["role"], m["content"]) for m in CHAT), "x.jsonl:1")
  item = Encoder(sp, data_config()).encode(ex, EncodeStats())
  w = item.weights
  # token by token: weight 1 exactly on the two assistant turns, each closed by the EOS id
  pieces = [("be nice\n\nUser: hello there\nAssistant:", 0), (" I am fine", 1), (None, 1),
            ("\n", 1), ("User: how are you?\nAssistant:", 0), (" fine, world", 1), (None, 1),
            ("\n", 1)]
  want_ids, want_w = [], []
  for piece, on in pieces:
    ids = [sp.eos_id] if piece is None else sp.encode(piece)
    want_ids += ids
    want_w += [float(on)] * len(ids)
  assert item.tokens.tolist() == want_ids and w.tolist() == want_w
  assert (item.tokens == sp.eos_id).sum() == 2 and w[item.tokens == sp.eos_id].min() == 1.0


def test_template_errors_are_one_line(tmp_path):
  d = hf_dir(tmp_path, "{% for m in messages %}{{ m['content'] }}")
  with pytest.raises(ChatTemplateError, match="does not parse"):
    ChatFormatter(HFTokenizer.from_hf_dir(d))
  # a template that drops assistant messages renders no assistant span
  d = hf_dir(tmp_path, "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}"
             "{% endif %}{% endfor %}")
  with pytest.raises(DataError, match="x.jsonl:3: the chat template renders no assistant span"):
    ChatFormatter(HFTokenizer.from_hf_dir(d)).assistant_spans(CHAT, "x.jsonl:3")
  # a template that rewrites earlier turns (and has no {% generation %}) cannot be located
  d = hf_dir(tmp_path, "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}"
             "{% endfor %}")
  with pytest.raises(DataError, match="renders earlier turns differently"):
    ChatFormatter(HFTokenizer.from_hf_dir(d)).assistant_spans(CHAT)


def test_encode_plain_maps_special_strings(tmp_path):
  d = hf_dir(tmp_path, CHATML)
  tok = HFTokenizer.from_hf_dir(d)
  ids = encode_plain(tok, "hello<|im_end|>")
  assert ids[-1] == tok._tok.token_to_id("<|im_end|>") and np.all(np.asarray(ids) >= 0)
