"""Fine-tuning end to end: experiments/finetune.py, train.keep_best and --step=best (one
resolution function, llmjax.checkpoint.resolve_step), one-line errors for bad task data, and
(slow) the issue's bars: three-digit addition and a classification task from shipped data."""
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import checkpoint as ckpt
from llmjax import config as cfglib
from llmjax.run import parse_init_from

from conftest import ROOT, run_cli


def test_resolve_step_and_init_from_spec(tmp_path):
  assert ckpt.resolve_step(tmp_path, None) is None and ckpt.resolve_step(tmp_path, "") is None
  assert ckpt.resolve_step(tmp_path, 7) == 7 and ckpt.resolve_step(tmp_path, "12") == 12
  with pytest.raises(ckpt.CheckpointError, match="has no best checkpoint .*keep_best"):
    ckpt.resolve_step(tmp_path, "best")
  with pytest.raises(ckpt.CheckpointError, match="'latest' is not a step number or 'best'"):
    ckpt.resolve_step(tmp_path, "latest")
  (tmp_path / "checkpoints").mkdir()
  ckpt.write_best(tmp_path / "checkpoints", {"metric": "val/loss", "value": 1.0, "step": 4,
                                             "mode": "min"})
  assert ckpt.resolve_step(tmp_path, "best") == 4
  assert parse_init_from("runs/a:best") == ("runs/a", "best")
  assert parse_init_from("runs/a:30") == ("runs/a", 30) and parse_init_from("runs/a") == ("runs/a", None)
  assert ckpt.metric_mode("val/loss") == "min" and ckpt.metric_mode("val/accuracy") == "max"
  assert ckpt.metric_mode("macro_f1") == "max" and ckpt.metric_mode("bpb") == "min"


def test_retention_never_deletes_the_best_checkpoint(tmp_path):
  c = ckpt.Checkpointer(str(tmp_path), keep=1, async_save=False)
  state = {"w": jnp.ones((2,))}
  try:
    for step in (1, 2, 3, 4):
      c.save(step, state, {"step": step}, {"step": step}, {})
      c.wait()
      if step == 2:
        ckpt.write_best(c.directory, {"metric": "val/loss", "value": 0.5, "step": 2, "mode": "min"})
    c.save(5, state, {"step": 5}, {"step": 5}, {})
    c.wait()
    # retention runs before each save: keep=1 keeps the latest (4) and the best (2); 1 and 3 went
    assert c.all_steps() == [2, 4, 5]
    assert c.read_meta("best")["step"] == 2
  finally:
    c.close()


def test_keep_best_and_format_validation():
  c = cfglib.default_config()
  c.train.keep_best = "val loss"
  with pytest.raises(cfglib.ConfigError, match="train.keep_best='val loss' must name a validation metric"):
    cfglib.validate(c)
  c = cfglib.default_config()
  c.data.format = "chat"
  with pytest.raises(cfglib.ConfigError, match="data.format='chat' needs task data"):
    cfglib.validate(c)
  c.data.format = "nope"
  with pytest.raises(cfglib.ConfigError, match="data.format='nope' is not one of auto, text, "
                     "prompt_completion, chat, classification, multiple_choice"):
    cfglib.validate(c)


TINY = ["--config.model.num_layers=2", "--config.model.embed_dim=32", "--config.model.num_heads=2",
        "--config.data.seq_len=24", "--config.data.batch_size=4", "--config.train.grad_accum_steps=1",
        "--config.train.progress=False", "--config.train.tensorboard=False",
        "--config.train.sample_tokens=0"]


