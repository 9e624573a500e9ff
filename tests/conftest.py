"""Shared fixtures. Tests run on CPU; multi-device tests start their own subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N, because that flag must be set before JAX starts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout holds optional data (tiny Shakespeare). A fresh clone has none, and
# every test must pass either way: LLMJAX_SHARED_DIR=/nonexistent runs the suite as such a clone
# does (subprocesses and benchmarks inherit it), .ci/run checks it.
SHARED = Path(os.environ.get("LLMJAX_SHARED_DIR") or ROOT.parent / "shared")
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent JAX compilation cache for the whole run, read by the in-process tests and by every
# CLI subprocess they start (they inherit os.environ): a resumed run, `generate` after `main`, and
# the many tests that build the same tiny programs then compile each program once. On the CLI-heavy
# modules (test_lora, test_resume, test_train_cli, test_seq2seq; one process, load ~6) it cut CPU
# time from 539 to 433 s, starting from an empty cache as CI does. Entries are keyed by the jax
# version, backend, flags and the program, so reusing the directory across runs is safe;
# LLMJAX_TEST_JAX_CACHE moves it.
JAX_CACHE = Path(os.environ.get("LLMJAX_TEST_JAX_CACHE", "/tmp/llmjax-test-jax-cache"))
JAX_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(JAX_CACHE),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # tiny test programs compile in < 1 s
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(2 << 30),  # bytes; least recently used entries go
}
for _name, _value in JAX_CACHE_ENV.items():
  os.environ.setdefault(_name, _value)
# The suite's many short CLI runs stay single-process even where a config or a user's
# environment asks for one process per core (mesh.cpu_processes=0; tests/test_cpu_processes.py
# covers that path)
os.environ.setdefault("LLMJAX_CPU_PROCESSES", "1")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running (minutes); run with `pytest -m slow`")
  config.addinivalue_line("markers", "uses_shared: behaves differently with and without ../shared "
                          "(set automatically); .ci/run reruns these from a clone without it")


def _uses_shared(item) -> bool:
  """Tests reach ../shared only through this file's SHARED / SHAKESPEARE / shakespeare_path."""
  if "shakespeare_path" in getattr(item, "fixturenames", ()):
    return True
  module = getattr(item, "module", None)
  names = vars(module) if module is not None else {}
  return names.get("SHAKESPEARE") is SHAKESPEARE or names.get("SHARED") is SHARED


def pytest_collection_modifyitems(config, items):
  for item in items:
    if _uses_shared(item):
      item.add_marker(pytest.mark.uses_shared)
  if config.getoption("-m"):
    return
  skip_slow = pytest.mark.skip(reason="slow test: run with `pytest -m slow`")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)


@pytest.fixture
def shakespeare_path():
  if not SHAKESPEARE.exists():
    pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (../shared is absent in a fresh clone)")
  return str(SHAKESPEARE)


def run_cli(args, env_extra=None, cwd=ROOT, timeout=600, devices=None):
  """Runs `python -m ...` in a fresh interpreter (optionally with N fake CPU devices)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(env_extra or {})
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def execute_notebook(name: str, tmp_path, monkeypatch, timeout: int):
  """Runs notebooks/<name> top to bottom in a real Jupyter kernel of *this* interpreter (so it sees
  the same packages as the tests); returns (executed notebook, its stream output as one string)."""
  import json
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  spec_dir = tmp_path / "jupyter" / "kernels" / "llmjax-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "llmjax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  nbclient.NotebookClient(nb, kernel_name="llmjax-test", timeout=timeout,
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []) if o.get("output_type") == "stream")
  return nb, outputs


def notebook_images(nb) -> list:
  return [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
