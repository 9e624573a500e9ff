"""benchmarks/gpu.py's CPU dry run: every path of the GPU benchmark (the real train step, decode
steps, the table and the JSON) on tiny shapes, so the script still runs when a GPU turns up."""
import json

from conftest import run_cli


def test_gpu_benchmark_dry_run_writes_every_case(tmp_path):
  out = tmp_path / "gpu.json"
  proc = run_cli(["benchmarks/gpu.py", "--dry_run", f"--out={out}"], timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "DRY RUN" in proc.stdout and "gpt2_small" in proc.stdout and "llama_1b" in proc.stdout
  result = json.loads(out.read_text())
  assert result["environment"]["dry_run"] and result["environment"]["matmul_flops"] > 0
  train = {r["case"]: r for r in result["train"]}
  assert set(train) == {"gpt2_small", "llama_1b"}
  for r in train.values():
    assert "error" not in r, r
    assert r["step_ms_median"] > 0 and 0 < r["mfu_measured_matmul"] < 1
    assert r["loss"] > 0 and r["tokens_per_s"] > 0
  decode = [(r["case"], r["batch"]) for r in result["decode"]]
  assert decode == [("gpt2_small", 1), ("gpt2_small", 64), ("llama_1b", 1), ("llama_1b", 64)]
  for r in result["decode"]:
    assert "error" not in r, r
    assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_bound_measured"]


def test_gpu_benchmark_refuses_a_cpu_without_dry_run_in_one_line():
  proc = run_cli(["benchmarks/gpu.py"], timeout=300)
  assert proc.returncode == 2 and "--dry_run" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
