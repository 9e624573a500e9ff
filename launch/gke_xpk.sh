#!/usr/bin/env bash
# Train on TPU slices in a GKE cluster with xpk (https://github.com/AI-Hypercomputer/xpk): build an
# image from this checkout, then run one workload over --num_slices slices. Multi-slice runs put
# the data axis across slices (DCN) with --config.mesh.dcn.data=<num_slices>; everything else stays
# inside a slice (ICI). JAX's TPU cluster detection wires the hosts together.
#
#   launch/gke_xpk.sh --cluster=my-cluster --tpu_type=v5p-128 --num_slices=2 \
#       --image=gcr.io/my-project/llmjax:latest -- \
#       --config=experiments/gpt_small.py --workdir=/gcs/my-bucket/runs/gpt --config.mesh.fsdp=-1
#   launch/gke_xpk.sh --dry-run ...          print the docker/xpk commands instead of running them
#
# Options: --cluster --tpu_type --num_slices (default 1) --image (pushed with docker) --workload
# (default llmjax-<user>-<time>) --project --zone --create_cluster (also create the GKE cluster).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

CLUSTER="" TPU="" SLICES=1 IMAGE="" WORKLOAD="llmjax-${USER:-user}-$(date +%m%d%H%M)" PROJECT="" ZONE="" CREATE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster=*) CLUSTER="${1#*=}" ;;
    --tpu_type=*) TPU="${1#*=}" ;;
    --num_slices=*) SLICES="${1#*=}" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --create_cluster) CREATE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "gke_xpk.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for pair in "cluster:$CLUSTER" "tpu_type:$TPU" "image:$IMAGE"; do
  if [[ -z "${pair#*:}" ]]; then echo "gke_xpk.sh: --${pair%%:*} is required" >&2; exit 2; fi
done
if [[ $# -eq 0 ]]; then echo "gke_xpk.sh: give the llmjax.main arguments after --" >&2; exit 2; fi
export DRY_RUN="${DRY_RUN:-0}"
WHERE=(); [[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT"); [[ -n "$ZONE" ]] && WHERE+=(--zone="$ZONE")

if [[ "$CREATE" == 1 ]]; then
  run xpk cluster create --cluster="$CLUSTER" --tpu-type="$TPU" --num-slices="$SLICES" "${WHERE[@]}"
fi
# An image with TPU JAX and this checkout installed.
DOCKERFILE="$(mktemp -t llmjax-Dockerfile.XXXX)"
cat > "$DOCKERFILE" <<DOCKER
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -U "jax[tpu]" && pip install --no-cache-dir -e /app
DOCKER
run docker build -f "$DOCKERFILE" -t "$IMAGE" "$HERE/.."
run docker push "$IMAGE"

DCN=(); if [[ "$SLICES" -gt 1 ]]; then DCN=(--config.mesh.dcn.data="$SLICES"); fi
CMD="python -m llmjax.main$(printf ' %q' "$@" "${DCN[@]}")"
run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU" \
    --num-slices="$SLICES" --docker-image="$IMAGE" "${WHERE[@]}" --command="$CMD"
echo "# follow it with: xpk workload list --cluster=$CLUSTER, or the GKE logs of workload $WORKLOAD"