def write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_bad_task_data_is_one_line_exit_2(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": \n')
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={tmp_path / 'run'}", f"--config.data.path={bad}", *TINY])
  assert proc.returncode == 2, proc.stderr[-1500:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"llmjax: error: {bad}:2: malformed JSON")


@pytest.mark.slow
def test_finetune_experiment_keep_best_and_step_best_everywhere(tmp_path):
  """Pretrain a tiny base; fine-tune it with experiments/finetune.py (init_from=base:best
  resolves through the base's best.json); keep_best retains the best checkpoint; --step=best
  works for --mode=eval, generate and llmjax.evaluate."""
  base = tmp_path / "base"
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={base}", *TINY, "--config.train.steps=20",
                  "--config.train.eval_every=10", "--config.train.eval_batches=2",
                  "--config.train.keep_best=val/loss", "--config.train.checkpoint_every=10"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  best = json.loads((base / "checkpoints" / "best.json").read_text())
  assert best["metric"] == "val/loss" and best["step"] in (10, 20)
  rng = np.random.default_rng(0)
  rows = [{"prompt": f"the {w} is", "completion": f" {w}."}
          for w in rng.choice(["class", "module", "function", "string"], 60)]
  train = write(tmp_path / "train.jsonl", rows[:48])
  val = write(tmp_path / "val.jsonl", rows[48:])
  ft = tmp_path / "ft"
  proc = run_cli(["-m", "llmjax.main", f"--config=experiments/finetune.py:{base}:best",
                  f"--workdir={ft}", f"--config.data.path={train}", f"--config.data.val_path={val}",
                  "--config.train.epochs=2", "--config.train.eval_every=4",
                  "--config.train.keep_checkpoints=1", "--config.train.progress=False",
                  "--config.train.tensorboard=False"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"initialized from {base} step {best['step']}" in proc.stdout
  assert "packing efficiency" in proc.stdout and "best val/loss so far" in proc.stdout
  ft_best = json.loads((ft / "checkpoints" / "best.json").read_text())
  assert (ft / "checkpoints" / str(ft_best["step"])).is_dir()
  config = json.loads((ft / "config.json").read_text())
  assert config["data"]["train_on"] == "completion" and config["optim"]["lr"] == 1e-4
  proc = run_cli(["-m", "llmjax.main", "--mode=eval", f"--workdir={ft}", "--step=best"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"step {ft_best['step']}:" in proc.stdout
  proc = run_cli(["-m", "llmjax.generate_cli", f"--workdir={ft}", "--step=best",
                  "--prompt=the class is", "--max_new_tokens=4"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = run_cli(["-m", "llmjax.evaluate", f"--workdir={ft}", f"--data={val}", "--step=best"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == ft_best["step"]


@pytest.mark.slow
def test_addition_bar(tmp_path):
  """Issue 9's bar: held-out exact match of three-digit addition from ~0 to >= 90% (the benchmark's
  defaults: the issue's plain format "123+456=" -> "579", 4,000 steps with weight decay 0.1; the
  units digit is learned in a transition whose step varies with the seed, see benchmarks/RESULTS.md)."""
  out = tmp_path / "add.json"
  proc = run_cli([str(ROOT / "benchmarks" / "finetune_addition.py"), f"--out={out}",
                  "--skip_all_tokens", f"--workdir={tmp_path / 'runs'}"], timeout=7200)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["base_exact_match"] < 0.05
  assert result["completion_loss"]["exact_match"] >= 0.9


def test_classification_split_never_trains_on_held_out_text(tmp_path):
  """benchmarks/finetune_classify.py's task: training windows lie inside the training regions,
  no region holds a held-out snippet, and the pretraining corpus leaves the held-out text out."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import finetune_classify as fc
  windows, test, plain, regions = fc.topic_sets()
  assert len(test) == 95 and len(plain) == 387 and len(windows) > 4 * len(plain)
  assert {r["label"] for r in windows} == {r["label"] for r in test} == set(fc.TOPICS.values())
  label_of = fc.TOPICS
  held = [r["text"] for r in test]
  for w in windows:
    assert len(w["text"]) >= 119  # words + separating spaces reach 120 with a trailing space
    key = next(k for k, v in label_of.items() if v == w["label"])
    assert any(w["text"] in region for region in regions[key])
  for region in (r for rs in regions.values() for r in rs):
    assert not any(h in region for h in held)
  corpus = fc.write_pretraining_corpus(tmp_path / "corpus", regions)
  import glob
  text = "\n".join(open(f).read() for f in glob.glob(corpus))
  assert not any(h in text for h in held)
  assert all(p["text"] in text for p in plain)
  # the validation split (for choosing the recipe) is carved from the training side: its snippets
  # are training snippets of the test split, and neither they nor the test snippets reach into
  # its training windows
  windows_v, val, plain_v, regions_v = fc.topic_sets(validation=True)
  val_text = [r["text"] for r in val]
  assert len(val) > 80 and not set(val_text) & set(held)
  assert set(val_text) <= {p["text"] for p in plain} and len(plain_v) + len(val) == len(plain)
  assert {r["label"] for r in val} == set(fc.TOPICS.values())
  for region in (r for rs in regions_v.values() for r in rs):
    assert not any(h in region for h in held + val_text)
  for w in windows_v:
    key = next(k for k, v in label_of.items() if v == w["label"])
    assert any(w["text"] in region for region in regions_v[key])


@pytest.mark.slow
def test_classification_bar(tmp_path):
  """A topic-classification task cut from the embedded corpus reaches >= 95% held-out accuracy,
  as the mean over seeds 0, 1 and 2 of benchmarks/finetune_classify.py's defaults (each seed
  pretrains its own base; the recipe, mean pooling with fine-tuning dropout 0.3 for 6 epochs, was
  chosen on the validation split). Narrow: on the shared CPU the seeds gave 90, 90 and 92 of 95
  (mean 0.954; benchmarks/RESULTS.md, issue 9). Long: three 1,500-step pretraining runs."""
  accuracies = []
  for seed in (0, 1, 2):
    out = tmp_path / f"cls{seed}.json"
    proc = run_cli([str(ROOT / "benchmarks" / "finetune_classify.py"), f"--out={out}",
                    f"--seed={seed}", "--skip_scratch", f"--workdir={tmp_path / f'runs{seed}'}"],
                   timeout=7200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sklearn"]["train_windows"]["char_2-5gram"]["accuracy"] >= 0.95
    assert result["pretrained"]["test_accuracy"] == result["test_accuracy"]
    accuracies.append(result["test_accuracy"])
  assert np.mean(accuracies) >= 0.95, accuracies


def test_classifier_pooling_survives_init_from_training_and_evaluation(tmp_path):
  """model.pooling=mean end to end: a language-model base (pooling auto) fine-tuned for
  classification with mean pooling through train.init_from (the head's pooling may differ from
  the base's, resuming with another pooling may not); llmjax.evaluate's logits are the classifier
  applied to the mean of the final hidden states over the real tokens, computed here by hand; and
  HF export refuses a classification model in one line instead of dropping its head."""
  import jax
  from llmjax import convert, loop, runs
  from llmjax.data import packing, task_data
  from llmjax.data.formats import read_examples
  from llmjax.eval.runner import evaluate_file

  def tiny(c):
    c.model.update(num_layers=1, num_heads=2, embed_dim=16, max_seq_len=16)
    c.data.update(seq_len=16, batch_size=4, tokenizer="char")
    c.optim.warmup_steps = 1
    c.train.update(steps=2, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=0,
                   progress=False, tensorboard=False, sample_tokens=0, grad_accum_steps=1)
    return c
  (tmp_path / "corpus.txt").write_text("a good cat sat. a bad dog ran. " * 40)
  base = tiny(cfglib.default_config())
  base.data.path = str(tmp_path / "corpus.txt")
  loop.train(base, str(tmp_path / "base"))
  rows = [{"text": f"{w} {'cat ' * (i % 3)}", "label": w} for i, w in
          enumerate(["good", "bad"] * 10)]
  train, val = write(tmp_path / "t.jsonl", rows[:16]), write(tmp_path / "v.jsonl", rows[16:])
  ft = tiny(cfglib.default_config())
  ft.data.update(path=train, val_path=val, tokenizer="char", packing=False)
  ft.model.pooling = "mean"
  ft.train.update(objective="classification", init_from=str(tmp_path / "base"))
  loop.train(ft, str(tmp_path / "ft"))
  assert json.loads((tmp_path / "ft" / "config.json").read_text())["model"]["pooling"] == "mean"

  summary, records = evaluate_file(str(tmp_path / "ft"), val)
  assert summary["examples"] == 4
  run = runs.load_run(tmp_path / "ft")
  assert run.model_config.pooling == "mean"
  encoder = task_data.Encoder(run.tokenizer, run.config.data, classification=True)
  labels = {"bad": 0, "good": 1}
  examples = read_examples(val).examples
  tokenized = [encoder.encode(ex, task_data.EncodeStats(), labels[ex.label]) for ex in examples]
  built = packing.build_rows(tokenized, [[i] for i in range(len(tokenized))], 16)
  hidden = np.asarray(run.model.apply({"params": run.params}, jnp.asarray(built["inputs"]),
                                      segment_ids=jnp.asarray(built["segment_ids"]),
                                      positions=jnp.asarray(built["positions"]),
                                      return_hidden=True))
  real = np.asarray(built["segment_ids"]) > 0
  assert real.sum(1).min() < real.shape[1]  # every row's padding is excluded, not averaged in
  head = jax.tree.map(np.asarray, run.params["classifier"])
  for i, rec in enumerate(records):
    mean = hidden[i][real[i]].mean(0)
    np.testing.assert_allclose(rec["logits"], mean @ head["kernel"] + head["bias"],
                               rtol=1e-4, atol=1e-5)

  again = tiny(cfglib.from_json((tmp_path / "ft" / "config.json").read_text()))
  again.model.pooling = "last"
  again.train.steps = 3
  with pytest.raises(ckpt.CheckpointError, match=r"model.pooling \(checkpoint 'mean', config 'last'\)"):
    loop.train(again, str(tmp_path / "ft"))
  with pytest.raises(convert.ConversionError, match="a classification model"):
    convert.export_hf(tmp_path / "ft", tmp_path / "hf")
  assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
