"""Flax linen Transformer models. Nothing here knows about training, data, meshes or files."""
from llmjax.model.config import TransformerConfig, num_params
from llmjax.model.encoder_decoder import EncoderDecoder
from llmjax.model.transformer import REMAT_POLICIES, Transformer, unstack_layers

# Model families by TransformerConfig.family; a new family is one entry here.
FAMILIES = {"decoder": Transformer, "encoder_decoder": EncoderDecoder}


def build_model(cfg: TransformerConfig):
  """The linen module of cfg.family."""
  if cfg.family not in FAMILIES:
    raise ValueError(f"model.family={cfg.family!r} is unknown; choose one of "
                     f"{', '.join(sorted(FAMILIES))}")
  return FAMILIES[cfg.family](cfg)


__all__ = ["TransformerConfig", "Transformer", "EncoderDecoder", "FAMILIES", "build_model",
           "REMAT_POLICIES", "num_params", "unstack_layers"]
