#!/usr/bin/env bash
# The GPU speed-run on a fresh GPU machine that has this repository and the dataset's split parts:
# check the parts against SHA256SUMS, install the dataset, run configs/gpu_speedrun.yaml, print the
# curve, the wall time and the card's name.
#   bash bench/gpu_speedrun.sh [--parts DIR] [--python PY] [--dry-run] [-- extra main.py flags]
# --parts DIR   folder with tiny-imagenet-200.tar.gz.part0..3 and SHA256SUMS (default: ../shared/data;
#               the parts are 42 MiB each and may arrive one at a time: all four must be there)
# --python PY   the interpreter with the requirements (default: .venv/bin/python, else python3)
# --dry-run     check the parts, then print the install and training commands instead of running them
# Everything after -- goes to main.py (e.g. -- --time_budget 5). Output: bench/results/gpu_speedrun.txt.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
parts_dir="$root/../shared/data"
python=""
dry_run=0
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --parts) parts_dir="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
cd "$root"

# 1. the parts, checked before anything is unpacked
parts=()
for i in 0 1 2 3; do
    part="$parts_dir/tiny-imagenet-200.tar.gz.part$i"
    if [ ! -f "$part" ]; then
        echo "error: $part is missing; copy all four parts (and SHA256SUMS) into $parts_dir" >&2
        exit 1
    fi
    parts+=("$part")
done
if [ ! -f "$parts_dir/SHA256SUMS" ]; then
    echo "error: $parts_dir/SHA256SUMS is missing: the parts cannot be checked" >&2
    exit 1
fi
(cd "$parts_dir" && grep 'tiny-imagenet-200.tar.gz.part[0-3]$' SHA256SUMS | sha256sum --check --strict --quiet) || {
    echo "error: a part in $parts_dir does not match SHA256SUMS (a partial copy?); copy it again" >&2
    exit 1
}
echo "parts: the four parts match SHA256SUMS"

install=("$python" data/download.py --archive "${parts[@]}")
train=("$python" main.py --config configs/gpu_speedrun.yaml ${extra[@]+"${extra[@]}"})
if [ "$dry_run" -eq 1 ]; then
    printf 'would run: '; printf '%q ' "${install[@]}"; echo
    printf 'would run: '; printf '%q ' "${train[@]}"; echo
    exit 0
fi

# 2. the dataset (returns at once when it is already installed and valid)
"${install[@]}"

# 3. the preset, timed as a whole command
mkdir -p bench/results
card="$("$python" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
log="bench/results/gpu_speedrun.log"
start=$(date +%s.%N)
"${train[@]}" 2>&1 | tee "$log"
end=$(date +%s.%N)
run="$(grep -o 'run folder [^ ]*' "$log" | head -n 1 | cut -d' ' -f3)"

# 4. the curve, the time and the card
"$python" - "$run" "$card" "$start" "$end" <<'EOF' | tee bench/results/gpu_speedrun.txt
import csv, json, sys
run, card, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
rows = list(csv.DictReader(open(f"{run}/metrics.csv")))
best = json.load(open(f"{run}/best_results.json"))
print(f"GPU speed-run on {card}: best val top-1 {best['val_top1']:.2f} % (top-5 {best['val_top5']:.2f} %), "
      f"{end - start:.0f} s for the whole command ({(end - start) / 60:.1f} min); run folder {run}")
print("| epoch | train size | s | val top-1 | val top-5 | epoch s | img/s | data wait | wall s |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['epoch']} | {r['train_size']} | {float(r['aug_strength']):.2f} | {float(r['val_top1']):.2f} | "
          f"{float(r['val_top5']):.2f} | {float(r['epoch_seconds']):.1f} | {float(r['images_per_second']):,.0f} | "
          f"{100 * float(r['data_wait_fraction']):.1f} % | {float(r['wall_seconds']):.0f} |")
EOF
