#!/usr/bin/env bash
# The comparison of issue 21: every method on split digits and permuted digits (5 tasks), seeds 0-2,
# under the three main.py scenarios (task, domain, class), proximal step, 10 % of each class's
# training images held out for validation, lambda chosen two ways on that validation set:
#   (A) --hparam_search chf: per task, lr from 0.05 0.02 0.005 by fine-tuning, then lambda decayed
#       from 10 (mas, local_mas, si, l2; x0.1, at most 3 tries: 10 1 0.1) or 1e6 (ewc; x0.01: 1e6
#       1e4 1e2) until validation accuracy >= 0.8 A*; trials of 5 epochs;
#   (B) sweep.py --select_on validation over the same lambdas (lr 0.02, the digits preset).
# Epochs reduced to fit 2 CPU cores: 10 per task (the preset is 30), CHF trials 5.
# Usage: bash benchmarks/protocols_digits.sh [out_dir, default protocols]; then
#        python3 benchmarks/protocols_table.py [out_dir]. Resumable: finished runs are skipped.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
out=${1:-protocols}
common=(--val_fraction 0.1 --penalty_step proximal --num_epochs 10 --num_workers 0)
chf=(--hparam_search chf --chf_lrs 0.05 0.02 0.005 --chf_epochs 5 --chf_max_tries 3)
export OMP_NUM_THREADS=1  # two runs at a time on two cores

if [[ "${1:-}" == "--one-chf" ]]; then  # one CHF run: --one-chf data_dir scenario method seed run_dir
    data=$2 scenario=$3 method=$4 seed=$5 run=$6
    case $method in
        ewc) start=(--chf_lambda 1e6 --chf_decay 0.01) ;;
        *) start=(--chf_lambda 10 --chf_decay 0.1) ;;
    esac
    if [[ -f $run/results.json ]] && grep -q '"complete": true' "$run/results.json"; then exit 0; fi
    again=(); [[ -d $run ]] && again=(--resume)
    mkdir -p "$(dirname "$run")/../logs"
    python3 main.py --data_dir "$data" --scenario "$scenario" --method "$method" --seed "$seed" \
        "${common[@]}" "${chf[@]}" "${start[@]}" --models_dir "$run" "${again[@]}" \
        > "$(dirname "$run")/../logs/chf_$(basename "$run").log" 2>&1 && echo "done $run" || echo "FAILED $run"
    exit 0
fi

methods=(finetune mas ewc si l2 local_mas)
for sequence in split permuted; do
    data=$out/data/$sequence-digits
    python3 data_prep.py --dataset digits --scenario "$sequence" --data_dir "$data"
    for scenario in domain class task; do
        here=$out/$sequence/$scenario
        python3 sweep.py --methods finetune "mas --reg_lambda 0.1 1 10" "ewc --reg_lambda 1e2 1e4 1e6" \
            "si --reg_lambda 0.1 1 10" "l2 --reg_lambda 0.1 1 10" "local_mas --reg_lambda 0.1 1 10" \
            --select_on validation --seeds 0 1 2 --jobs 2 --out "$here/sweep" \
            -- --data_dir "$data" --scenario "$scenario" "${common[@]}"
        for seed in 0 1 2; do for method in "${methods[@]}"; do
            echo "$data $scenario $method $seed $here/chf/${method}_seed$seed"
        done; done | xargs -P 2 -L 1 bash "$self" --one-chf
    done
done
