#!/usr/bin/env bash
# Start the training container with all GPUs, data/ and checkpoints/ mounted.
#   bash docker/run_docker.sh                      # an interactive shell (as seed 001 did)
#   bash docker/run_docker.sh -- python main.py --arch resnet18 --epochs 100
#   bash docker/run_docker.sh --gpus 2 -- torchrun --nproc_per_node=2 main.py --arch resnet18
# Options: --name NAME (default tiny-imagenet), --tag IMAGE, --gpus N|all (default all),
#          --shm SIZE (default 16g, DataLoader workers share memory), --dry-run (print the command).
# WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT and WANDB_ENTITY are passed through when set.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=docker/_exec.sh
. "$here/_exec.sh"
tag="${IMAGE:-tiny-imagenet-toolkit:latest}"
name="tiny-imagenet"
gpus="all"
shm="16g"
dry_run=0
command=()

while [ $# -gt 0 ]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --gpus) gpus="$2"; shift 2 ;;
        --shm) shm="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; command=("$@"); break ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (use -- before the command to run)" >&2; exit 2 ;;
    esac
done

mkdir -p "$root/data" "$root/checkpoints"
cmd=(docker run --rm --name "$name" --gpus "$gpus" --shm-size "$shm"
     -v "$root/data:/workspace/data" -v "$root/checkpoints:/workspace/checkpoints" -w /workspace)
for var in WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY; do
    if [ -n "${!var:-}" ]; then
        cmd+=(-e "$var")
    fi
done
if [ ${#command[@]} -eq 0 ]; then
    cmd+=(-it "$tag" bash)
else
    cmd+=("$tag" "${command[@]}")
fi

run_or_print "$dry_run" "${cmd[@]}"
