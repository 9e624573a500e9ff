"""Benchmarks and the issue's bars: the throughput script's JSON, the nanoGPT reference, the CPU
device option, and (slow) validation loss <= 1.89 after 2000 steps on tiny Shakespeare."""
import json
import math

import pytest

from conftest import ROOT, SHAKESPEARE, run_cli
from llmjax import config as cfglib
from llmjax.cpu_devices import choose_cpu_devices


def test_train_throughput_tiny_writes_json(tmp_path):
  out = tmp_path / "throughput.json"
  proc = run_cli(["benchmarks/train_throughput.py", "--tiny", "--peak_flops=1e11", f"--out={out}"],
                 timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tokens/s" in proc.stdout and "MFU" in proc.stdout
  report = json.loads(out.read_text())
  for key in ("date", "machine", "peak_flops", "peak_source", "rounds", "command", "results"):
    assert key in report
  entry = report["results"]["tiny"]["llmjax"]
  assert entry["samples"] >= 2 and entry["devices"] >= 1
  assert entry["ms_per_step"] > 0 and entry["ms_per_step_min"] <= entry["ms_per_step"]
  # tokens/s and MFU are consistent with ms/step, the batch shape and the FLOPs per token
  assert entry["tokens_per_sec"] == pytest.approx(12 * 64 / entry["ms_per_step"] * 1e3)
  flops = entry["flops_per_token"] * 12 * 64 / (entry["ms_per_step"] / 1e3)
  assert entry["mfu"] == pytest.approx(flops / 1e11)
  assert 0 < entry["mfu"] < 1
  # It trains on tiny Shakespeare when ../shared has it (65 characters), else on the embedded
  # corpus (its own character set): the loss starts near ln(vocabulary) either way.
  assert report["data"] == (str(SHAKESPEARE) if SHAKESPEARE.exists() else "embedded corpus")
  if SHAKESPEARE.exists():
    assert entry["vocab_size"] == 65
  else:
    from llmjax.data import CharTokenizer
    from llmjax.data.sources import embedded_documents
    assert entry["vocab_size"] == CharTokenizer.from_text("\n\n".join(embedded_documents())).vocab_size
  assert entry["final_loss"] < math.log(entry["vocab_size"]) + 0.03


def test_train_throughput_rejects_unknown_config():
  proc = run_cli(["benchmarks/train_throughput.py", "--configs=nope", "--peak_flops=1"], timeout=60)
  assert proc.returncode == 2 and "unknown config 'nope'" in proc.stderr


def test_nanogpt_reference_matches_llmjax_model_size():
  torch = pytest.importorskip("torch", reason="the nanoGPT reference needs the bench extra (torch)")
  import sys
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import nanogpt_reference as ref
  from llmjax.model import TransformerConfig, num_params

  torch.manual_seed(0)
  model = ref.GPT(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
  ours = TransformerConfig(vocab_size=65, num_layers=4, num_heads=4, embed_dim=128, max_seq_len=64,
                           use_bias=False, tie_embeddings=True)
  assert sum(p.numel() for p in model.parameters()) == num_params(ours)
  assert model.lm_head.weight is model.wte.weight
  # nanoGPT's lr schedule: warmup from lr/(warmup+1), cosine to min_lr at lr_decay_iters
  assert ref.get_lr(0, 1e-3, 1e-4, 100, 2000) == pytest.approx(1e-3 / 101)
  assert ref.get_lr(100, 1e-3, 1e-4, 100, 2000) == pytest.approx(1e-3)
  assert ref.get_lr(2000, 1e-3, 1e-4, 100, 2000) == pytest.approx(1e-4)
  x, y = torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16))
  _, loss = model(x, y)
  assert abs(loss.item() - 4.17) < 0.3  # ~ln(65) at init


def _config(batch=12, accum=1, cpu_devices=0, data=-1, fsdp=1, tensor=1):
  c = cfglib.default_config()
  c.data.batch_size, c.train.grad_accum_steps = batch, accum
  c.mesh.update(dict(cpu_devices=cpu_devices, data=data, fsdp=fsdp, tensor=tensor))
  return c


def test_cpu_device_count_choice():
  assert choose_cpu_devices(_config(cpu_devices=1), cores=2) == 1       # the default
  assert choose_cpu_devices(_config(cpu_devices=3), cores=2) == 3       # explicit wins
  assert choose_cpu_devices(_config(), cores=2) == 2                    # auto: one per core
  assert choose_cpu_devices(_config(batch=9), cores=2) == 1             # ... dividing the batch
  assert choose_cpu_devices(_config(batch=12, accum=4), cores=4) == 3   # micro-batch of 3
  assert choose_cpu_devices(_config(), cores=64) == 6                   # capped, divides 12
  assert choose_cpu_devices(_config(data=2, tensor=2), cores=2) == 4    # explicit mesh: its size
  assert choose_cpu_devices(_config(data=1, fsdp=-1), cores=2) == 1     # leave XLA's default
  assert cfglib.default_config().mesh.cpu_devices == 1


def test_cpu_devices_validation():
  c = _config(cpu_devices=-2)
  with pytest.raises(cfglib.ConfigError, match="mesh.cpu_devices=-2"):
    cfglib.validate(c)


def test_cpu_devices_reach_the_mesh(tmp_path):
  """--config.mesh.cpu_devices=2 splits the host into 2 XLA devices and shards the batch."""
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={tmp_path}", "--config.mesh.cpu_devices=2",
                  "--config.model.num_layers=1", "--config.model.embed_dim=32",
                  "--config.model.num_heads=2", "--config.train.steps=4", "--config.train.log_every=2",
                  "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
                  "--config.train.progress=False", "--config.train.tensorboard=False"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "mesh data=2 x " in proc.stdout and "over 2 cpu device(s)" in proc.stdout


@pytest.mark.slow
def test_shakespeare_char_quality_bar(tmp_path, shakespeare_path):
  """The issue's quality bar: validation loss <= 1.89 at iteration 2000 (nanoGPT: 1.886).

  The final eval uses 200 batches of 12 x 64 (154k tokens, most of the 111k-token validation
  split) instead of nanoGPT's noisy 20, so the figure is the model's, not the sample's."""
  proc = run_cli(["-m", "llmjax.main", "--config=experiments/shakespeare_char.py",
                  f"--workdir={tmp_path}", f"--config.data.path={shakespeare_path}",
                  "--config.train.eval_every=0", "--config.train.eval_batches=200",
                  "--config.train.sample_tokens=0", "--config.train.progress=False"], timeout=3000)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in records if r["split"] == "val"][-1]
  assert final["step"] == 2000
  assert final["loss"] <= 1.89, f"val loss {final['loss']:.4f} at step 2000 misses the 1.89 bar"


def test_gelu_exact_or_tanh_from_config():
  """GPT-2 (and HF 'gelu_new') use the tanh GELU, nanoGPT the exact one: both from config."""
  import jax
  import jax.numpy as jnp
  from llmjax.model import Transformer, TransformerConfig
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 32
  base = dict(vocab_size=32, num_layers=1, num_heads=2, embed_dim=16, max_seq_len=8)
  assert TransformerConfig().gelu_approximate  # the GPT-2 default
  tanh = Transformer(TransformerConfig(**base))
  exact = Transformer(TransformerConfig(**base, gelu_approximate=False))
  params = tanh.init(jax.random.key(0), tokens)
  a, b = tanh.apply(params, tokens), exact.apply(params, tokens)
  assert not jnp.allclose(a, b) and jnp.allclose(a, b, atol=1e-2)
  assert cfglib.default_config().model.gelu_approximate is True
