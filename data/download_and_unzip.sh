#!/bin/sh
# Download Tiny-ImageNet-200 into data/tiny-imagenet-200 (seed 001's interface).
#   cd data && sh download_and_unzip.sh                       # the official zip, MD5-checked, resumable
#   sh data/download_and_unzip.sh --archive a.tar.gz.part0 a.tar.gz.part1 ...   # offline copy
#   sh data/download_and_unzip.sh --url MIRROR --md5 HEX      # a mirror
# Every option is passed to data/download.py (python3 data/download.py --help).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/../.venv/bin/python" ]; then
    py="$here/../.venv/bin/python"
else
    py=$(command -v python3 || command -v python)
fi
exec "$py" "$here/download.py" "$@"
