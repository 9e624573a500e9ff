"""Flax linen Transformer models. Nothing here knows about training, data, meshes or files."""
from llmjax.model.config import TransformerConfig, num_params
from llmjax.model.encoder import Encoder
from llmjax.model.transformer import REMAT_POLICIES, Transformer, unstack_layers

# model.family -> the linen module that implements it (new families register here).
FAMILIES = {"decoder": Transformer, "encoder": Encoder}


def build_model(cfg: TransformerConfig):
  """The linen module for `cfg.family`."""
  try:
    return FAMILIES[cfg.family](cfg)
  except KeyError:
    raise ValueError(f"model.family={cfg.family!r} is not one of {', '.join(FAMILIES)}") from None


__all__ = ["TransformerConfig", "Transformer", "Encoder", "FAMILIES", "build_model",
           "REMAT_POLICIES", "num_params", "unstack_layers"]
