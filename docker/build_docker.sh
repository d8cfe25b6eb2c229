#!/usr/bin/env bash
# Build the training image with BuildKit (run from anywhere; the build context is the repository root).
#   bash docker/build_docker.sh [--tag NAME:TAG] [--base IMAGE] [--pip-cert FILE] [--dry-run] [docker build args...]
#   --tag NAME:TAG   the image (default $IMAGE, else tiny-imagenet-toolkit:latest)
#   --base IMAGE     the PyTorch base, same as --build-arg BASE_IMAGE=IMAGE (default
#                    pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime; a host whose NVIDIA driver predates
#                    CUDA 13 needs a CUDA 12.x tag; no registry access: docker/local_base.sh)
#   --pip-cert FILE  CA bundle for pip inside the build, for networks that intercept HTTPS (default:
#                    $PIP_CERT when it names a file; --pip-cert '' for none); a BuildKit secret, not kept
#   --dry-run        print the docker command only
# The image holds a copy of the code: rebuild after editing it (or use run_docker.sh --mount-code).
# Environment: DOCKER (the docker client, default docker). Docker 23+ builds with its buildx plugin
# (docker-buildx-plugin, or Debian's docker-buildx); Docker 20.10 with DOCKER_BUILDKIT=1, set here.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=docker/_exec.sh
. "$here/_exec.sh"
tag="${IMAGE:-tiny-imagenet-toolkit:latest}"
pip_cert="${PIP_CERT:-}"
if [ -n "$pip_cert" ] && [ ! -f "$pip_cert" ]; then pip_cert=""; fi  # PIP_CERT may name a directory
dry_run=0
extra=()

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --base) extra+=(--build-arg "BASE_IMAGE=$2"); shift 2 ;;
        --pip-cert) pip_cert="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage "$0"; exit 0 ;;
        *) extra+=("$1"); shift ;;
    esac
done

if [ -n "$pip_cert" ]; then
    if [ ! -f "$pip_cert" ]; then
        echo "error: --pip-cert $pip_cert: no such file" >&2
        exit 2
    fi
    extra+=(--secret "id=pip_cert,src=$pip_cert")
fi

# The Dockerfile needs BuildKit (RUN --mount). Docker 23+ without buildx falls back to the legacy
# builder, which fails on it with a less helpful message than this one.
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-1}"
if [ "$dry_run" -eq 0 ] && command -v "$DOCKER" >/dev/null 2>&1; then
    client="$("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null || true)"
    if [ "${client%%.*}" -ge 23 ] 2>/dev/null && ! "$DOCKER" buildx version >/dev/null 2>&1; then
        echo "error: docker $client builds this image with BuildKit, which needs the buildx plugin:" \
             "install docker-buildx-plugin (Docker's packages) or docker-buildx (Debian/Ubuntu)" >&2
        exit 1
    fi
fi

cmd=("$DOCKER" build -f "$here/Dockerfile" -t "$tag" ${extra[@]+"${extra[@]}"} "$root")
run_or_print "$dry_run" "${cmd[@]}"
