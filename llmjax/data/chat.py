"""Chat templates: messages -> rendered text, and where the assistant turns lie in it.

A tokenizer imported from Hugging Face carries its `chat_template` (tokenizer_config.json); it is
rendered with jinja2 exactly as transformers' `apply_chat_template` renders it: a sandboxed
environment with trim_blocks/lstrip_blocks, the loop-control extension, transformers' `tojson`
filter, `raise_exception` and `strftime_now`, and the tokenizer's special tokens (bos_token,
eos_token, ...) as variables. tests/test_chat.py compares both, text and token ids.

llmjax-trained tokenizers (char, byte, sentencepiece) use DEFAULT_TEMPLATE:

    <system text>\n\n                      (a system message, if any)
    User: <user text>\n
    Assistant: <assistant text><eos>\n     (<eos>: the tokenizer's end-of-sequence token; none for
                                            char/byte tokenizers, which have no EOS)
    Assistant:                             (add_generation_prompt=True: the generation prompt)

Assistant spans are found from the template itself, never by pattern-guessing: for assistant
turn i, the text that rendering messages[:i+1] adds to rendering messages[:i] with the generation
prompt is that turn (content plus the end-of-turn/EOS tokens the template closes it with). The
renderings must be prefixes of each other; templates that rewrite earlier turns fail with one
line, unless they mark turns with `{% generation %}` blocks (transformers' assistant-mask tag),
which are then used instead.
"""
from __future__ import annotations

import contextlib
import json
from datetime import datetime

from llmjax.data.sources import DataError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% elif message['role'] == 'tool' %}Tool: {{ message['content'] }}\n"
    "{% else %}User: {{ message['content'] }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")

# Marks the EOS in text rendered for llmjax tokenizers (whose vocabularies have no textual EOS
# piece); `encode_rendered` turns it into the EOS id. Never appears in real data.
EOS_MARK = "\x00<eos>\x00"


class ChatTemplateError(DataError):
  """A chat template that cannot be rendered or has no assistant span."""


_COMPILED: dict[str, object] = {}


