#!/usr/bin/env bash
# Start the training container: all GPUs, data/ and checkpoints/ mounted, running as you.
#   bash docker/run_docker.sh                      # an interactive shell
#   bash docker/run_docker.sh -- python main.py --arch resnet18 --epochs 100
#   bash docker/run_docker.sh --gpu 2,3 -- torchrun --nproc_per_node=2 main.py --arch resnet18
#   bash docker/run_docker.sh --cpu -- python main.py --config configs/demo.yaml --epochs 1 --warmup_epochs 0
#   bash docker/run_docker.sh --detach -- python main.py --arch resnet18 --epochs 100
#   bash docker/run_docker.sh --check              # torch/CUDA/cuDNN, GPU, pins, compiler
# Options:
#   --gpu IDS       GPUs by index: --gpu 2, --gpu 2,3 (docker --gpus '"device=2,3"')
#   --gpus SPEC     docker's --gpus: all (default), device=2,3 (by index), N (any N GPUs), none (= --cpu)
#   --cpu           no GPUs (no --gpus flag): hosts without GPUs or without the NVIDIA Container Toolkit
#   --name NAME     container name (default tiny-imagenet-MMDD-HHMMSS-PID: several can run at once)
#   --detach        run in the background, print how to follow the logs and how to stop it
#   --mount-code    mount this working tree over /workspace, so code edits apply without a rebuild;
#                   without it the container runs the copy of the code in the image: rebuild after edits
#   --tag IMAGE     the image (default $IMAGE, else tiny-imagenet-toolkit:latest)
#   --cpuset CPUS   only these CPU cores (docker --cpuset-cpus 0-7): give each of several containers its own
#   --shm SIZE      shared memory for DataLoader workers (default 16g)
#   --dry-run       print the docker command only
# The container runs as your uid:gid (root stays root): what it writes in data/ and checkpoints/ is
# yours, and only those persist. Ctrl-C or `docker stop NAME` reach python (docker run --init): main.py
# finishes the update, saves last.pth.tar, prints the resume command (docker stop waits up to 60 s).
# WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT and WANDB_ENTITY are passed through when set.
# Environment: DOCKER (the docker client, default docker).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=docker/_exec.sh
. "$here/_exec.sh"
tag="${IMAGE:-tiny-imagenet-toolkit:latest}"
name="tiny-imagenet-$(date +%m%d-%H%M%S)-$$"
gpus="all"
shm="16g"
cpuset=""
detach=0
mount_code=0
dry_run=0
command=()

while [ $# -gt 0 ]; do
    case "$1" in
        --name) name="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --gpu) gpus="device=$2"; shift 2 ;;
        --gpus) gpus="$2"; shift 2 ;;
        --cpu) gpus="none"; shift ;;
        --shm) shm="$2"; shift 2 ;;
        --cpuset) cpuset="$2"; shift 2 ;;
        --detach) detach=1; shift ;;
        --mount-code) mount_code=1; shift ;;
        --check) command=(python docker/check_image.py); shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; command=("$@"); break ;;
        -h|--help) usage "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help; use -- before the command to run)" >&2; exit 2 ;;
    esac
done

cmd=("$DOCKER" run --name "$name" --init --stop-timeout 60 --user "$(id -u):$(id -g)" --shm-size "$shm")
case "$gpus" in
    none) ;;
    # docker splits --gpus at commas, so a device list must arrive quoted: "device=2,3"
    device=*,*) cmd+=(--gpus "\"$gpus\"") ;;
    *) cmd+=(--gpus "$gpus") ;;
esac
if [ -n "$cpuset" ]; then
    cmd+=(--cpuset-cpus "$cpuset")  # torch sizes its thread pool from the cores it may use
fi
if [ "$detach" -eq 1 ]; then
    cmd+=(--detach)  # no --rm: `docker logs` still works after the run ends
else
    cmd+=(--rm)
fi
mkdir -p "$root/data" "$root/checkpoints"
if [ "$mount_code" -eq 1 ]; then
    cmd+=(-v "$root:/workspace")
fi
cmd+=(-v "$root/data:/workspace/data" -v "$root/checkpoints:/workspace/checkpoints" -w /workspace)
cmd+=(-e TIN_LAUNCHED_BY=run_docker)  # an interrupted run then says how to resume from the host
for var in WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY; do
    if [ -n "${!var:-}" ]; then
        cmd+=(-e "$var")
    fi
done
if [ ${#command[@]} -eq 0 ]; then
    if [ "$detach" -eq 1 ]; then
        echo "error: --detach needs a command: run_docker.sh --detach -- python main.py ..." >&2
        exit 2
    fi
    command=(bash)
    cmd+=(-it)
elif [ "$detach" -eq 0 ] && [ -t 0 ] && [ -t 1 ]; then
    cmd+=(-it)  # a terminal: Ctrl-C goes to the container's foreground processes, tqdm draws as usual
fi
cmd+=("$tag" "${command[@]}")

if [ "$detach" -eq 0 ] || [ "$dry_run" -eq 1 ]; then
    run_or_print "$dry_run" "${cmd[@]}"  # execs docker, or prints the command
    exit 0
fi
"${cmd[@]}" >/dev/null
cat <<EOF
started $name in the background (image $tag); run folders appear in $root/checkpoints
  follow the logs:  $DOCKER logs -f $name
  stop it:          $DOCKER stop $name    (saves last.pth.tar, prints the resume command in the logs)
  remove it:        $DOCKER rm $name      (once it has ended; the logs go with it)
EOF
