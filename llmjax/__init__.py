"""llmjax: train and use Transformer language models with JAX and Flax, from a laptop to a pod."""
__version__ = "0.1.0"
