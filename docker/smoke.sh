#!/usr/bin/env bash
# make docker-smoke: the image end to end on this machine, CPU only (docs/DOCKER.md).
#   bash docker/smoke.sh
# 1. the base: $BASE_IMAGE when set, else the local stand-in (docker/local_base.sh, cached; root the
#    first time); 2. the image (build_docker.sh, tag $IMAGE, default tiny-imagenet-toolkit:smoke);
# 3. in the container, CPU mode: docker/check_image.py, the demo data, one demo epoch (wandb offline);
# 4. on the host: the run folder holds best.pth.tar and best_test_preds.csv, owned by the caller.
# Environment: BASE_IMAGE, IMAGE, DOCKER, PIP_CERT (see build_docker.sh).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=docker/_exec.sh
. "$here/_exec.sh"
case "${1:-}" in -h|--help) usage "$0"; exit 0 ;; esac
export IMAGE="${IMAGE:-tiny-imagenet-toolkit:smoke}"
export WANDB_MODE="${WANDB_MODE:-offline}"
out="checkpoints/docker-smoke-$(id -u)"
cd "$root"

phase() {  # phase NAME command...: run it, report its wall time
    local start=$SECONDS
    echo "== $1"
    shift
    "$@"
    echo "== $((SECONDS - start)) s"
}

base="${BASE_IMAGE:-}"
if [ -z "$base" ]; then
    base="$(bash "$here/local_base.sh" --dry-run | sed -n 's/^tag //p')"
    phase "base image $base (docker/local_base.sh)" bash "$here/local_base.sh" --tag "$base"
fi
phase "image $IMAGE on $base" bash "$here/build_docker.sh" --tag "$IMAGE" --base "$base"
phase "check" bash "$here/run_docker.sh" --cpu --check
rm -rf "$out"
phase "one demo epoch in the container (CPU)" bash "$here/run_docker.sh" --cpu -- bash -c \
    "test -d data/demo-digits || python demo_data.py --out data/demo-digits; \
     python main.py --config configs/demo.yaml --epochs 1 --warmup_epochs 0 --output_dir $out"

run="$(find "$out" -mindepth 1 -maxdepth 1 -type d | sort | tail -n 1)"
me="$(id -u):$(id -g)"
for file in "$run/best.pth.tar" "$run/best_test_preds.csv"; do
    if [ ! -f "$file" ]; then
        echo "FAIL: $file is missing" >&2
        exit 1
    fi
    owner="$(stat -c %u:%g "$file")"
    if [ "$owner" != "$me" ]; then
        echo "FAIL: $file belongs to $owner, not to the caller $me" >&2
        exit 1
    fi
done
echo "docker smoke ok: $run/best.pth.tar and best_test_preds.csv, owned by $me"
