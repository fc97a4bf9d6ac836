"""Machine-readable results of a run: ``results.json`` and ``accuracy_matrix.csv``.

Both are rewritten (atomically) after every task, so a killed run keeps its results up to its
last finished task; ``results.json`` also records the run's arguments and which tasks are final,
which is what ``--resume`` continues from.

acc[i][j] is the test accuracy (%) on task j with its own head after training task i
(task-incremental: the task is known at test time), for j <= i. From the last row T:

- average accuracy            mean_j acc[T][j]
- average forgetting          mean_j (acc[j][j] - acc[T][j]) over all T tasks: the terminal table's
                              (and the seed implementation's) definition, positive = forgotten
- average forgetting (max)    mean_{j<T} (max_{j<=l<T} acc[l][j] - acc[T][j]) (Chaudhry et al., ECCV 2018)
- backward transfer          mean_{j<T} (acc[T][j] - acc[j][j]) (Lopez-Paz and Ranzato, NeurIPS 2017)
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision

from utils import UserError
from utils.io_utils import load_json, save_json, save_text

RESULTS = "results.json"
MATRIX_CSV = "accuracy_matrix.csv"


def new_results(args: dict[str, Any], manifest: Mapping[str, Any], label: str) -> dict[str, Any]:
    """An empty results file for a run with the recorded arguments ``args``; ``label`` names it in plots."""
    return {
        "format": 1,
        "args": args,
        "method": args["method"],
        "label": label,
        "seed": args["seed"],
        "dataset": manifest["dataset"],
        "task_names": [t["name"] for t in manifest["tasks"]],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "eval_every_task": args["eval_every_task"],
        "tasks": [],
        "accuracy_matrix": [],
        "complete": False,
    }


def load_results(models_dir: str | Path) -> dict[str, Any] | None:
    path = Path(models_dir) / RESULTS
    if not path.exists():
        return None
    results = load_json(path)
    if not isinstance(results, dict) or results.get("format") != 1 or "args" not in results:
        raise UserError(f"{path} is not a results file of this program")
    return results


def record_task(results: dict[str, Any], entry: dict[str, Any], accuracies: list[float] | None) -> None:
    """Append a finished task; ``accuracies`` is the matrix row (tasks 1..i), or None to keep
    only the diagonal (``--no-eval_every_task``)."""
    task_no = len(results["tasks"]) + 1
    n_tasks = len(results["task_names"])
    results["tasks"].append(entry)
    row: list[float | None] = [None] * n_tasks
    if accuracies is not None:
        row[:task_no] = accuracies
    else:
        row[task_no - 1] = entry["test_accuracy"]
    results["accuracy_matrix"].append(row)
    results["complete"] = task_no == n_tasks
    results.update(summarize(results["accuracy_matrix"]))
    if not results["eval_every_task"]:
        results["note"] = (
            "--no-eval_every_task: rows before the last hold only their diagonal "
            "(accuracy right after training the task)"
        )


def summarize(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """Metrics from the last row, if it is complete (all tasks seen so far evaluated)."""
    t = len(matrix)
    last = matrix[-1][:t] if matrix else []
    if not last or any(a is None for a in last):
        return {
            "average_accuracy": None,
            "average_forgetting": None,
            "average_forgetting_max": None,
            "backward_transfer": None,
        }
    diagonal = [matrix[j][j] for j in range(t)]
    earlier = range(t - 1)
    best = [max(matrix[row][j] for row in range(j, t - 1) if matrix[row][j] is not None) for j in earlier]
    return {
        "average_accuracy": sum(last) / t,
        "average_forgetting": sum(d - a for d, a in zip(diagonal, last)) / t,
        "average_forgetting_max": sum(b - last[j] for j, b in enumerate(best)) / (t - 1) if t > 1 else 0.0,
        "backward_transfer": sum(last[j] - diagonal[j] for j in earlier) / (t - 1) if t > 1 else 0.0,
    }


def format_pp(value: float) -> str:
    """A percentage (or percentage points) with two decimals, never "-0.00"."""
    return f"{round(value, 2) + 0.0:.2f}"


def matrix_csv(results: dict[str, Any]) -> str:
    names = results["task_names"]
    lines = ["after_task," + ",".join(names)]
    for name, row in zip(names, results["accuracy_matrix"]):
        lines.append(name + "," + ",".join("" if a is None else f"{a:.4f}" for a in row))
    return "\n".join(lines) + "\n"


def save_results(results: dict[str, Any], models_dir: str | Path) -> None:
    save_json(results, Path(models_dir) / RESULTS)
    save_text(matrix_csv(results), Path(models_dir) / MATRIX_CSV)
