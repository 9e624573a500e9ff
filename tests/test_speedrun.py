"""issue 12, levers tried for the speedrun: the squared-ReLU MLP (model.mlp='relu2') and the
warmup-stable-decay schedule (optim.schedule='wsd'). (Muon's own tests are in test_optim.py.)"""
import jax
import numpy as np

from llmjax import config as cfglib


def test_relu2_mlp_and_wsd_schedule():
  import jax.numpy as jnp
  from llmjax.model import Transformer, TransformerConfig
  from llmjax.optim import learning_rate_schedule
  cfg = TransformerConfig(vocab_size=16, num_layers=1, num_heads=2, embed_dim=8, max_seq_len=8,
                          mlp="relu2")
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  assert np.isfinite(np.asarray(model.apply(params, tokens))).all()
  o = cfglib.default_config().optim
  o.update(schedule="wsd", lr=1.0, warmup_steps=10, min_lr_ratio=0.0, cooldown_frac=0.5)
  lr = learning_rate_schedule(o, 110)
  assert float(lr(5)) == 0.5 and float(lr(10)) == 1.0 and float(lr(60)) == 1.0
  np.testing.assert_allclose([float(lr(85)), float(lr(110))], [0.5, 0.0], atol=1e-6)
