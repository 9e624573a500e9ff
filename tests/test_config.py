"""Config validation: every user error is one line naming the field and the fix."""
import pytest

from conftest import run_cli
from llmjax import config as cfglib


def base():
  c = cfglib.default_config()
  c.model.update(num_layers=2, num_heads=4, embed_dim=32, max_seq_len=32)
  c.data.update(seq_len=32, batch_size=8)
  return c


def error_of(config, num_devices=1):
  with pytest.raises(cfglib.ConfigError) as e:
    cfglib.validate(config, num_devices)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_defaults_and_experiments_validate():
  cfglib.validate(base(), 1)
  from experiments import gpt_small, llama_small, shakespeare_char
  for c in (shakespeare_char.get_config(), gpt_small.get_config(), gpt_small.get_config("tiny"),
            llama_small.get_config()):
    cfglib.validate(c, 1)


def test_unknown_key_suggests_the_closest_field():
  c = base()
  c.model.num_layerz = 3
  msg = error_of(c)
  assert "unknown config key 'model.num_layerz'" in msg and "model.num_layers" in msg


def test_wrong_type():
  c = base().to_dict()
  c["model"]["num_layers"] = "four"  # as an experiment file that builds its own dict would
  import ml_collections
  c = ml_collections.ConfigDict(c)
  assert "model.num_layers='four' has type str, expected int" in error_of(c)


def test_choice_fields():
  c = base()
  c.model.norm = "batchnorm"
  assert "model.norm='batchnorm' is not one of layernorm, rmsnorm" in error_of(c)


def test_classifier_pooling_choices():
  """model.pooling (issue 9): one of auto/last/first/mean, and BERT's pooler reads the first token
  only."""
  c = base()
  c.model.pooling = "max"
  assert "model.pooling='max' is not one of auto, last, first, mean" in error_of(c)
  for choice in ("auto", "last", "first", "mean"):
    c.model.pooling = choice
    cfglib.validate(c)
  c.model.update(family="encoder", causal=False, pooler=True, pooling="mean")
  assert "model.pooling='mean' conflicts with model.pooler=True" in error_of(c)
  c.model.pooling = "first"
  cfglib.validate(c)


def test_width_not_divisible_by_heads():
  c = base()
  c.model.embed_dim = 30
  assert "model.embed_dim=30 is not divisible by model.num_heads=4" in error_of(c)


def test_heads_not_divisible_by_kv_heads():
  c = base()
  c.model.num_kv_heads = 3
  assert "model.num_heads=4 is not divisible by model.num_kv_heads=3" in error_of(c)


def test_batch_not_divisible_by_data_parallel_size():
  c = base()
  c.data.batch_size = 6
  c.mesh.update(data=4)
  assert "not divisible by the data-parallel size mesh.data*mesh.fsdp=4" in error_of(c, 4)


def test_batch_not_divisible_by_accumulation():
  c = base()
  c.train.grad_accum_steps = 3
  assert "data.batch_size=8 is not divisible by train.grad_accum_steps=3" in error_of(c)


def test_mesh_that_does_not_match_the_devices():
  c = base()
  c.mesh.update(data=2, fsdp=2)
  msg = error_of(c, 8)
  assert "multiplies to" in msg and "8 devices" in msg
  c.mesh.update(data=-1, fsdp=3)
  assert "needs a multiple of 3 devices" in error_of(c, 8)


def test_sequence_longer_than_context_and_mlm_needs_bidirectional():
  c = base()
  c.data.seq_len = 64
  assert "data.seq_len=64 is longer than model.max_seq_len=32" in error_of(c)
  c = base()
  c.train.objective = "masked_lm"
  assert "--config.model.causal=False" in error_of(c)


def test_saved_config_round_trips():
  c = base()
  again = cfglib.from_json(cfglib.to_json(c))
  assert again.to_dict() == c.to_dict()


@pytest.mark.parametrize("override, expected", [
    ("--config.model.foo=1", "unknown config key 'model.foo'"),
    ("--config.model.num_layers=abc", "--config.model.num_layers=abc"),
    ("--config.model.embed_dim=130", "model.embed_dim=130 is not divisible by model.num_heads=4"),
    ("--config.model.pooling=max", "model.pooling='max' is not one of auto, last, first, mean"),
    ("--config.data.path=/nonexistent/corpus*.txt", "matches no file"),
])
def test_cli_reports_one_line_and_exit_status_2(override, expected, tmp_path):
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={tmp_path}", override], timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("llmjax: error:")]
  assert len(lines) == 1 and expected in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
