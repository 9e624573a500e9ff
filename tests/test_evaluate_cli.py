"""`python -m llmjax.evaluate` (the task runner) and `python -m llmjax.lm_eval` (the lm-evaluation-
harness adapter) on a tiny freshly trained run: the two agree on local tasks of every request
type, outputs are written atomically and never overwrite, and bad input is one line, exit 2."""
import dataclasses
import json
import math

import pytest

from conftest import ROOT, run_cli
from llmjax import config as cfglib
from llmjax import loop
from llmjax.data import DataError
from llmjax.eval import runner
from llmjax.eval.tasks import Options, TaskError

TASKS_DIR = ROOT / "tests" / "lm_eval_tasks"
MC, TEXT, GEN = (TASKS_DIR / f"llmjax_toy_{n}.jsonl" for n in ("mc", "text", "gen"))
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 2-layer, 32-wide char model trained for 20 steps on the embedded corpus; context 64, so
  some requests need truncation or several windows."""
  workdir = tmp_path_factory.mktemp("eval") / "run"
  c = cfglib.default_config()
  c.model.update(num_layers=2, embed_dim=32, num_heads=2, max_seq_len=64)
  c.data.update(seq_len=64, batch_size=8)
  c.optim.update(warmup_steps=2, lr=1e-2)
  c.train.update(steps=20, log_every=10, eval_every=0, eval_batches=1, checkpoint_every=0,
                 progress=False, tensorboard=False, sample_tokens=0)
  cfglib.validate(c, 1)
  loop.train(c, str(workdir))
  return workdir


def lines(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def test_lm_eval_adapter_agrees_with_evaluate_on_local_tasks(run_dir, tmp_path):
  lm_eval = pytest.importorskip("lm_eval")  # noqa: F841  (the optional "eval" extra)
  results_path = tmp_path / "lm_eval.json"
  proc = run_cli(["-m", "llmjax.lm_eval", f"--workdir={run_dir}", "--include_path=tests/lm_eval_tasks",
                  "--tasks=llmjax_toy_mc,llmjax_toy_text,llmjax_toy_gen", "--batch_size=8",
                  f"--output_path={results_path}"],
                 env_extra={**OFFLINE, "HF_HOME": str(tmp_path / "hf")})
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  harness = json.loads(results_path.read_text())
  samples = {task: sorted(s, key=lambda r: int(r["doc_id"])) for task, s in harness["samples"].items()}

  # Multiple choice, through both command lines: same accuracy, same log-likelihoods per choice.
  preds = tmp_path / "mc.jsonl"
  proc = run_cli(["-m", "llmjax.evaluate", f"--workdir={run_dir}", f"--data={MC}",
                  f"--output={preds}", "--batch_size=8"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  ours = json.loads(proc.stdout.strip().splitlines()[-1])
  assert ours["format"] == "multiple_choice" and ours["examples"] == 12 and ours["step"] == 20
  assert ours["acc"] == summary["llmjax_toy_mc"]["acc"]
  assert ours["acc_norm"] == summary["llmjax_toy_mc"]["acc_norm"]
  records = lines(preds)
  for rec, sample in zip(records, samples["llmjax_toy_mc"], strict=True):
    theirs = [ll for ll, _ in sample["filtered_resps"]]
    assert rec["loglikelihoods"] == pytest.approx(theirs, abs=1e-5)
    assert rec["answer"] == int(sample["target"])
  assert sum(r["correct"] for r in records) / len(records) == ours["acc"]

  # Rolling log-likelihood of whole documents: the same total per document (char tokenizer: no
  # EOS, so both leave each document's first character unscored).
  text, text_records = runner.evaluate_file(str(run_dir), str(TEXT), batch_size=8)
  assert text["format"] == "text" and text["examples"] == 4
  for rec, sample in zip(text_records, samples["llmjax_toy_text"], strict=True):
    assert -rec["nll"] == pytest.approx(sample["filtered_resps"][0], abs=1e-3)
  assert text["perplexity"] == pytest.approx(math.exp(text["loss"]))
  nats = sum(r["nll"] for r in text_records)
  assert text["loss"] == pytest.approx(nats / text["tokens"])
  assert text["bits_per_byte"] == pytest.approx(nats / (math.log(2) * text["bytes"]))
  # one document is longer than the context, so it was scored in several windows
  assert max(r["tokens"] for r in text_records) > 64

  # Generation until a newline: the same text for every prompt.
  gen, gen_records = runner.evaluate_file(
      str(run_dir), str(GEN), batch_size=8, options=Options(max_new_tokens=12, stop=["\n"]))
  assert [r["prediction"] for r in gen_records] == [s["filtered_resps"][0]
                                                      for s in samples["llmjax_toy_gen"]]
  assert gen["exact_match"] == summary["llmjax_toy_gen"]["exact_match"]
  assert set(gen) >= {"exact_match", "f1", "bleu", "rougeL"}


def test_generation_metrics_score_the_generated_text(run_dir, tmp_path):
  # Sampling is reproducible with a seed and differs from greedy decoding and from another seed.
  sample = Options(max_new_tokens=12, temperature=1.0, seed=1, stop=["\n"])
  first, records = runner.evaluate_file(str(run_dir), str(GEN), batch_size=4, options=sample)
  again = runner.evaluate_file(str(run_dir), str(GEN), batch_size=4, options=sample)[1]
  other = runner.evaluate_file(str(run_dir), str(GEN), batch_size=4,
                               options=dataclasses.replace(sample, seed=2))[1]
  greedy = runner.evaluate_file(str(run_dir), str(GEN), batch_size=4,
                                options=Options(max_new_tokens=12, stop=["\n"]))[1]
  texts = [[r["prediction"] for r in recs] for recs in (records, again, other, greedy)]
  assert texts[0] == texts[1] and texts[0] != texts[2] and texts[0] != texts[3]
  assert all("\n" not in t for t in texts[0])  # cut at the stop string
  # The metrics are means of the per-example scores
  assert first["exact_match"] == sum(r["exact_match"] for r in records) / len(records)
  assert first["f1"] == pytest.approx(sum(r["f1"] for r in records) / len(records))
  # Taking the model's own samples as the references (same prompts, order and batches, so the
  # same samples) gives perfect scores.
  echo = tmp_path / "echo.jsonl"
  echo.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["prediction"]}) + "\n"
                          for r in records))
  names = ["exact_match", "f1", "rouge1"]
  perfect, echoed = runner.evaluate_file(str(run_dir), str(echo), batch_size=4,
                                         options=dataclasses.replace(sample, metrics=names))
  assert [r["prediction"] for r in echoed] == texts[0]
  assert perfect["exact_match"] == 1.0 and perfect["f1"] == 1.0
  assert list(perfect)[-3:] == names and perfect["rouge1"] > 0


def test_bad_input_is_one_line(run_dir, tmp_path):
  def bad(name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)

  mc = '{"prompt": "a", "choices": [" b", " c"], "answer": %d}\n'
  cases = [
      (bad("malformed.jsonl", mc % 0 + "{not json\n"), r"malformed.jsonl:2"),
      (bad("empty.jsonl", ""), r"empty.jsonl"),
      (bad("range.jsonl", mc % 0 + mc % 2), r"range.jsonl:2: 'answer' 2 is out of range for 2"),
      (bad("unknown_char.jsonl", '{"text": "\u4e2d\u6587"}\n'), r"unknown_char.jsonl:1: cannot encode"),
  ]
  for path, message in cases:
    with pytest.raises((TaskError, DataError), match=message):
      runner.evaluate_file(str(run_dir), path)
  with pytest.raises(FileNotFoundError, match="is not an llmjax run directory"):
    runner.evaluate_file(str(tmp_path), str(MC))
  with pytest.raises(TaskError, match="not a metric of multiple_choice data; choose from acc"):
    runner.evaluate_file(str(run_dir), str(MC), options=Options(metrics=["bleu"]))

  # Through the command line: one line on stderr, exit status 2, and nothing overwritten.
  out = tmp_path / "kept.jsonl"
  out.write_text("precious\n")
  for args, message in [
      ([f"--data={cases[0][0]}"], "malformed.jsonl:2"),
      ([f"--data={MC}", f"--output={out}"], "exists; choose another path or pass --overwrite"),
  ]:
    proc = run_cli(["-m", "llmjax.evaluate", f"--workdir={run_dir}", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert out.read_text() == "precious\n"
