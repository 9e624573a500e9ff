"""FLOPs and MFU accounting, and the writers: console, metrics.jsonl, TensorBoard, loss-curve PNG."""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np

from llmjax.model.config import TransformerConfig, num_params


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), following PaLM appendix B / nanoGPT:

    6 * N_matmul          every weight matrix: 2 FLOPs per multiply-add forward, 4 backward;
                          N_matmul = all non-embedding parameters + the vocab projection (the
                          lm head, tied or not); an embedding lookup is not a matmul.
    + 12 * L * H * hd * T attention scores (QK^T) and weighted values (AV): 2 matmuls of
                          2*T*hd FLOPs per head per token, times 3 for forward + backward.
  The attention term counts the full T x T square, which is what XLA computes for a causal mask.
  """
  n_layers_params = num_params(cfg, include_embeddings=False)
  n_matmul = n_layers_params + cfg.vocab_size * cfg.embed_dim
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
  return 6.0 * n_matmul + attention


# Dense bf16 peak FLOP/s per chip, from vendor data sheets.
PEAK_FLOPS_BY_KIND = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
    "V100": 125e12, "B200": 2250e12,
}


@functools.lru_cache(maxsize=1)
def measured_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
  """Best fp32 matmul throughput of this host, measured once (XLA CPU uses all cores for it)."""
  a = jax.numpy.ones((size, size), jax.numpy.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * size**3 / best


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where the figure came from). A configured figure wins over the lookup table."""
  if configured > 0:
    return configured, "config"
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS_BY_KIND.items():
    if name.lower() in kind.lower():
      return flops, f"datasheet ({kind})"
  if jax.default_backend() == "cpu":
    # XLA's CPU devices share the host's cores: the host peak is split between them.
    return measured_cpu_peak_flops() / jax.local_device_count(), "measured fp32 matmul"
  return float("nan"), f"unknown device kind {kind!r}; set train.peak_flops"


METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
  """Appends one JSON line per record to metrics.jsonl and mirrors scalars into TensorBoard.

  Only the writing process (process 0) should create one; others get `enabled=False`.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / METRICS_FILE
    self._tb = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        try:  # optional: metrics.jsonl holds every figure; TensorBoard only mirrors it
          from tensorboardX import SummaryWriter
        except ImportError:
          print("llmjax: note: tensorboardX is not installed; writing metrics.jsonl without "
                "TensorBoard event files (pip install tensorboardX, or set "
                "train.tensorboard=False to silence this)", flush=True)
        else:
          self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": prefix}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(workdir: str, filename: str = "loss.png") -> str | None:
  """Train and validation loss against step, from metrics.jsonl, as a PNG."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  for split, style in (("train", "-"), ("val", "o-")):
    pts = [(r["step"], r["loss"]) for r in records if r.get("split") == split and "loss" in r]
    if pts:
      steps, losses = zip(*sorted(dict(pts).items()))
      ax.plot(steps, losses, style, label=f"{split} loss", markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(f"llmjax: {Path(workdir).name}")
  ax.grid(alpha=0.3)
  ax.legend()
  out = str(Path(workdir) / filename)
  fig.tight_layout()
  fig.savefig(out + ".tmp.png")
  plt.close(fig)
  os.replace(out + ".tmp.png", out)
  return out


def bits_per_byte(loss_nats_per_token: float, tokens: int, num_bytes: int) -> float:
  """Converts a per-token loss to bits per byte of text: loss * tokens / (ln 2 * bytes)."""
  return loss_nats_per_token * tokens / (math.log(2) * max(num_bytes, 1))


def mean(values) -> float:
  return float(np.mean(np.asarray(values))) if len(values) else float("nan")
