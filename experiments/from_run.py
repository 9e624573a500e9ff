"""The configuration of an existing run directory (e.g. one made by `llmjax.convert hf_import`).

  # fine-tune imported weights on new data, in a new run directory
  python -m llmjax.main --config=experiments/from_run.py:runs/llama --workdir=runs/llama_ft \
      --config.train.init_from=runs/llama --config.data.path=my_corpus.txt
  # or keep training in the run directory itself (it resumes from its latest checkpoint)
  python -m llmjax.main --config=experiments/from_run.py:runs/llama --workdir=runs/llama
"""
from llmjax import runs


def get_config(workdir: str):
  if not workdir:
    raise ValueError("name the run directory: --config=experiments/from_run.py:<workdir>")
  return runs.read_config(workdir)
