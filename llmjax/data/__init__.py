"""Tokenizers, corpus sources and deterministic, per-process batches."""
from llmjax.data.batches import TokenDataset, load_dataset, packed_segments
from llmjax.data.sources import DataError
from llmjax.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer,
                                    build_tokenizer, load_tokenizer)

__all__ = ["TokenDataset", "load_dataset", "packed_segments", "DataError", "ByteTokenizer",
           "CharTokenizer", "SentencePieceTokenizer", "build_tokenizer", "load_tokenizer"]
