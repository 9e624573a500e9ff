"""Never mix up or lose a run (issue 14): the workdir lock, a stranger's files, evaluating on
another corpus, resuming on another corpus, token ids beyond the vocabulary, runs whose every
update was skipped, damaged checkpoints, tokenizers stored in checkpoints, and one-line errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import _ckpt_util as u
from conftest import ROOT, run_cli
from llmjax import workdir as workdir_lib


def one_line_error(result, status=2):
  """Exit status `status`, exactly one line on stderr (ours), no traceback."""
  assert result.returncode == status, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("llmjax: error: "), result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6. Tests copy it before changing anything."""
  w = tmp_path_factory.mktemp("robust") / "run"
  u.train(w, "--config.train.steps=6", "--config.train.checkpoint_every=3")
  return w


def copy_run(trained, tmp_path) -> Path:
  w = tmp_path / "run"
  shutil.copytree(trained, w)
  (w / workdir_lib.LOCK_FILE).unlink(missing_ok=True)
  return w


def truncate_largest_array_file(workdir: Path, step: int) -> Path:
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:
    f.truncate(victim.stat().st_size // 3)
  return victim


# -- 1. one process per workdir ---------------------------------------------------------------------

_HOLD = ("import sys, time; from pathlib import Path; from llmjax import workdir; "
         "workdir.lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def test_lock_names_the_holder_and_a_dead_holders_lock_is_not_stale(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {holder.pid} on host "):
      workdir_lib.lock(tmp_path)
  finally:
    holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
    holder.wait()
  assert (tmp_path / workdir_lib.LOCK_FILE).exists()
  workdir_lib.lock(tmp_path)  # the kernel dropped the dead process's lock
  workdir_lib.release(tmp_path)


def test_second_training_process_on_the_same_workdir_is_refused(tmp_path):
  w = tmp_path / "run"
  first = u.start(w, "--config.train.steps=400", "--config.train.checkpoint_every=0",
                  extra_env={"LLMJAX_TEST_STEP_DELAY_S": "0.05"})
  try:
    u.wait_for(lambda: (w / "metrics.jsonl").exists() and (w / "metrics.jsonl").stat().st_size,
               first)
    second = u.train(w, "--config.train.steps=400", "--config.optim.lr=0.01", check=False)
    line = one_line_error(second)
    assert f"is in use by pid {first.pid} on host" in line
    assert json.loads((w / "config.json").read_text())["optim"]["lr"] == 1e-3  # untouched
  finally:
    u.kill(first, signal.SIGTERM)
  assert first.returncode == 0  # the first run was not disturbed and stopped cleanly
  steps = [r["step"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())]
  assert len(steps) == len(set(steps))  # no line written twice


# -- 3. files that are not ours ---------------------------------------------------------------------

def test_hf_export_refuses_to_overwrite_a_file_and_names_it(tmp_path):
  import flax.linen as nn
  import jax
  from llmjax import convert, runs
  from llmjax.data import CharTokenizer
  from llmjax.model import Transformer
  w = tmp_path / "run"
  config = runs.cfglib.default_config()
  config.model.update(num_layers=1, num_heads=2, embed_dim=16, max_seq_len=16, position="rotary",
                      norm="rmsnorm", mlp="swiglu", use_bias=False)
  tokenizer = CharTokenizer(list("abcdefgh "))
  model = Transformer(runs.cfglib.model_config(config, tokenizer.vocab_size))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
  runs.create_run(w, config, params, tokenizer)
  out = tmp_path / "hf"
  out.mkdir()
  (out / "config.json").write_text('{"mine": true}')
  with pytest.raises(convert.ConversionError, match="config.json already exists"):
    convert.export_hf(w, out)
  assert (out / "config.json").read_text() == '{"mine": true}'
  assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing else written either
  (out / "config.json").unlink()
  written = convert.export_hf(w, out)
  assert "config.json" in written and (out / "model.safetensors").exists()
  assert not list(out.glob(".llmjax-export-*"))


# -- 4. evaluating on another corpus ----------------------------------------------------------------

@pytest.mark.slow  # several training/eval processes: run with -m slow
def test_eval_mode_uses_data_val_path_and_names_ignored_fields(trained, tmp_path):
  own = run_cli(["-m", "llmjax.main", "--mode=eval", f"--workdir={trained}"], env_extra=u.env())
  assert own.returncode == 0, own.stderr[-2000:]
  val = tmp_path / "val.txt"
  from llmjax.data.sources import embedded_documents
  val.write_text("".join(embedded_documents()[-3:])[:20000].upper())  # other text, same chars
  other = run_cli(["-m", "llmjax.main", "--mode=eval", f"--workdir={trained}",
                   "--config=experiments/shakespeare_char.py", f"--config.data.val_path={val}",
                   "--config.train.eval_batches=2", "--config.optim.lr=0.5"], env_extra=u.env())
  assert other.returncode == 0, other.stderr[-2000:]
  assert "ignores optim.lr" in other.stderr and f"evaluating on data.val_path='{val}'" in other.stderr
  a, b = json.loads(own.stdout.splitlines()[-1]), json.loads(other.stdout.splitlines()[-1])
  assert a["loss"] != b["loss"] and b["data"]["val_path"] == str(val)
  assert Path(a["written_to"]) != Path(b["written_to"])  # the run's own figures stay
  assert json.loads(Path(a["written_to"]).read_text())["loss"] == a["loss"]


# -- 5. resuming on another corpus ------------------------------------------------------------------

@pytest.mark.slow  # several training/eval processes: run with -m slow
def test_resume_on_another_corpus_is_refused_unless_confirmed(trained, tmp_path):
  w = copy_run(trained, tmp_path)
  corpus = tmp_path / "other.txt"
  from llmjax.data.sources import embedded_documents
  corpus.write_text("".join(embedded_documents()[:40]))
  line = one_line_error(u.train(w, "--config.train.steps=7", f"--config.data.path={corpus}",
                                check=False))
  assert "cannot resume" in line and "another corpus" in line and "data.path ''" in line
  assert "--allow_corpus_change" in line
  assert u.complete_steps(w) == [3, 6]
  ok = u.train(w, "--config.train.steps=7", f"--config.data.path={corpus}",
               "--allow_corpus_change")
  assert "continuing step 6 on another corpus" in ok.stdout
  assert u.complete_steps(w)[-1] == 7


# -- 6. token ids beyond the vocabulary; every update skipped ---------------------------------------

def test_run_whose_every_update_was_skipped_does_not_exit_0(tmp_path):
  r = u.train(tmp_path / "run", "--config.train.steps=3", "--config.train.nonfinite_policy=skip",
              "--config.train.inject_nan_grads=1,2,3", check=False)
  line = one_line_error(r, status=1)
  assert "every update of steps 1..3 was skipped" in line
  assert u.complete_steps(tmp_path / "run") == []


def test_check_token_ids_sampled_for_huge_files(monkeypatch):
  from llmjax.data import sources
  tokens = np.zeros(10_000, np.uint16)
  tokens[7_777] = 300
  with pytest.raises(sources.DataError, match="token id 300, outside the tokenizer's vocabulary"):
    sources.check_token_ids(tokens, 256, "x.bin")
  monkeypatch.setattr(sources, "FULL_SCAN_TOKENS", 1000)  # "huge": sampled chunks, ends included
  monkeypatch.setattr(sources, "CHUNK", 100)
  tokens[:] = 0
  tokens[-1] = 256
  with pytest.raises(sources.DataError, match="token id 256"):
    sources.check_token_ids(tokens, 256, "x.bin")


def test_every_batch_is_checked_against_the_vocabulary():
  from llmjax.data import batches, sources
  tokens = np.zeros(5000, np.int32)
  tokens[::97] = 400
  ds = batches.TokenDataset(train=tokens, val=tokens, tokenizer=None, seq_len=16, vocab_size=256)
  with pytest.raises(sources.DataError, match="hold id 400"):
    for step in range(50):
      ds.batch("train", step, 8)


# -- 7/8. damaged checkpoints and the tokenizer stored with each checkpoint ------------------------

def test_truncated_latest_checkpoint_falls_back_and_is_moved_aside(trained, tmp_path, capsys):
  w = copy_run(trained, tmp_path)
  truncate_largest_array_file(w, 6)
  # explicit step: a clear one-line error naming the step, for eval and generate
  line = one_line_error(run_cli(["-m", "llmjax.main", "--mode=eval", f"--workdir={w}",
                                 "--step=6"], env_extra=u.env()))
  assert "checkpoint step 6 in" in line and "is damaged" in line
  line = one_line_error(run_cli(["-m", "llmjax.generate", f"--workdir={w}", "--step=6",
                                 "--prompt=a", "--max_new_tokens=2"], env_extra=u.env()))
  assert "checkpoint step 6 in" in line and "is damaged" in line
  line = one_line_error(u.train(tmp_path / "new", "--config.train.steps=1",
                                f"--config.train.init_from={w}:6", check=False))
  assert "checkpoint step 6 in" in line and "is damaged" in line
  from llmjax import checkpoint as ckpt
  from llmjax import convert, runs
  with pytest.raises(ckpt.CheckpointError, match="checkpoint step 6 in .* is damaged"):
    convert.export_hf(w, tmp_path / "hf", step=6)
  # without --step, readers use the newest checkpoint that restores and leave the files alone
  assert runs.load_run(w).step == 3
  assert "is damaged" in capsys.readouterr().err and (w / "checkpoints" / "6").is_dir()
  # and with the tokenizer file gone too, training resumes from step 3
  (w / "tokenizer.json").unlink()
  r = u.train(w, "--config.train.steps=8", "--config.train.checkpoint_every=3")
  assert "restored the tokenizer (tokenizer.json) from checkpoint step 6" in r.stdout
  assert "checkpoint step 6 is damaged" in r.stdout and "resumed from step 3" in r.stdout
  assert (w / "checkpoints" / "6.damaged" / "state").is_dir()  # moved aside, not deleted
  assert u.complete_steps(w) == [3, 6, 8]
  assert json.loads((w / "tokenizer.json").read_text())["kind"] == "char"
  train = [r["step"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"]
  assert train == list(range(1, 9))  # steps 4..6 logged once, from the resumed run


@pytest.mark.slow  # several training/eval processes: run with -m slow
def test_generate_restores_a_deleted_tokenizer_from_the_checkpoint(trained, tmp_path):
  w = copy_run(trained, tmp_path)
  (w / "tokenizer.json").unlink()
  r = run_cli(["-m", "llmjax.generate", f"--workdir={w}", "--prompt=the ", "--max_new_tokens=4",
               "--temperature=0"], env_extra=u.env())
  assert r.returncode == 0, r.stderr[-2000:]
  assert "restored the tokenizer" in r.stderr and (w / "tokenizer.json").exists()


# -- 12. a first save killed mid-way ---------------------------------------------------------------

@pytest.mark.slow  # several training/eval processes: run with -m slow
def test_restart_from_step_0_drops_the_lost_runs_metrics(tmp_path):
  """A run killed during its first save has metrics lines but no checkpoint: the restart from
  step 0 logs those steps again, so each must appear once."""
  w = tmp_path / "run"
  first = u.start(w, "--config.train.steps=400", "--config.train.checkpoint_every=0",
                  extra_env={"LLMJAX_TEST_STEP_DELAY_S": "0.05"})
  u.wait_for(lambda: (w / "metrics.jsonl").exists()
             and len((w / "metrics.jsonl").read_text().splitlines()) >= 3, first)
  u.kill(first)  # SIGKILL before any checkpoint
  assert u.complete_steps(w) == []
  u.train(w, "--config.train.steps=4")
  steps = [r["step"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"]
  assert steps == [1, 2, 3, 4]


# -- 11. the non-finite halt names the first bad step and the real latest checkpoint ---------------

def test_nonfinite_halt_with_default_log_every_names_first_bad_step(tmp_path):
  r = u.train(tmp_path / "run", "--config.train.steps=30", "--config.train.log_every=50",
              "--config.train.checkpoint_every=2", "--config.train.inject_nan_grads=5",
              check=False)
  line = one_line_error(r, status=1)
  assert "non-finite loss or gradients at step 5;" in line
  assert f"latest checkpoint: step 4 ({tmp_path / 'run' / 'checkpoints' / '4'})" in line


# -- 9. every bad input: one line, exit status 2, no traceback --------------------------------------

def _hf_dir(tmp_path, config_text, truncate_weights):
  from safetensors.numpy import save_file
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text(config_text)
  save_file({"transformer.wte.weight": np.zeros((8, 8), np.float32)}, str(d / "model.safetensors"))
  if truncate_weights:
    with open(d / "model.safetensors", "r+b") as f:
      f.truncate(100)
  return d


_GPT2 = json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
                    "n_positions": 8, "vocab_size": 8})


def _setup(case, tmp_path, trained):
  """(argv, text the error line must contain) for one bad input."""
  w = tmp_path / "run"
  main = lambda *a: ["-m", "llmjax.main", *u.TINY, f"--workdir={w}", "--config.train.steps=2", *a]
  if case == "missing_config_file":
    return ["-m", "llmjax.main", "--config=experiments/nope.py", f"--workdir={w}"], "nope.py"
  if case == "config_syntax_error":
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n  pass\n")
    return ["-m", "llmjax.main", f"--config={bad}", f"--workdir={w}"], "line 1: syntax error"
  if case == "unknown_variant":
    return (["-m", "llmjax.main", "--config=experiments/gpt_small.py:nope", f"--workdir={w}"],
            "unknown gpt_small variant 'nope'")
  if case == "empty_workdir":
    return ["-m", "llmjax.main", *u.TINY, "--workdir="], "--workdir is empty"
  if case == "strangers_config_json":
    w.mkdir()
    (w / "config.json").write_text('{"my": "own file"}')
    return main(), "holds config.json"
  if case == "odd_length_bin":
    (tmp_path / "odd.bin").write_bytes(b"\x01" * 1001)
    return (main(f"--config.data.path={tmp_path / 'odd.bin'}", "--config.data.tokenizer=byte",
                 "--config.model.vocab_size=0"), "not a multiple of 2")
  if case == "bin_with_char_tokenizer":
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    return main(f"--config.data.path={tmp_path / 't.bin'}"), "data.tokenizer='char'"
  if case == "token_ids_beyond_vocab":
    (np.arange(5000) % 300).astype(np.uint16).tofile(tmp_path / "t.bin")
    return (main(f"--config.data.path={tmp_path / 't.bin'}", "--config.data.tokenizer=byte",
                 "--config.model.vocab_size=0"), "token id 299, outside the tokenizer's vocabulary")
  if case == "model_vocab_below_tokenizer":
    return (main("--config.data.tokenizer=byte", "--config.model.vocab_size=100"),
            "model.vocab_size=100 is smaller than the byte tokenizer's 256 ids")
  if case == "missing_val_path":
    return main("--config.data.val_path=/nonexistent/val.txt"), "data.val_path='/nonexistent"
  if case == "resume_char_outside_vocab":
    w = copy_run(trained, tmp_path)
    corpus = tmp_path / "snow.txt"
    corpus.write_text("snow \u2603 " * 2000)
    return (["-m", "llmjax.main", *u.TINY, f"--workdir={w}", "--config.train.steps=8",
             f"--config.data.path={corpus}"], "character '\u2603' is not in")
  if case == "hf_import_truncated_safetensors":
    d = _hf_dir(tmp_path, _GPT2, truncate_weights=True)
    return (["-m", "llmjax.convert", "hf_import", f"--hf_dir={d}", f"--workdir={w}"],
            f"{d / 'model.safetensors'} cannot be read")
  if case == "hf_import_invalid_config_json":
    d = _hf_dir(tmp_path, _GPT2[:-5], truncate_weights=False)
    return (["-m", "llmjax.convert", "hf_import", f"--hf_dir={d}", f"--workdir={w}"],
            f"{d / 'config.json'} is not valid JSON")
  raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing_config_file", "config_syntax_error", "unknown_variant", "empty_workdir",
    "strangers_config_json", "odd_length_bin", "bin_with_char_tokenizer",
    "token_ids_beyond_vocab", "model_vocab_below_tokenizer", "missing_val_path",
    "resume_char_outside_vocab", "hf_import_truncated_safetensors",
    "hf_import_invalid_config_json"])
def test_bad_input_is_one_line_exit_2_no_traceback(case, tmp_path, trained):
  argv, expected = _setup(case, tmp_path, trained)
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  line = one_line_error(run_cli(argv, env_extra=u.env(), timeout=300))
  assert expected in line, line
  for path, content in before.items():  # nothing the user had was changed
    assert path.read_bytes() == content, path


# -- 13. a step that cannot fit the device ----------------------------------------------------------

def test_step_that_cannot_fit_is_refused_before_its_first_step(tmp_path):
  w = tmp_path / "run"
  t0 = time.time()
  r = u.train(w, "--config.train.steps=2", "--config.train.device_memory=300000", check=False)
  line = one_line_error(r)
  assert "the train step needs" in line and "but the device has 0.3 MiB (train.device_memory)" in line
  assert "grad_accum_steps=auto" in line and "remat_policy" in line
  assert not (w / "metrics.jsonl").exists() and u.complete_steps(w) == []  # no step ran
  assert time.time() - t0 < 120


def test_grad_accum_auto_trains_with_the_accumulation_that_fits(tmp_path):
  """TINY's step needs 3.1 MB without accumulation, 1.9 MB with 2 micro-batches, 1.15 MB with 4
  (XLA:CPU analysis): under a 1.5 MB limit, 'auto' trains with 4."""
  w = tmp_path / "run"
  r = u.train(w, "--config.train.steps=2", "--config.train.grad_accum_steps=auto",
              "--config.train.device_memory=1500000")
  assert "train.grad_accum_steps=auto: 4 micro-batches of 2 sequences fit" in r.stdout
  assert json.loads((w / "config.json").read_text())["train"]["grad_accum_steps"] == 4
  assert u.complete_steps(w) == [2]


@pytest.mark.slow  # seven compiles in this process
def test_grad_accum_auto_picks_the_smallest_accumulation_that_fits():
  from llmjax import config as cfglib
  from llmjax import memory
  from llmjax import sharding as shd
  c = cfglib.default_config()
  c.model.update(num_layers=1, num_heads=2, embed_dim=32, max_seq_len=64)
  c.data.update(seq_len=64, batch_size=16)
  c.train.update(grad_accum_steps=1)
  mesh = shd.make_mesh(c)
  model_config = cfglib.model_config(c, 64)
  sizes = {a: memory.step_memory(memory.programlib.build(
      _with_accum(c, a), mesh, model_config), ())["peak_bytes"] for a in (1, 2, 4)}
  assert sizes[1] > sizes[2] > sizes[4]  # micro-batches shrink the temporaries
  limit = (sizes[4] + sizes[2]) // 2  # 4 micro-batches fit, 2 do not
  c.train.update(grad_accum_steps=0, device_memory=limit)
  logs = []
  program = memory.fit(c, mesh, model_config, (), logs.append)
  assert c.train.grad_accum_steps == 4 and "4 micro-batches of 4 sequences fit" in logs[0]
  assert memory.step_memory(program, ())["peak_bytes"] <= limit
  c.train.update(grad_accum_steps=0, device_memory=1000)  # not even the parameters fit
  with pytest.raises(memory.cfglib.ConfigError, match="does not fit even with "
                     "train.grad_accum_steps=16"):
    memory.fit(c, mesh, model_config, (), logs.append)


def _with_accum(config, accum):
  c = config.copy_and_resolve_references()
  c.train.grad_accum_steps = accum
  return c


# -- 14. the progress bar counts finished steps -----------------------------------------------------

class _Pending:
  """A step's metric that finishes when the test says so (as a device would, later)."""
  def __init__(self):
    self.ready = False

  def is_ready(self):
    return self.ready


class _Bar:
  def __init__(self):
    self.n = 0

  def update(self, k):
    self.n += k


def test_progress_advances_on_finished_steps_not_dispatched_ones():
  from llmjax.loop import InFlight
  bar, seen = _Bar(), []
  inflight = InFlight(bar, lambda metrics, step: seen.append(step))
  steps = {s: _Pending() for s in range(1, 11)}
  for s, p in steps.items():  # ten steps dispatched, none finished: nothing to show yet
    inflight.add(s, {"nonfinite_streak": p})
    inflight.retire()
  assert bar.n == 0 and seen == []
  for s in (1, 2, 3, 5):  # finished out of order: only the in-order prefix counts
    steps[s].ready = True
  inflight.retire()
  assert bar.n == 3 and seen == [1, 2, 3]
  inflight.retire(upto=7)  # a metrics fetch at step 7 waits for it: 4..7 are done
  assert bar.n == 7 and seen == [1, 2, 3, 4, 5, 6, 7]
