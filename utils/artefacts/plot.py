"""Pictures of what a continual-learning run forgot (Memory Aware Synapses, Aljundi et al., ECCV 2018).

    python3 -m utils.artefacts.plot models/                       # one run
    python3 -m utils.artefacts.plot models_mas/ models_ewc/ models_ft/ --out plots/   # compare runs

From each run's ``results.json`` it writes

- ``accuracy_matrix[_<label>].png``: acc[i][j], the accuracy on task j after training task i, as
  a heatmap with the numbers in the cells (blank where a task was not evaluated), its colour scale
  fitted to the values (shown on the colour bar);
- ``forgetting.png``: per earlier task, its forgetting in percentage points (accuracy right after
  training it minus at the end), one marker on a stem per run, the axis fitted to the values.

Titles name the data set and the run's label (method and lambda).

``main.py --plot`` writes the same files under ``<models_dir>/plots/``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils import UserError  # noqa: E402
from utils.artefacts.files import atomic_open  # noqa: E402
from utils.artefacts.results import RESULTS, load_results  # noqa: E402

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


def fitted_range(values: np.ndarray, min_span: float) -> tuple[float, float]:
    """A colour or axis range around the finite ``values``: whole units outward, at least ``min_span`` wide,
    so that 91 % and 100 % get different colours instead of one end of a fixed 0-100 scale."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, min_span
    lo, hi = float(np.floor(finite.min())), float(np.ceil(finite.max()))
    if hi - lo < min_span:
        middle = (lo + hi) / 2
        lo, hi = middle - min_span / 2, middle + min_span / 2
    return lo, hi


def run_title(results: dict[str, Any], label: str | None = None) -> str:
    """ "<data set> (<scenario>-incremental): <method label>", for every figure of a run (a run recorded
    before main.py's --scenario existed is task-incremental)."""
    scenario = results.get("scenario", "task")
    return f"{results.get('dataset', 'data')} ({scenario}-incremental): {label or run_label(results)}"


def plot_accuracy_matrix(results: dict[str, Any], path: Path, label: str | None = None) -> Path:
    names = results["task_names"]
    rows = results["accuracy_matrix"]
    values = np.full((len(rows), len(names)), np.nan)
    for i, row in enumerate(rows):
        values[i] = [np.nan if a is None else a for a in row]
    vmin, vmax = fitted_range(values, min_span=2.0)
    fig, ax = plt.subplots(figsize=MATRIX_SIZE)
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            dark = (value - vmin) / (vmax - vmin) < 0.6  # white text on viridis' dark half
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [f"after {n}" for n in names[: len(rows)]])
    ax.set_xlabel("evaluated on")
    ax.set_title(f"{run_title(results, label)}\ntest accuracy (%), colour scale fitted to the values")
    fig.colorbar(image, ax=ax, label=f"accuracy (%), {vmin:g} to {vmax:g}")
    fig.tight_layout()
    return save_figure(fig, path)


def forgetting_per_task(results: dict[str, Any]) -> list[float | None]:
    """acc[j][j] - acc[T][j] for each task j before the last (pp, positive = forgotten; None: not scored)."""
    matrix = results["accuracy_matrix"]
    last = matrix[-1]
    return [None if last[j] is None else matrix[j][j] - last[j] for j in range(len(matrix) - 1)]


MARKERS = "osD^v<>ph*XP"


def plot_forgetting(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Forgetting in pp per earlier task, one dodged marker on a stem per run: readable at many runs, with
    an axis fitted to the values and no marker under another (each run has its own offset and marker)."""
    fig, ax = plt.subplots(figsize=BARS_SIZE)
    n_tasks = max(len(r["accuracy_matrix"]) for _, r in runs) - 1
    spread = 0.7 / max(len(runs), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    every = []
    for k, (label, results) in enumerate(runs):
        forgetting = [np.nan if f is None else f for f in forgetting_per_task(results)]
        every += forgetting
        x = np.arange(len(forgetting)) + (k - (len(runs) - 1) / 2) * spread
        colour = colours[k % len(colours)]
        ax.vlines(x, 0, forgetting, color=colour, linewidth=1.5)
        mean = np.nanmean(forgetting) if forgetting and not np.all(np.isnan(forgetting)) else float("nan")
        ax.plot(x, forgetting, MARKERS[k % len(MARKERS)], color=colour, label=f"{label} (mean {mean:.2f} pp)")
    ax.axhline(0, color="grey", linewidth=0.8)
    if n_tasks < 1:
        ax.text(0.5, 0.5, "one task: nothing earlier to forget", ha="center", va="center", transform=ax.transAxes)
    lo, hi = fitted_range(np.array([0.0, *every], dtype=float), min_span=1.0)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xticks(range(n_tasks), runs[0][1]["task_names"][:n_tasks])
    ax.set_ylabel("forgetting (pp): after training - at the end")
    named = run_title(runs[0][1], runs[0][0]) if len(runs) == 1 else runs[0][1].get("dataset", "data")
    ax.set_title(f"{named}: forgetting of each earlier task (positive = forgotten)")
    ax.grid(axis="y", alpha=0.3)
    columns = 1 if len(runs) <= 3 else 2
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=columns, frameon=False)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.92, bottom=0.12 + 0.035 * -(-len(runs) // columns))
    return save_figure(fig, path)


def file_stems(labels: list[str]) -> list[str]:
    """A file-name part per run from its label ("mas batch, lambda=0.5" -> "mas_batch_lambda_0.5"), unique."""
    stems, seen = [], {}
    for label in labels:
        stem = re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_.") or "run"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def write_plots(runs: list[tuple[str, dict[str, Any]]], out: Path) -> list[Path]:
    """The heatmap of every run (named after its label when there are several) and one forgetting chart."""
    out.mkdir(parents=True, exist_ok=True)
    names = (
        ["accuracy_matrix"] if len(runs) == 1 else [f"accuracy_matrix_{s}" for s in file_stems([lb for lb, _ in runs])]
    )
    written = [plot_accuracy_matrix(r, out / f"{name}.png", label) for name, (label, r) in zip(names, runs)]
    written.append(plot_forgetting(runs, out / "forgetting.png"))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python3 -m utils.artefacts.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
