"""T5's span-corruption pretraining for encoder-decoders: the seq2seq loss on text whose noise
spans (train.noise_density of the tokens, spans of mean length train.mean_noise_span) are
replaced by sentinel tokens in the source and spelled out after their sentinels in the target
(llmjax/data/seq2seq.py: span_corrupt). The text comes from the usual data.path corpus.
"""
from __future__ import annotations

from llmjax.objectives.seq2seq import Seq2Seq


class SpanCorruption(Seq2Seq):
  name = "span_corruption"

  @classmethod
  def load_dataset(cls, config, tokenizer=None, **options):
    from llmjax import config as cfglib
    from llmjax.data import load_dataset
    from llmjax.data import seq2seq as s2s
    t = config.train
    tokens = load_dataset(config.data, t.seed, tokenizer)
    vocab = cfglib.model_config(config, tokens.tokenizer.vocab_size).vocab_size
    sentinels = s2s.sentinel_ids(tokens.tokenizer, vocab, int(t.span_sentinels))
    return s2s.SpanCorruptionDataset(tokens, sentinels, config.data, t.seed,
                                     float(t.noise_density), float(t.mean_noise_span),
                                     int(config.model.decoder_start_id))
