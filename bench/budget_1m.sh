#!/usr/bin/env bash
# The < 1 M-parameter table (README: Distillation; bench/RESULTS.md): every row one 30-minute run
# (--time_budget 30) on the full Tiny-ImageNet from scratch, run one after another on a quiet machine
# (nothing else running: the runs plan themselves from their own speed). About 4.5 hours in all.
#
#   bash bench/budget_1m.sh [DATA_DIR] [OUT_DIR]      # defaults: data/tiny-imagenet-200, checkpoints/budget_1m
#
# A row whose run already finished (its best_results.json exists) is skipped, so the script can be
# stopped and started again; a run interrupted mid-way is started afresh in a new folder. At the end
# it prints the table: one line per row with the model, parameters, epochs, val top-1 and wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/tiny-imagenet-200}
OUT=${2:-checkpoints/budget_1m}
PY=${PYTHON:-python}

# run NAME MAIN.PY-FLAGS...: train into $OUT/NAME unless a finished run is there; prints its run folder
run() {
    local name=$1
    shift
    local done_run
    done_run=$(find "$OUT/$name" -name best_results.json -printf '%h\n' 2>/dev/null | sort | tail -1)
    if [[ -z $done_run ]]; then
        "$PY" main.py --data_dir "$DATA" --output_dir "$OUT/$name" --wandb disabled "$@" >&2
        done_run=$(find "$OUT/$name" -name best_results.json -printf '%h\n' | sort | tail -1)
    fi
    echo "$done_run"
}

# the teacher: the CPU speed-run (30 min)
T1=$(run teacher1 --config configs/cpu_speedrun.yaml)
# 1. no distillation: the preset's model, and the other < 1 M candidate with the same recipe
run student_alone --config configs/budget_1m.yaml >/dev/null
run budget_cnn_alone --config configs/budget_1m.yaml --arch budget_cnn >/dev/null
# 2. distillation from the speed-run, the teacher in every step: its cost inside the 30 minutes
run student_live --config configs/budget_1m.yaml --teacher "$T1" --kd_views 0 >/dev/null
# 3. cached soft labels: the first run makes them within its own 30 minutes, the second finds them
rm -f "$DATA"/.cache/soft_labels_*.npz
run student_cached_first --config configs/budget_1m.yaml --teacher "$T1" >/dev/null
run student_cached_reused --config configs/budget_1m.yaml --teacher "$T1" >/dev/null
# 4. an ensemble of two teachers (the second: the speed-run with another seed, 30 min more)
T2=$(run teacher2 --config configs/cpu_speedrun.yaml --seed 1)
run student_ensemble --config configs/budget_1m.yaml --teacher "$T1" "$T2" >/dev/null

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

print("| run | model | params | teachers | epochs | val top-1 | wall time |")
print("|---|---|---|---|---|---|---|")
for res in sorted(Path(sys.argv[1]).glob("*/*/best_results.json")):
    r = json.loads(res.read_text())
    teachers = " + ".join(f"{t['arch']} ({t['val_top1'] or 0:.2f} %)" for t in r.get("teachers", [])) or "none"
    print(
        f"| {res.parent.parent.name} | {r['arch']} | {r['params']:,} | {teachers} | {r.get('planned_epochs', r['epochs_run'])} "
        f"| {r['val_top1']:.2f} % | {r['wall_time_seconds'] / 60:.1f} min |"
    )
EOF
lscpu | grep 'Model name'