def compile_template(source: str):
  """The jinja2 template, in an environment configured as transformers configures its own."""
  if source in _COMPILED:
    return _COMPILED[source]
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of its output."""
    tags = {"generation"}

    def __init__(self, environment):
      super().__init__(environment)
      environment.extend(generation_spans=None)

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller):
      out = caller()
      spans = self.environment.generation_spans
      if spans is not None:
        spans.append(out)
      return out

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationTracker, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  try:
    template = env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message}); "
                            "fix chat_template in tokenizer_config.json") from None
  _COMPILED[source] = template
  return template


class ChatFormatter:
  """Renders chats for one tokenizer and encodes them with per-token loss weights."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    config = getattr(tokenizer, "tokenizer_config", None) or {}
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in source}
      source = named.get("default") or next(iter(named.values()), None)
    self.is_default = not source
    self.source = source or DEFAULT_TEMPLATE
    self.template = compile_template(self.source)
    if tokenizer.kind == "hf":
      # transformers passes the special tokens map (strings) to the template
      self.variables = {k: _token_text(config[k]) for k in
                        ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                         "cls_token", "mask_token") if config.get(k)}
      if "eos_token" not in self.variables and tokenizer.eos_id is not None:
        self.variables["eos_token"] = tokenizer.id_to_token(tokenizer.eos_id)
      if "bos_token" not in self.variables and getattr(tokenizer, "bos_id", None) is not None:
        self.variables["bos_token"] = tokenizer.id_to_token(tokenizer.bos_id)
    else:
      self.variables = {"eos_token": EOS_MARK if tokenizer.eos_id is not None else ""}

  def render(self, messages, add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` ((role, content) pairs or {"role", "content"} dicts)."""
    import jinja2
    chat = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
    try:
      return self.template.render(messages=chat, tools=None, documents=None,
                                  add_generation_prompt=add_generation_prompt, **self.variables)
    except jinja2.exceptions.TemplateError as e:
      raise ChatTemplateError(f"the chat template failed to render: {e}") from None

  def _generation_blocks(self, chat) -> tuple[list[str], str]:
    env = self.template.environment
    spans: list[str] = []
    with _swap(env, "generation_spans", spans):
      text = self.render(chat)
    return spans, text

  def assistant_spans(self, messages, where: str = "") -> tuple[str, list[tuple[int, int, int]]]:
    """(rendered text, [(start, end, turn index)]) for every assistant turn, in characters."""
    where = f"{where}: " if where else ""
    text = self.render(messages)
    spans = []
    prefix_ok = True
    for i, m in enumerate(messages):
      if _role(m) != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True) if i else \
          self.render([], add_generation_prompt=True)
      upto = self.render(messages[:i + 1])
      if not (upto.startswith(before) and text.startswith(upto)):
        prefix_ok = False
        break
      if len(upto) > len(before):
        spans.append((len(before), len(upto), i))
    if not prefix_ok:
      blocks, rendered = self._generation_blocks(messages)
      if not blocks:
        raise ChatTemplateError(
            f"{where}the chat template renders earlier turns differently once later ones follow, "
            "so assistant turns cannot be located; use a template whose renderings are prefixes "
            "of each other, or mark assistant turns with {% generation %}")
      spans, pos = [], 0
      turns = [i for i, m in enumerate(messages) if _role(m) == "assistant"]
      for block, turn in zip(blocks, turns):
        start = rendered.index(block, pos)
        spans.append((start, start + len(block), turn))
        pos = start + len(block)
    if not spans and any(_role(m) == "assistant" for m in messages):
      raise ChatTemplateError(f"{where}the chat template renders no assistant span; check that "
                              "it renders assistant messages")
    return text, spans

  def encode_rendered(self, pieces: list[str]) -> list[list[int]]:
    """Token ids of each piece, encoded separately (so weights align with span boundaries exactly,
    and a prompt is tokenized as it is at generation time). Special tokens written by the
    template become their ids; no BOS/EOS is added by the tokenizer itself."""
    return [encode_plain(self.tokenizer, p) for p in pieces]


def _role(m):
  return m["role"] if isinstance(m, dict) else m[0]


def _token_text(token) -> str:
  return token.get("content", "") if isinstance(token, dict) else str(token)


@contextlib.contextmanager
def _swap(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def encode_plain(tokenizer, text: str) -> list[int]:
  """Token ids of `text` without the BOS/EOS a tokenizer adds by itself; EOS_MARK (llmjax
  tokenizers) and special-token strings (HF tokenizers) become their ids."""
  if not text:
    return []
  if tokenizer.kind == "hf":
    if tokenizer.backend == "tokenizers":
      return tokenizer._tok.encode(text, add_special_tokens=False).ids
    return _encode_with_marks(lambda t: tokenizer._sp.encode(t), text,
                              _hf_sp_specials(tokenizer))
  marks = {EOS_MARK: tokenizer.eos_id} if tokenizer.eos_id is not None else {}
  return _encode_with_marks(tokenizer.encode, text, marks)


def _hf_sp_specials(tokenizer) -> dict[str, int]:
  out = {}
  for key, ident in (("eos_token", tokenizer.eos_id), ("bos_token", tokenizer.bos_id)):
    if ident is not None:
      out[_token_text(tokenizer.tokenizer_config.get(key)) or tokenizer.id_to_token(ident)] = ident
  return out


def _encode_with_marks(encode, text: str, marks: dict[str, int]) -> list[int]:
  """Encodes text in pieces between special-token strings, which map to their ids."""
  ids: list[int] = []
  pos = 0
  while pos < len(text):
    hits = [(text.find(m, pos), m) for m in marks if text.find(m, pos) >= 0]
    if not hits:
      ids += encode(text[pos:])
      break
    at, mark = min(hits)
    if at > pos:
      ids += encode(text[pos:at])
    ids.append(marks[mark])
    pos = at + len(mark)
  return [int(i) for i in ids]
