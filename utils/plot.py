"""Pictures of what a continual-learning run forgot (Memory Aware Synapses, Aljundi et al., ECCV 2018).

    python3 -m utils.plot models/                       # one run
    python3 -m utils.plot models_mas/ models_ewc/ models_ft/ --out plots/   # compare runs

From each run's ``results.json`` it writes

- ``accuracy_matrix[_<label>].png``: acc[i][j], the accuracy on task j after training task i, as
  a heatmap with the numbers in the cells (blank where a task was not evaluated);
- ``before_after.png``: per task, the accuracy right after training it (light bar) and at the
  end of the sequence (solid bar), one colour per run.

``main.py --plot`` writes the same files under ``<models_dir>/plots/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils import UserError  # noqa: E402
from utils.io_utils import atomic_open  # noqa: E402
from utils.results import RESULTS, load_results  # noqa: E402

DPI = 100
MATRIX_SIZE = (6.4, 5.6)  # inches: 640 x 560 pixels
BARS_SIZE = (9.6, 5.4)  # 960 x 540 pixels


def run_label(results: dict[str, Any]) -> str:
    """The method's own label for the run (e.g. "mas batch, lambda=0.2"), as ``main.py`` recorded it."""
    return results.get("label", results["method"])


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png", dpi=DPI)
    plt.close(fig)
    return path


def plot_accuracy_matrix(results: dict[str, Any], path: Path, title: str | None = None) -> Path:
    names = results["task_names"]
    rows = results["accuracy_matrix"]
    values = np.full((len(rows), len(names)), np.nan)
    for i, row in enumerate(rows):
        values[i] = [np.nan if a is None else a for a in row]
    fig, ax = plt.subplots(figsize=MATRIX_SIZE)
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if value < 60 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [f"after {n}" for n in names[: len(rows)]])
    ax.set_xlabel("evaluated on")
    ax.set_title(title or f"test accuracy (%): {run_label(results)}")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return save_figure(fig, path)


def before_after(results: dict[str, Any]) -> tuple[list[float], list[float | None]]:
    """Accuracy right after training each task (the diagonal) and at the end (the last row)."""
    matrix = results["accuracy_matrix"]
    return [matrix[j][j] for j in range(len(matrix))], list(matrix[-1][: len(matrix)])


def plot_before_after(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=BARS_SIZE)
    n_tasks = max(len(r["accuracy_matrix"]) for _, r in runs)
    width = 0.8 / (2 * len(runs))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, results) in enumerate(runs):
        after, end = before_after(results)
        x = np.arange(len(after)) + (2 * k - len(runs)) * width + width / 2
        colour = colours[k % len(colours)]
        ax.bar(x, after, width, color=colour, alpha=0.35, label=f"{label} (after)")
        ax.bar(x + width, [np.nan if e is None else e for e in end], width, color=colour, label=f"{label} (end)")
    ax.set_xticks(range(n_tasks), runs[0][1]["task_names"][:n_tasks])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("right after training each task (light) vs at the end of the sequence (solid)")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.subplots_adjust(left=0.07, right=0.68, bottom=0.1, top=0.92)  # room for the legend on the right
    return save_figure(fig, path)


def write_plots(runs: list[tuple[str, dict[str, Any]]], out: Path) -> list[Path]:
    """The heatmap of every run and one bar chart comparing them all."""
    out.mkdir(parents=True, exist_ok=True)
    suffixes = [""] if len(runs) == 1 else [f"_{i + 1}" for i in range(len(runs))]
    written = [
        plot_accuracy_matrix(r, out / f"accuracy_matrix{s}.png", f"test accuracy (%): {label}")
        for s, (label, r) in zip(suffixes, runs)
    ]
    written.append(plot_before_after(runs, out / "before_after.png"))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python3 -m utils.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="models folders (or results.json files) of finished runs")
    parser.add_argument("--out", default="plots", help="folder for the PNG files (default: %(default)s)")
    parser.add_argument(
        "--labels",
        nargs="*",
        default=None,
        help="one legend label per run (default: %(default)s, i.e. method and lambda)",
    )
    args = parser.parse_args(argv)
    try:
        loaded = []
        for run in args.runs:
            folder = Path(run).parent if Path(run).name == RESULTS else Path(run)
            results = load_results(folder)
            if results is None or not results["accuracy_matrix"]:
                raise UserError(f"{folder} holds no {RESULTS} with a finished task")
            loaded.append(results)
        labels = args.labels or [run_label(r) for r in loaded]
        if len(labels) != len(loaded):
            raise UserError(f"{len(labels)} labels for {len(loaded)} runs")
        written = write_plots(list(zip(labels, loaded)), Path(args.out))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
