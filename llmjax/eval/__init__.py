"""Evaluation: metrics, batched scoring of a run on its mesh, the task runner
(`python -m llmjax.evaluate`) and the lm-evaluation-harness adapter (`python -m llmjax.lm_eval`)."""
