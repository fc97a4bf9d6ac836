"""Compare MAS, its variants and the baselines on the digits sequence (5 tasks of 2 digits).

    python3 benchmarks/digits_methods.py             # about 30 minutes on 2 CPU cores

For every method, reg_lambda is chosen by a small search: one run per value of its LAMBDAS grid with
--seed SEARCH_SEED, keeping the value with the best average final accuracy (a run that
diverges counts as failed). The chosen value is then run with seeds 0, 1, 2, and the table
reports the mean and standard deviation of the average final accuracy, the average forgetting
and the wall time. The digits split itself is fixed (data_prep.py --seed 0); the seeds change
initialisation and shuffling. Every row names the command that reproduces one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository runs from its folder

from data_prep import main as data_prep  # noqa: E402
from main import main as run_main  # noqa: E402

METHODS = {
    "mas (batch)": ["--method", "mas"],
    "mas (per_sample)": ["--method", "mas", "--omega_estimator", "per_sample"],
    "local_mas": ["--method", "local_mas"],
    "ewc": ["--method", "ewc"],
    "si": ["--method", "si"],
    "finetune": ["--method", "finetune"],
}
# EWC's Fisher is tiny where the model is confident (p(y|x) near 1), so its grid reaches higher.
LAMBDAS = {
    "mas (batch)": (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
    "mas (per_sample)": (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
    "local_mas": (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
    "ewc": (1.0, 100.0, 1e4, 1e5, 1e6, 1e7),
    "si": (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
}
SEARCH_SEED = 100
SEEDS = (0, 1, 2)


def run(data: Path, models: Path, flags: list[str], reg_lambda: float, seed: int) -> dict | None:
    """One main.py run; None if its loss diverged. Any other error stops the comparison."""
    argv = [
        "--data_dir",
        str(data),
        "--models_dir",
        str(models),
        "--overwrite",
        *flags,
        "--reg_lambda",
        str(reg_lambda),
        "--seed",
        str(seed),
    ]
    tic = time.perf_counter()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            results = run_main(argv)
    except SystemExit:
        if "the training loss became" in errors.getvalue():
            return None
        raise RuntimeError(f"main.py {' '.join(argv)} failed: {errors.getvalue().strip()}") from None
    return {
        "accuracy": results["average_accuracy"],
        "forgetting": results["average_forgetting"],
        "seconds": time.perf_counter() - tic,
    }


def search(data: Path, models: Path, flags: list[str], lambdas: tuple[float, ...]) -> tuple[float, list[str]]:
    lines, best = [], (float("nan"), -1.0)
    for reg_lambda in lambdas:
        result = run(data, models, flags, reg_lambda, SEARCH_SEED)
        shown = "diverged" if result is None else f"{result['accuracy']:.2f} % / {result['forgetting']:.2f} pp"
        lines.append(f"{reg_lambda:g}: {shown}")
        if result is not None and result["accuracy"] > best[1]:
            best = (reg_lambda, result["accuracy"])
    return best[0], lines


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", nargs="*", choices=list(METHODS), default=list(METHODS), help="methods to run (default: all)"
    )
    parser.add_argument(
        "--lambdas",
        type=float,
        nargs="*",
        default=None,
        help="values of reg_lambda to search (default: each method's grid in LAMBDAS)",
    )
    args = parser.parse_args(argv)
    rows = [
        "| method | reg_lambda | avg accuracy (%) | avg forgetting (pp) | wall time (s) | command (seed 0) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data, models = Path(tmp) / "Data", Path(tmp) / "models"
        with contextlib.redirect_stdout(io.StringIO()):
            data_prep(["--dataset", "digits", "--data_dir", str(data)])
        for name in args.methods:
            flags = METHODS[name]
            lambdas = tuple(args.lambdas) if args.lambdas else LAMBDAS.get(name, ())
            reg_lambda, tried = (0.0, ["no penalty"]) if name == "finetune" else search(data, models, flags, lambdas)
            print(f"{name}: search at seed {SEARCH_SEED}: " + "; ".join(tried) + f" -> {reg_lambda:g}", flush=True)
            if reg_lambda != reg_lambda:  # NaN: every value diverged
                rows.append(f"| {name} | every value diverged | | | | |")
                continue
            runs = [run(data, models, flags, reg_lambda, seed) for seed in SEEDS]
            if any(r is None for r in runs):
                rows.append(f"| {name} | {reg_lambda:g} | diverged on a seed | | | |")
                continue
            command = " ".join(["python3 main.py", *flags, "--reg_lambda", f"{reg_lambda:g}"])
            rows.append(
                f"| {name} | {reg_lambda:g} | {_mean_sd([r['accuracy'] for r in runs])} | "
                f"{_mean_sd([r['forgetting'] for r in runs])} | {_mean_sd([r['seconds'] for r in runs])} | "
                f"`{command}` |"
            )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
