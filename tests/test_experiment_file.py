"""llmjax.experiment: experiment files loaded from Python as --config=FILE[:ARGUMENT] loads them."""
import pytest

from conftest import ROOT
from llmjax import experiment


def test_bare_name_path_and_argument_load_the_same_experiment_file():
  by_name = experiment.load_config("gpt_small")
  by_path = experiment.load_config(ROOT / "experiments" / "gpt_small.py")
  assert by_name.to_dict() == by_path.to_dict()
  assert by_name.model.num_layers == 12
  tiny = experiment.load_config("bert_small.py", "tiny")  # FILE:ARGUMENT
  assert tiny.model.num_layers < experiment.load_config("bert_small").model.num_layers
  module = experiment.load_module("shakespeare_char")
  assert callable(module.get_config)


def test_a_missing_experiment_file_names_both_places_looked():
  with pytest.raises(FileNotFoundError, match="no experiment file 'nope'.*experiments/nope.py"):
    experiment.load_config("nope")


def test_overrides_set_fields_as_the_command_line_does():
  config = experiment.override(experiment.load_config("shakespeare_char"),
                               ["model.num_layers=2", "optim.lr=3e-4", "model.matmul_dtype=bfloat16",
                                "train.progress=False"])
  assert config.model.num_layers == 2 and config.optim.lr == 3e-4
  assert config.model.matmul_dtype == "bfloat16" and config.train.progress is False
  with pytest.raises(ValueError, match="no field 'model.num_layer'"):
    experiment.override(config, ["model.num_layer=2"])
  with pytest.raises(ValueError, match="not section.field=value"):
    experiment.override(config, ["model.num_layers"])
