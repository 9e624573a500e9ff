"""Prepare a corpus once: tokenize it with every core into fixed-size token shards and a manifest.

  python -m llmjax.data.prepare --input='corpus/**/*.jsonl.gz' --output=data/web \\
      --tokenizer=sentencepiece --sp_vocab_size=32000 [--text_key=text] [--val_fraction=0.001]

Then train with --config.data.path=data/web. Inputs: text files (one file = one document), JSON
Lines, Parquet, local Hugging Face `datasets` directories; .gz/.zst compressed text and JSON Lines.
Documents end with the tokenizer's EOS (tokenizers without one, such as 'byte', get a blank line).
Validation documents are held out by a hash of (seed, document) (and the first document always, so
the split is never empty): a document's split never depends on the worker count, and the whole
output is a function of the inputs and options alone.

Work units (readers.Task) are tokenized by a process pool and written back in input order: at most
2 units per worker are in flight, so memory stays flat however large the corpus. Each shard is
written to a temporary file and renamed; progress.json records the finished shards and where in the
input the next one starts, so a run stopped at any point (Ctrl-C, a full disk, a crash) continues
from its finished shards when the same command is run again.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import errno
import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np

from llmjax.data import readers
from llmjax.data import shards as shardlib
from llmjax.data.shard_writer import PROGRESS, ShardWriter
from llmjax.data.shard_writer import _TEST_DISK_BYTES  # noqa: F401  (the tests set it through here)
from llmjax.data.sources import DataError

SPLITS = ("train", "val")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def parse_args(argv):
  p = _Parser(prog="python -m llmjax.data.prepare", description=__doc__.split("\n")[0])
  p.add_argument("--input", action="append", required=True,
                 help="file, glob (quote it; ** recurses) or HF dataset directory; repeatable")
  p.add_argument("--output", required=True, help="directory to write (new, empty, or a partial "
                 "run of the same command to continue)")
  p.add_argument("--tokenizer", default="sentencepiece", choices=("sentencepiece", "byte", "hf"))
  p.add_argument("--tokenizer_path", default="", help="sentencepiece: an existing .model (else one "
                 "is trained on a sample); hf: a directory with tokenizer.json/tokenizer.model")
  p.add_argument("--sp_vocab_size", type=int, default=32000)
  p.add_argument("--sp_sample_mb", type=float, default=32.0,
                 help="MB of text (spread over all inputs) to train sentencepiece on")
  p.add_argument("--text_key", default="text", help="JSONL key / Parquet or dataset column")
  p.add_argument("--val_fraction", type=float, default=0.001,
                 help="fraction of documents held out for validation")
  p.add_argument("--shard_tokens", type=int, default=1 << 26, help="tokens per shard file")
  p.add_argument("--num_workers", type=int, default=0, help="tokenizer processes (0: one per core)")
  p.add_argument("--seed", type=int, default=0, help="picks the validation documents")
  p.add_argument("--chunk_mb", type=float, default=readers.CHUNK_BYTES / (1 << 20),
                 help="uncompressed text/JSONL files are cut into work units of this size")
  p.add_argument("--noprogress", dest="progress", action="store_false", help="no progress bar")
  args = p.parse_args(argv)
  if not 0 < args.val_fraction < 1:
    p.error(f"--val_fraction={args.val_fraction} must be in (0, 1)")
  if args.shard_tokens < 1:
    p.error(f"--shard_tokens={args.shard_tokens} must be positive")
  if args.num_workers < 0:
    p.error(f"--num_workers={args.num_workers} must be >= 0")
  if args.tokenizer == "hf" and not args.tokenizer_path:
    p.error("--tokenizer=hf needs --tokenizer_path=<directory with tokenizer.json or tokenizer.model>")
  if args.tokenizer == "sentencepiece" and not args.tokenizer_path and args.sp_vocab_size < 16:
    p.error("--sp_vocab_size must be at least 16")
  return args


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit status 2 (argparse prints the whole usage)
    print(f"llmjax.data.prepare: error: {message}", file=sys.stderr)
    sys.exit(2)


# -- options, output directory state ----------------------------------------------------------------
def options_of(args, sources: list[str]) -> dict:
  """Everything the output depends on (worker count and progress bar excluded)."""
  tok = {"kind": args.tokenizer}
  if args.tokenizer_path:
    tok["path_sha256"] = _file_or_dir_sha(args.tokenizer_path)
  elif args.tokenizer == "sentencepiece":
    tok.update(sp_vocab_size=args.sp_vocab_size, sp_sample_mb=args.sp_sample_mb)
  return {"sources": [{"path": s, "bytes": readers.source_size(s)} for s in sources],
          "tokenizer": tok, "text_key": args.text_key, "val_fraction": args.val_fraction,
          "seed": args.seed, "shard_tokens": args.shard_tokens,
          "chunk_bytes": int(args.chunk_mb * (1 << 20))}


def _file_or_dir_sha(path: str) -> str:
  p = Path(path)
  if not p.exists():
    raise DataError(f"--tokenizer_path={path} does not exist")
  h = hashlib.sha256()
  for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
    if f.is_file():
      h.update(f.name.encode() + f.read_bytes())
  return h.hexdigest()[:16]


def _fingerprint(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def open_output(out: Path, options: dict) -> dict | None:
  """The saved progress of a partial run of the same command, or None for a fresh start. Refuses a
  directory that holds anything else. Returns {'done': manifest} if it is already prepared."""
  fp = _fingerprint(options)
  manifest, progress = out / shardlib.MANIFEST, out / PROGRESS
  if manifest.exists():
    old = json.loads(manifest.read_text())
    if old.get("options_fingerprint") == fp:
      return {"done": old}
    raise DataError(f"--output={out} already holds another prepared corpus (different inputs or "
                    "options); choose a new directory, or delete that one first")
  if progress.exists():
    old = json.loads(progress.read_text())
    if old.get("options_fingerprint") != fp:
      raise DataError(f"--output={out} holds a partial preparation of another corpus (different "
                      "inputs or options); rerun that command to finish it, or choose a new directory")
    return old
  if out.exists() and any(out.iterdir()):
    raise DataError(f"--output={out} is not empty and is not a prepared corpus; choose a new or "
                    "empty directory")
  return None


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# -- the tokenizer ----------------------------------------------------------------------------------
def make_tokenizer(args, tasks, out: Path, workers: int):
  """The tokenizer to prepare with; saved into `out`. A partial run reuses the one it saved."""
  from llmjax.data import tokenizers as toklib
  if (out / toklib.SPEC_FILE).exists():
    return toklib.load_tokenizer(out)
  if args.tokenizer == "byte":
    tok = toklib.ByteTokenizer()
  elif args.tokenizer == "hf":
    from llmjax.data.hf_tokenizer import HFTokenizer
    tok = HFTokenizer.from_hf_dir(args.tokenizer_path) if os.path.isdir(args.tokenizer_path) else None
    if tok is None:
      raise DataError(f"--tokenizer_path={args.tokenizer_path} is not a directory holding "
                      "tokenizer.json or tokenizer.model")
  elif args.tokenizer_path:
    tok = toklib.SentencePieceTokenizer(args.tokenizer_path)
  else:
    budget = max(int(args.sp_sample_mb * (1 << 20)) // len(tasks), 1)
    jobs = [(t, args.text_key, budget) for t in tasks]
    if workers > 1:
      with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                  initializer=_die_with_parent) as pool:
        parts = list(pool.map(_sample_task, jobs))
    else:
      parts = list(map(_sample_task, jobs))
    sample = "\n".join(p for p in parts if p)
    if not sample.strip():
      raise DataError("the inputs hold no text to train a sentencepiece tokenizer on")
    _log(f"training a {args.sp_vocab_size}-piece sentencepiece model on {len(sample) / 1e6:.1f} MB "
         "of sampled text")
    tok = _deterministic_model(toklib.train_sentencepiece(sample, args.sp_vocab_size), out)
  tok.save(out)
  return toklib.load_tokenizer(out)  # the saved copy: the one every later run loads


def _deterministic_model(tok, out: Path):
  """sentencepiece records the trainer's temporary paths and thread count in the model; clearing
  them makes the model file (and the corpus's tokenizer fingerprint) a function of the sample."""
  from sentencepiece import sentencepiece_model_pb2
  from llmjax.data.tokenizers import SP_MODEL_FILE, SentencePieceTokenizer
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(Path(tok.model_file).read_bytes())
  for field in ("input", "model_prefix", "num_threads"):
    proto.trainer_spec.ClearField(field)
  tmp = out / (SP_MODEL_FILE + ".tmp")
  tmp.write_bytes(proto.SerializeToString())
  os.replace(tmp, out / SP_MODEL_FILE)
  return SentencePieceTokenizer(out / SP_MODEL_FILE)


def _sample_task(arg) -> str:
  """The first `budget` bytes of documents of one work unit (a sample spread over all inputs)."""
  task, text_key, budget = arg
  taken, out = 0, []
  for text, _ in readers.documents(task, text_key):
    out.append(text[:budget - taken])
    taken += len(out[-1])
    if taken >= budget:
      break
  return "\n".join(out)


# -- workers ------------------------------------------------------------------------------------------
_W: dict = {}


def _die_with_parent() -> None:
  """A pool worker must not outlive prepare when prepare itself is killed (SIGKILL, the OOM
  killer): on Linux the kernel sends it SIGKILL when its parent dies (PR_SET_PDEATHSIG)."""
  try:
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # not Linux: a killed prepare may leave idle workers behind


def _init_worker(tokenizer_dir: str, tasks, text_key: str, val_fraction: float, seed: int,
                 dtype: str, parent: int | None = None) -> None:
  if parent is not None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
      os._exit(1)
  from llmjax.data.tokenizers import load_tokenizer
  tok = load_tokenizer(tokenizer_dir)
  end = [tok.eos_id] if tok.eos_id is not None else tok.encode("\n\n")
  _W.update(tok=tok, tasks=tasks, text_key=text_key, val_fraction=val_fraction, seed=seed,
            end=np.asarray(end, np.int32), dtype=np.dtype(dtype))


def _is_val(seed: int, doc_key: str, index: int, val_fraction: float) -> bool:
  """A uniform hash of (seed, document): independent of the order and place it is tokenized in."""
  digest = hashlib.blake2b(f"{seed}|{doc_key}|{index}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def tokenize_task(index: int) -> dict:
  """Tokens of one work unit, split into train and val: {split: (tokens, document end offsets)}."""
  task = _W["tasks"][index]
  tok, end, dtype = _W["tok"], _W["end"], _W["dtype"]
  parts = {s: [] for s in SPLITS}
  ends = {s: [] for s in SPLITS}
  sizes = {s: 0 for s in SPLITS}
  doc = 0
  # the corpus's first document always goes to validation, so that split is never empty
  first = task.doc_key == _W["tasks"][0].doc_key and (task.kind == "text" or index == 0)
  for text, doc_end in readers.documents(task, _W["text_key"]):
    split = "val" if (first and doc == 0) or _is_val(
        _W["seed"], task.doc_key, 0 if task.kind == "text" else doc, _W["val_fraction"]) else "train"
    ids = tok.encode_array(text) if text else np.empty(0, np.int32)
    parts[split].append(ids)
    sizes[split] += len(ids)
    if doc_end:
      parts[split].append(end)
      sizes[split] += len(end)
      ends[split].append(sizes[split])
      doc += 1
  out = {"bytes": task.size}
  for s in SPLITS:
    tokens = np.concatenate(parts[s]) if parts[s] else np.empty(0, np.int32)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
      raise DataError(f"{task.path}: token id {int(tokens.max())} does not fit {dtype}")
    out[s] = (tokens.astype(dtype), np.asarray(ends[s], np.int64))
  return out


# -- driver -------------------------------------------------------------------------------------------
def prepare(args) -> dict:
  out = Path(args.output)
  sources = readers.expand_inputs(args.input)
  options = options_of(args, sources)
  previous = open_output(out, options)
  if previous and "done" in previous:
    _log(f"{out} is already prepared with these inputs and options; nothing to do")
    return previous["done"]
  tasks = readers.plan_tasks(sources, args.text_key, options["chunk_bytes"])
  out.mkdir(parents=True, exist_ok=True)
  progress = previous or {"options_fingerprint": _fingerprint(options), "splits": {}}
  _write_json(out / PROGRESS, progress)  # marks the directory as ours before anything else
  workers = args.num_workers or os.cpu_count() or 1
  tok = make_tokenizer(args, tasks, out, workers)
  fingerprint = shardlib.tokenizer_fingerprint(tok)
  dtype = shardlib.token_dtype(tok.vocab_size)
  if progress.get("tokenizer_fingerprint", fingerprint) != fingerprint:
    raise DataError(f"{out}: the saved tokenizer changed since the partial run; delete {out} and "
                    "start again")
  progress["tokenizer_fingerprint"] = fingerprint
  writers = {s: ShardWriter(out, s, args.shard_tokens, dtype, progress["splits"].get(s))
             for s in SPLITS}

  def save(next_task: int):
    """Called between work units, after every split took the previous one."""
    for w in writers.values():
      w.sync()
    progress.update(next_task=next_task, splits={s: w.state() for s, w in writers.items()})
    _write_json(out / PROGRESS, progress)

  first = progress.get("next_task", 0)
  init = (str(out), tasks, args.text_key, args.val_fraction, args.seed, dtype)
  total = sum(t.size for t in tasks)
  bar = _progress_bar(args.progress, total, sum(t.size for t in tasks[:first]))
  if first:
    _log(f"continuing {out}: {sum(len(w.shards) for w in writers.values())} finished shard(s) kept, "
         f"from work unit {first} of {len(tasks)}")
  for index, result in _tokenized(range(first, len(tasks)), workers, init):
    emitted = [w.add(*result[s]) for s, w in writers.items()]
    if any(emitted):
      save(index + 1)
    if bar is not None:
      bar.update(result["bytes"])
  for w in writers.values():
    w.finish()
  progress.update(next_task=len(tasks), splits={s: w.state() for s, w in writers.items()})
  _write_json(out / PROGRESS, progress)
  if bar is not None:
    bar.close()
  if not writers["val"].shards or not writers["train"].shards:
    empty = "val" if not writers["val"].shards else "train"
    raise DataError(f"no document landed in the {empty} split ({len(tasks)} work unit(s)); "
                    + ("raise --val_fraction or add documents" if empty == "val" else
                       "lower --val_fraction or add documents"))
  manifest = _manifest(args, options, progress, tok, fingerprint, dtype, len(tasks))
  _write_json(out / shardlib.MANIFEST, manifest)
  (out / PROGRESS).unlink()
  t, v = manifest["splits"]["train"], manifest["splits"]["val"]
  _log(f"prepared {out}: {t['tokens']:,} train tokens in {len(t['shards'])} shard(s) "
       f"({t['documents']:,} documents), {v['tokens']:,} val tokens ({v['documents']:,} documents); "
       f"{tok.kind} tokenizer with {tok.vocab_size} ids, {dtype}")
  return manifest


def _tokenized(indices, workers: int, init):
  """(index, result) in input order; at most 2 units per worker in flight (flat memory)."""
  if workers == 1:
    _init_worker(*init)
    for i in indices:
      yield i, tokenize_task(i)
    return
  ctx = multiprocessing.get_context("fork")
  with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                              initargs=(*init, os.getpid())) as pool:
    pending, it = [], iter(indices)
    try:
      for i in it:
        pending.append((i, pool.submit(tokenize_task, i)))
        if len(pending) >= 2 * workers:
          j, fut = pending.pop(0)
          yield j, fut.result()
      while pending:
        j, fut = pending.pop(0)
        yield j, fut.result()
    finally:
      for _, fut in pending:
        fut.cancel()


def _manifest(args, options, progress, tok, fingerprint, dtype, num_tasks) -> dict:
  import llmjax
  splits = {}
  for s in SPLITS:
    shards = progress["splits"][s]["shards"]
    splits[s] = {"shards": shards, "tokens": sum(x["tokens"] for x in shards),
                 "documents": sum(x["documents"] for x in shards)}
  spec = json.loads((Path(args.output) / "tokenizer.json").read_text())
  return {
      "format": shardlib.FORMAT, "llmjax_version": llmjax.__version__, "dtype": dtype,
      "tokenizer": {"kind": tok.kind, "vocab_size": int(tok.vocab_size), "eos_id": tok.eos_id,
                    "fingerprint": fingerprint, "spec": spec,
                    "document_end": "eos" if tok.eos_id is not None else "blank line"},
      "max_token_id": max([x["max_token_id"] for s in SPLITS for x in splits[s]["shards"]] + [-1]),
      "splits": splits, "sources": options["sources"], "work_units": num_tasks,
      "options": {k: v for k, v in options.items() if k != "sources"},
      "options_fingerprint": progress["options_fingerprint"],
  }


def _progress_bar(enabled: bool, total: int, initial: int):
  if not enabled:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1000,
              desc="tokenizing", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)


def _log(message: str) -> None:
  print(f"llmjax.data.prepare: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    prepare(args)
  except DataError as e:
    print(f"llmjax.data.prepare: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    if e.errno in DISK_FULL:
      print(f"llmjax.data.prepare: error: the disk is full while writing {args.output} "
            f"({e.strerror}); finished shards are kept: free space and run the same command again "
            "to continue", file=sys.stderr)
      return 2
    print(f"llmjax.data.prepare: error: {e.filename or args.output}: {e.strerror}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"llmjax.data.prepare: interrupted; finished shards are kept in {args.output}: run the "
          "same command again to continue", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
