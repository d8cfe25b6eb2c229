#!/usr/bin/env bash
# A local stand-in for the official PyTorch base image, for machines that cannot pull from a registry.
#   sudo bash docker/local_base.sh [--tag NAME:TAG] [--mirror URL] [--force] [--dry-run]
# Debian bookworm (debootstrap, minbase) with Python 3.11 in a venv at /opt/conda, so python, pip and
# torchrun are on PATH as in pytorch/pytorch images, and the torch/torchvision pinned in requirements.txt
# with their CUDA wheels, fetched by this host's pip (its index, mirrors, local wheels and CA settings
# apply; PYTHON picks the interpreter, default python3). Skipped when the tag exists (--force rebuilds).
# Needs root, debootstrap and docker. Then build the image on it:
#   bash docker/build_docker.sh --base local/pytorch:2.14.1-cuda13.0-cudnn9-runtime
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=docker/_exec.sh
. "$here/_exec.sh"
pin() { sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$root/requirements.txt"; }
torch_v="$(pin torch)"
vision_v="$(pin torchvision)"
tag="local/pytorch:${torch_v}-cuda13.0-cudnn9-runtime"
mirror="http://deb.debian.org/debian"
suite="bookworm"  # its python3 is 3.11, the cp311 of the pinned wheels
force=0
dry_run=0
# python3-venv for /opt/conda; the headers, as conda's python has them (torch.compile builds C code).
packages="python3,python3-venv,libpython3.11-dev,ca-certificates"

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --mirror) mirror="$2"; shift 2 ;;
        --force) force=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$torch_v" ] || [ -z "$vision_v" ]; then
    echo "error: requirements.txt has no torch==/torchvision== pins" >&2
    exit 1
fi

# What pytorch/pytorch images set, so the Dockerfile sees the same environment.
import_changes=(
    --change "ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    --change "ENV LANG=C.UTF-8"
    --change "ENV NVIDIA_VISIBLE_DEVICES=all"
    --change "ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility"
    --change "ENV LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64"
    --change "ENV PYTORCH_VERSION=$torch_v"
    --change "WORKDIR /workspace"
    --change 'CMD ["bash"]'
    --message "local stand-in for pytorch/pytorch (docker/local_base.sh)"
)

if [ "$dry_run" -eq 1 ]; then
    echo "tag $tag"
    echo "debootstrap --variant=minbase --include=$packages $suite ROOTFS $mirror"
    echo "pip download torch==$torch_v torchvision==$vision_v (cp311, manylinux x86_64) -> ROOTFS/tmp/wheels"
    echo "chroot ROOTFS: python3 -m venv /opt/conda; pip install --no-index torch==$torch_v torchvision==$vision_v"
    echo "tar -C ROOTFS . | $DOCKER import ${import_changes[*]} - $tag"
    exit 0
fi
if [ "$force" -eq 0 ] && "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag exists (--force to rebuild)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: debootstrap and chroot need root: sudo bash $0" >&2
    exit 1
fi
for tool in debootstrap "$DOCKER" "${PYTHON:-python3}"; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install debootstrap docker.io)" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/var/tmp}/local-base.XXXXXX")"
trap 'rm -rf --one-file-system "$work"' EXIT
rootfs="$work/rootfs"
start=$SECONDS

debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"

# Wheels for the image's Python (3.11, glibc 2.36), whatever python runs pip here.
platforms=()
for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
"${PYTHON:-python3}" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp \
    --abi cp311 "${platforms[@]}" -d "$rootfs/tmp/wheels" "torch==$torch_v" "torchvision==$vision_v"

in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$rootfs" "$@"; }
in_root python3 -m venv /opt/conda
in_root /opt/conda/bin/pip install --quiet --no-index --find-links /tmp/wheels --no-compile \
    "torch==$torch_v" "torchvision==$vision_v"
in_root /opt/conda/bin/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
rm -rf "$rootfs/tmp/wheels" "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
mkdir -p "$rootfs/workspace"

tar -C "$rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . \
    | "$DOCKER" import "${import_changes[@]}" - "$tag"
echo "built $tag in $((SECONDS - start)) s"
