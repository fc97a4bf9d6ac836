"""The tables of ``benchmarks/protocols_digits.sh``: per data set, per scenario (task, domain, class) and
method, average accuracy and average forgetting over tasks 1..T-1 (mean ± sample std over seeds) with
lambda chosen (A) by ``--hparam_search chf`` and (B) by ``sweep.py --select_on validation``.

Reads only the runs' ``results.json`` (and, for B, which lambda the sweep chose from ``sweep.json``):

    python3 benchmarks/protocols_table.py [out_dir, default protocols]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

METHODS = ("finetune", "mas", "ewc", "si", "l2", "local_mas")
SCENARIOS = ("task", "domain", "class")
SEQUENCES = ("split", "permuted")
HEADER = (
    "| scenario | method | CHF: accuracy (%) | CHF: forgetting (pp) | CHF: lambda, tasks 2-5 | CHF: lr, tasks 1-5 "
    "| val.-selected lambda | accuracy (%) | forgetting (pp) |\n"
    "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"
)


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` over seeds, with the number of seeds when it is not 3; ``-`` for none."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    seeds = "" if len(values) == 3 else f" ({len(values)} of 3 seeds)"
    return f"{statistics.mean(values):.2f} ± {std:.2f}{seeds}"


def counts(values: list[float]) -> str:
    """The values chosen and how often, most frequent first, e.g. ``10 ×9, 1 ×3``."""
    if not values:
        return "-"
    return ", ".join(f"{value:g} ×{n}" for value, n in Counter(values).most_common())


def complete_results(folders: list[Path]) -> list[dict]:
    """The results.json of the folders whose run finished (complete, not diverged)."""
    found = []
    for folder in folders:
        path = folder / "results.json"
        if path.is_file():
            results = json.loads(path.read_text())
            if results.get("complete") and not results.get("diverged"):
                found.append(results)
    return found


def metric_cells(runs: list[dict]) -> list[str]:
    return [mean_std([r["average_accuracy"] for r in runs]), mean_std([r["average_forgetting_previous"] for r in runs])]


def chf_cells(here: Path, method: str) -> list[str]:
    """(A): the CHF runs of ``method`` on seeds 0-2: metrics, chosen lambdas (tasks 2..T) and lrs."""
    runs = complete_results([here / "chf" / f"{method}_seed{seed}" for seed in (0, 1, 2)])
    chosen = [entry["chosen"] for r in runs for entry in r.get("hparam_search", []) if entry.get("chosen")]
    lambdas = [c["reg_lambda"] for c in chosen if c["reg_lambda"] is not None]
    shown_lambdas = counts(lambdas) if method != "finetune" else "(none)"
    return metric_cells(runs) + [shown_lambdas, counts([c["lr"] for c in chosen])]


def sweep_cells(here: Path, method: str) -> list[str]:
    """(B): the sweep's runs of ``method`` at the lambda it chose on validation accuracy."""
    record_path = here / "sweep" / "sweep.json"
    if not record_path.is_file():
        return ["-", "-", "-"]
    record = json.loads(record_path.read_text())
    chosen = record.get("selection", {}).get("chosen", {}).get(method)
    if method != "finetune" and chosen is None:
        return ["none", "-", "-"]
    folders = sorted((here / "sweep" / "runs").glob(f"{method}_*seed*"))
    runs = [r for r in complete_results(folders) if r["method"] == method and r["seed"] in (0, 1, 2)]
    runs = [r for r in runs if method == "finetune" or _run_lambda(r) == chosen]
    return ["(none)" if method == "finetune" else f"{chosen:g}"] + metric_cells(runs)


def _run_lambda(results: dict) -> float:
    args = results["args"]
    return float(args["reg_lambda"] if isinstance(args, dict) else args[args.index("--reg_lambda") + 1])


def table(out: Path, sequence: str) -> str:
    lines = [HEADER]
    for scenario in SCENARIOS:
        here = out / sequence / scenario
        for method in METHODS:
            cells = [scenario, method, *chf_cells(here, method), *sweep_cells(here, method)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "protocols")
    for sequence in SEQUENCES:
        if (out / sequence).is_dir():
            print(f"### {sequence.capitalize()} digits\n\n{table(out, sequence)}\n")


if __name__ == "__main__":
    main()
