"""Issue 11: the task runner's `seq2seq` entry: {"source", "target"} pairs on an encoder-decoder.

Each source (encoded with the run's tokenizer, ending with EOS as in training) is translated by
llmjax.seq2seq_decode (greedy by default; --num_beams for beam search; --temperature samples)
and the output text is scored against the target: BLEU (sacrebleu, its 13a tokenizer, or
`bleu_intl` for its international tokenizer), chrF, ROUGE-1/2/L, exact match, token F1.
"""
from __future__ import annotations

from llmjax.eval import metrics as M
from llmjax.eval.tasks import TASKS, Context, Result, TaskError, _encode, chosen_metrics, register


@register("seq2seq", metrics=tuple(M.TEXT_METRICS), default_metrics=("bleu", "chrf", "rougeL"),
          families=("encoder_decoder",))
def evaluate_seq2seq(ctx: Context, examples) -> Result:
  from llmjax import seq2seq_decode
  from llmjax.sampling import Sampler
  o = ctx.options
  names = chosen_metrics(TASKS["seq2seq"], o.metrics)
  run, tokenizer = ctx.run, ctx.scorer.tokenizer
  eos = tokenizer.eos_id
  sources = []
  for i, ex in enumerate(examples):
    ids = _encode(ctx, ex, ex.source, i)
    if eos is not None and (not ids or ids[-1] != eos):
      ids.append(eos)
    sources.append(ids)
  sampler = Sampler(o.temperature, o.top_k, o.top_p)
  batch = max(1, ctx.scorer.batch_size)
  outputs = []
  for start in range(0, len(sources), batch):
    try:
      outputs += seq2seq_decode.generate(
          run.model, run.params, sources[start:start + batch], o.max_new_tokens, sampler=sampler,
          seed=o.seed, eos_id=eos, num_beams=o.num_beams)
    except seq2seq_decode.Seq2SeqError as e:
      raise TaskError(f"{getattr(examples[start], 'where', '')}: {e}") from None
  texts = [tokenizer.decode([t for t in row if t != eos]) for row in outputs]
  refs = [[ex.target] for ex in examples]
  records = [{"index": i, "source": ex.source, "prediction": text, "reference": ex.target,
              "exact_match": M.exact_match_one(text, ref), "f1": M.token_f1_one(text, ref)}
             for i, (ex, text, ref) in enumerate(zip(examples, texts, refs))]
  return Result(M.text_metrics(texts, refs, names), records)
