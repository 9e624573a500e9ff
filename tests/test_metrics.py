"""FLOPs accounting, MFU inputs, and the metric writers."""
import json
import math

import pytest

from llmjax import metrics
from llmjax.model import TransformerConfig


def test_flops_per_token_matches_the_hand_count():
  cfg = TransformerConfig(vocab_size=65, num_layers=4, num_heads=4, embed_dim=128, max_seq_len=64,
                          use_bias=False)
  d, f, L, T, V = 128, 512, 4, 64, 65
  per_layer_weights = 4 * d * d + 2 * d * f           # q, k, v, out + fc, proj
  norms = L * 2 * d + d
  expected = 6 * (L * per_layer_weights + norms + V * d) + 12 * L * d * T
  assert metrics.flops_per_token(cfg, T) == expected


def test_flops_follow_grouped_query_attention():
  mha = TransformerConfig(num_heads=8, embed_dim=256, num_layers=2)
  gqa = TransformerConfig(num_heads=8, num_kv_heads=2, embed_dim=256, num_layers=2)
  saved = 6 * 2 * (2 * 256 * 256 - 2 * 256 * 64 + 2 * 256 - 2 * 64)  # smaller K/V kernels (+bias)
  assert metrics.flops_per_token(mha, 64) - metrics.flops_per_token(gqa, 64) == saved


def test_peak_flops_from_config_or_measured():
  assert metrics.peak_flops_per_device(123.0) == (123.0, "config")
  flops, source = metrics.peak_flops_per_device()
  assert flops > 1e9 and source  # CPU: measured once


def test_bits_per_byte():
  assert metrics.bits_per_byte(math.log(2), tokens=10, num_bytes=10) == pytest.approx(1.0)
  assert metrics.bits_per_byte(math.log(2), tokens=10, num_bytes=40) == pytest.approx(0.25)


def test_writer_jsonl_tensorboard_and_plot(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
  for step in (10, 20, 30):
    w.write(step, {"loss": 3.0 / step, "lr": 1e-3})
  w.write(30, {"loss": 0.2}, prefix="val")
  w.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [10, 20, 30, 30] and lines[-1]["split"] == "val"
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  png = metrics.plot_loss_curve(str(tmp_path))
  assert open(png, "rb").read(4) == b"\x89PNG"
  disabled = metrics.MetricsWriter(str(tmp_path / "other"), enabled=False)
  disabled.write(1, {"loss": 1.0})
  assert not (tmp_path / "other").exists()


def test_writer_without_tensorboardx_writes_jsonl_and_a_note(tmp_path, monkeypatch, capsys):
  """tensorboardX is optional (GPU images may lack it): the writer says so once and goes on."""
  import sys
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes `import tensorboardX` fail
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
  writer.write(1, {"loss": 2.5})
  writer.close()
  assert "tensorboardX is not installed" in capsys.readouterr().out
  assert json.loads((tmp_path / metrics.METRICS_FILE).read_text())["loss"] == 2.5
  assert not (tmp_path / "tensorboard").exists()
