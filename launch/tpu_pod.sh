#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host): create the TPU VM (or reuse one that exists),
# copy this checkout to every worker, install, run the same command on --worker=all, stream the logs.
#
#   launch/tpu_pod.sh --name=llmjax-v5e --zone=us-west4-a --accelerator=v5litepod-16 -- \
#       --config=experiments/gpt_small.py --workdir=/mnt/shared/runs/gpt_small --config.mesh.fsdp=-1
#   launch/tpu_pod.sh --dry-run ...    print the gcloud commands instead of running them
#
# Options: --name --zone --accelerator (e.g. v5litepod-16, v5p-64, v4-32, v6e-8) --version (TPU VM
# runtime; default chosen from the accelerator) --project --spot --detach (run under nohup and
# follow worker 0's log; Ctrl-C stops following, not training) --delete (delete the VM afterwards).
# Everything after `--` goes to `python -m llmjax.main`. JAX finds the other hosts by itself on a
# TPU pod (llmjax.distributed auto-detects it); only process 0 prints and writes metrics.
# The --workdir must be visible to every worker (all processes write their checkpoint shards).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" SPOT=0 DETACH=0 DELETE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCEL="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for v in NAME ZONE ACCEL; do
  if [[ -z "${!v}" ]]; then echo "tpu_pod.sh: --$(echo $v | tr A-Z a-z | sed 's/accel/accelerator/') is required" >&2; exit 2; fi
done
if [[ $# -eq 0 ]]; then echo "tpu_pod.sh: give the llmjax.main arguments after --" >&2; exit 2; fi
if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v5litepod*|v5e*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p*) VERSION=v2-alpha-tpuv5 ;;
    v6e*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then LOC+=(--project="$PROJECT"); fi
export DRY_RUN="${DRY_RUN:-0}"

# 1. Reuse the TPU VM if it exists, else create it.
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# create the TPU VM unless \`${GC[*]} describe $NAME ${LOC[*]}\` finds it:"
  CREATE=1
elif "${GC[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing TPU VM $NAME"; CREATE=0
else
  CREATE=1
fi
if [[ "$CREATE" == 1 ]]; then
  EXTRA=(); if [[ "$SPOT" == 1 ]]; then EXTRA+=(--spot); fi
  run "${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION" "${EXTRA[@]}"
fi

# 2. Ship this checkout (tracked files at HEAD) to every worker and install it with TPU JAX.
TARBALL="/tmp/llmjax-$NAME.tar.gz"
run git -C "$HERE/.." archive --format=tar.gz -o "$TARBALL" HEAD
run "${GC[@]}" scp "$TARBALL" "$NAME:~/llmjax.tar.gz" "${LOC[@]}" --worker=all
run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="mkdir -p ~/llmjax && tar xzf ~/llmjax.tar.gz -C ~/llmjax && pip install -q -U 'jax[tpu]' && pip install -q -e ~/llmjax"

# 3. The same SPMD program on every host; stream the logs.
ARGS="$(printf ' %q' "$@")"
if [[ "$DETACH" == 1 ]]; then
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="cd ~/llmjax && nohup python -m llmjax.main$ARGS > ~/llmjax.log 2>&1 &"
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="tail -n +1 -F ~/llmjax.log"
else
  run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="cd ~/llmjax && python -m llmjax.main$ARGS 2>&1 | tee ~/llmjax.log"
fi
if [[ "$DELETE" == 1 ]]; then
  run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet
fi
