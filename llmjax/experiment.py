"""Experiment files (experiments/*.py) loaded from Python, as `--config=FILE[:ARGUMENT]` loads them.

The command line goes through ml_collections' config_flags; benchmarks, tests and recipes that
build on another experiment file use this module instead of repeating importlib's three lines.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

# experiments/ beside the llmjax package: where a bare name ("gpt_small") is looked up
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def resolve(name_or_path: str | Path) -> Path:
  """A path to an existing file as given, else experiments/<name>.py ("gpt_small" or
  "gpt_small.py")."""
  path = Path(name_or_path)
  if path.is_file():
    return path
  named = EXPERIMENTS / (path.name if path.suffix == ".py" else f"{path.name}.py")
  if named.is_file():
    return named
  raise FileNotFoundError(f"no experiment file {name_or_path!r} (looked for {path} and {named})")


def load_module(name_or_path: str | Path) -> ModuleType:
  """The experiment file as a module (its helpers, not only get_config)."""
  path = resolve(name_or_path)
  spec = importlib.util.spec_from_file_location(f"llmjax_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name_or_path: str | Path, argument: str | None = None):
  """get_config() of the experiment file, or get_config(argument) as `FILE:ARGUMENT` calls it."""
  module = load_module(name_or_path)
  return module.get_config() if argument is None else module.get_config(argument)


def parse_value(text: str):
  """A Python literal ("4", "1e-3", "True", "'x'", "(1, 2)") as its value, anything else as the
  string itself ("bfloat16")."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def override(config, items):
  """Sets "section.field=value" items (dotted paths of any depth; values by parse_value) on the
  config, as --config.section.field=value does on the command line; returns the config. An item
  without "=" or naming no field is a ValueError that names it."""
  for item in items:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not section.field=value")
    *path, last = key.strip().split(".")
    node = config
    try:
      for name in path:
        node = node[name]
      node[last]  # noqa: B018  (a field that does not exist is refused, not created)
    except (KeyError, AttributeError):
      raise ValueError(f"override {item!r}: the config has no field {key.strip()!r}") from None
    node[last] = parse_value(text.strip())
  return config
