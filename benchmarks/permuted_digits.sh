#!/usr/bin/env bash
# The method comparison of the README ("Results on Permuted digits"): every method, lambda chosen on
# seed 100 and reported on seeds 0-2, with the explicit and the proximal penalty step. Offline.
# Resumable: run it again after an interruption and finished runs are skipped. About 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
data=sweeps/data/permuted-digits
python3 data_prep.py --dataset digits --scenario permuted --data_dir "$data"
export OMP_NUM_THREADS=1  # two runs at a time on two cores
for step in explicit proximal; do
    python3 sweep.py --methods mas "mas --omega_estimator per_sample" local_mas si l2 finetune \
        --reg_lambda 0.01 0.1 1 10 100 --select_seeds 100 --seeds 0 1 2 --jobs 2 \
        --out "sweeps/permuted-$step" -- --data_dir "$data" --penalty_step "$step"
    python3 sweep.py --methods ewc --reg_lambda 1 100 10000 100000 1000000 10000000 \
        --select_seeds 100 --seeds 0 1 2 --jobs 2 \
        --out "sweeps/permuted-$step-ewc" -- --data_dir "$data" --penalty_step "$step"
done
# One plot per step with every method (EWC's lambda grid is its own sweep), for the README.
mkdir -p docs
for step in explicit proximal; do
    python3 - "$step" <<'PY'
import json, sys
from pathlib import Path
from sweep import write_plot
step = sys.argv[1]
rows = [row for name in (f"permuted-{step}", f"permuted-{step}-ewc")
        for row in json.loads(Path(f"sweeps/{name}/sweep.json").read_text())["table"]]
print("wrote", write_plot(rows, Path(f"docs/permuted-digits-{step}.png")))
PY
done
