#!/usr/bin/env bash
# The README's check of --penalty_step proximal on the split-digits quick start: MAS at lambda up to
# 100 and EWC at 10^6 (and 10^7), explicit against proximal step, seeds 0-2, the manifest's defaults
# (MLP, lr 0.02, momentum 0.9, batch 8, 30 epochs); then EWC at 10^6 with the settings of the report
# that found the explicit step diverging (lr 0.01, batch 16, 10 epochs). Offline, resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
data=sweeps/data/split-digits
python3 data_prep.py --dataset digits --data_dir "$data"
export OMP_NUM_THREADS=1  # two runs at a time on two cores
for step in explicit proximal; do
    python3 sweep.py --methods mas --reg_lambda 0.1 1 10 100 --seeds 0 1 2 --jobs 2 \
        --out "sweeps/split-$step" -- --data_dir "$data" --penalty_step "$step"
    python3 sweep.py --methods ewc --reg_lambda 1000000 10000000 --seeds 0 1 2 --jobs 2 \
        --out "sweeps/split-$step-ewc" -- --data_dir "$data" --penalty_step "$step"
    python3 sweep.py --methods ewc --reg_lambda 1000000 --seeds 0 1 2 --jobs 2 \
        --out "sweeps/split-$step-ewc-lr0.01" -- --data_dir "$data" --penalty_step "$step" \
        --init_lr 0.01 --batch_size 16 --num_epochs 10
done
