"""Flax linen Transformer models. Nothing here knows about training, data, meshes or files.

`build_model(cfg)` is the one place a model is constructed from a TransformerConfig: it picks the
module by `cfg.family` from FAMILIES (issue 11 adds "encoder" and "encoder_decoder" entries).
"""
from llmjax.model.config import TransformerConfig, num_params
from llmjax.model.encoder import Encoder
from llmjax.model.encoder_decoder import EncoderDecoder
from llmjax.model.pooling import POOLING, pool_hidden
from llmjax.model.transformer import REMAT_POLICIES, Transformer, unstack_layers

# model family -> linen module class taking the TransformerConfig as its only field
FAMILIES = {"decoder": Transformer, "encoder": Encoder, "encoder_decoder": EncoderDecoder}


def build_model(cfg: TransformerConfig):
  if cfg.family not in FAMILIES:
    raise ValueError(f"model.family={cfg.family!r} is not one of {', '.join(FAMILIES)}")
  return FAMILIES[cfg.family](cfg)


__all__ = ["TransformerConfig", "Transformer", "Encoder", "EncoderDecoder", "REMAT_POLICIES",
           "FAMILIES", "POOLING", "build_model", "num_params", "pool_hidden", "unstack_layers"]
