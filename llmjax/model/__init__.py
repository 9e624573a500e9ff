"""Flax linen Transformer models. Nothing here knows about training, data, meshes or files."""
from llmjax.model.config import TransformerConfig, num_params
from llmjax.model.transformer import REMAT_POLICIES, Transformer, unstack_layers

__all__ = ["TransformerConfig", "Transformer", "REMAT_POLICIES", "num_params", "unstack_layers"]
