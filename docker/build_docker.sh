#!/usr/bin/env bash
# Build the training image.
#   bash docker/build_docker.sh [--tag NAME:TAG] [--dry-run] [extra docker build args...]
# Environment: IMAGE (default tiny-imagenet-toolkit:latest).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=docker/_exec.sh
. "$here/_exec.sh"
tag="${IMAGE:-tiny-imagenet-toolkit:latest}"
dry_run=0
extra=()

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
        *) extra+=("$1"); shift ;;
    esac
done

# The container user gets your uid/gid so files it writes in the mounted folders are yours
# (root on the host -> uid 1000 in the image: the image never runs as root).
uid="$(id -u)"; gid="$(id -g)"
if [ "$uid" -eq 0 ]; then uid=1000; gid=1000; fi
cmd=(docker build -f "$here/Dockerfile" -t "$tag"
     --build-arg "UID=$uid" --build-arg "GID=$gid" ${extra[@]+"${extra[@]}"} "$root")

run_or_print "$dry_run" "${cmd[@]}"
