"""An lm-evaluation-harness model for llmjax runs, registered with lm-eval as "llmjax".

It answers lm-eval's three request types with the same batched `Scorer` the task runner uses:
loglikelihood (context/continuation split as `encode_pair`), loglikelihood_rolling (disjoint
windows of the model's context, as lm-eval's own Hugging Face model makes them; the EOS token is
the prefix, and a tokenizer without one leaves each document's first token unscored) and
generate_until (batched KV-cached generation, stopped at EOS and the `until` strings).

Used by `python -m llmjax.lm_eval` and, in Python, with `lm_eval.simple_evaluate(model=
LlmjaxLM("runs/x"), tasks=[...])` or `simple_evaluate(model="llmjax", model_args="workdir=runs/x")`
once this module is imported (lm-eval 0.4 has no plugin entry point that would import it).
"""
from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmjax.eval.scoring import Scorer, encode_pair

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task gives no max_gen_toks


class RequestError(ValueError):
  """A request the run cannot serve (e.g. a character outside a char tokenizer's vocabulary)."""


@register_model("llmjax")
class LlmjaxLM(LM):

  def __init__(self, workdir: str | None = None, step=None, batch_size: int | str = 16,
               scorer: Scorer | None = None, seed: int = 0, **unused):
    super().__init__()
    if scorer is None:
      if not workdir:
        raise ValueError("the llmjax lm-eval model needs workdir=<run directory>")
      from llmjax.eval import loading
      run = loading.load(workdir, None if step in (None, "") else int(step))
      scorer = Scorer.from_run(run, int(batch_size))
      self.step = run.step
    self.scorer, self.seed = scorer, int(seed)
    self.tokenizer = scorer.tokenizer

  # -- helpers -------------------------------------------------------------------------------------
  def _encode(self, text: str) -> list[int]:
    try:
      return list(self.tokenizer.encode(text))
    except ValueError as e:
      raise RequestError(f"cannot encode an lm-eval request with this run's tokenizer: {e}") from None

  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    try:
      context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
    except ValueError as e:
      raise RequestError(f"cannot encode an lm-eval request with this run's tokenizer: {e}") from None
    if not context_ids and self.tokenizer.eos_id is not None:
      context_ids = [self.tokenizer.eos_id]  # an empty context conditions on end-of-sequence
    return context_ids, continuation_ids

  # -- lm-eval's interface -------------------------------------------------------------------------
  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self._pair(*r.args) for r in requests]
    results = self.scorer.loglikelihood(pairs)
    for r, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", r.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    eos = self.tokenizer.eos_id
    spans, pairs = [], []
    for r in requests:
      ids = self._encode(r.args[0])
      if eos is None:  # nothing to condition the first token on: it goes unscored
        ids, prefix = ids[1:], (ids[0] if ids else 0)
      else:
        prefix = eos
      windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
          ids, prefix_token=prefix, max_seq_len=self.scorer.context, context_len=1)]
      spans.append((len(pairs), len(pairs) + len(windows)))
      pairs.extend(windows)
    results = self.scorer.loglikelihood(pairs) if pairs else []
    out = []
    for r, (a, b) in zip(requests, spans):
      total = float(sum(ll for ll, _ in results[a:b]))
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
      out.append(total)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    # Requests with the same generation settings are generated together, in batches.
    groups: dict[str, list[int]] = {}
    settings = []
    for i, r in enumerate(requests):
      kwargs = dict(r.args[1] or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
      do_sample = bool(kwargs.pop("do_sample", False))
      temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
      key = repr((until, max_new, temperature))
      settings.append((until, max_new, temperature))
      groups.setdefault(key, []).append(i)
    out: list[str] = [""] * len(requests)
    for indices in groups.values():
      until, max_new, temperature = settings[indices[0]]
      prompts = [self._encode(requests[i].args[0]) for i in indices]
      texts = self.scorer.generate(prompts, max_new, stop=until, temperature=temperature,
                                   seed=self.seed)
      for i, text in zip(indices, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out
