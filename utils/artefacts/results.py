"""Machine-readable results of a run: ``results.json`` and ``accuracy_matrix.csv``.

Both are rewritten (atomically) after every task, so a killed run keeps its results up to its
last finished task; ``results.json`` also records the run's arguments and which tasks are final,
which is what ``--resume`` continues from.

acc[i][j] is the test accuracy (%) on task j with its own head after training task i
(task-incremental: the task is known at test time), for j <= i. From the last row T:

- average accuracy            mean_j acc[T][j]
- average forgetting          mean_j (acc[j][j] - acc[T][j]) over all T tasks: the terminal table's
                              (and the seed implementation's) definition, positive = forgotten
- average forgetting (previous) the same mean over the first T-1 tasks only (the last task is never
                              forgotten, so the mean over all T is (T-1)/T of it): the per-task figure papers report
- average forgetting (max)    mean_{j<T} (max_{j<=l<T} acc[l][j] - acc[T][j]) (Chaudhry et al., ECCV 2018)
- backward transfer          mean_{j<T} (acc[T][j] - acc[j][j]) (Lopez-Paz and Ranzato, NeurIPS 2017)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from utils import UserError, schema
from utils.artefacts.files import load_json, save_json, save_text

RESULTS = "results.json"
PROGRAM = "MAS-PyTorch main.py"
METRICS = (
    "average_accuracy",
    "average_forgetting",
    "average_forgetting_previous",
    "average_forgetting_max",
    "backward_transfer",
)  # the tag of this program's results and checkpoints
MATRIX_CSV = "accuracy_matrix.csv"


def torchvision_version() -> str:
    """torchvision.__version__ (with its build tag, e.g. +cu130) without importing torchvision, which
    costs two seconds of start-up: read from its version.py."""
    spec = importlib.util.find_spec("torchvision")
    text = (Path(spec.origin).parent / "version.py").read_text() if spec and spec.origin else ""
    found = re.search(r"^__version__ = ['\"]([^'\"]+)['\"]", text, re.M)
    return found.group(1) if found else importlib.metadata.version("torchvision")


def new_results(args: dict[str, Any], manifest: Mapping[str, Any], label: str) -> dict[str, Any]:
    """An empty results file for a run with the recorded arguments ``args``; ``label`` names it in plots."""
    return {
        "format": 1,
        "program": PROGRAM,
        "args": args,
        "method": args["method"],
        "label": label,
        "seed": args["seed"],
        "dataset": manifest["dataset"],
        "task_names": [t["name"] for t in manifest["tasks"]],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision_version(),
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
    return _check_results(results, str(path))


def _check_results(results: dict[str, Any], where: str) -> dict[str, Any]:
    """What --resume reads back: the finished tasks in order, their accuracies, the matrix."""
    schema.entry(results, "args", dict, where)
    names = schema.items(schema.entry(results, "task_names", list, where), str, f"{where}: 'task_names'")
    tasks = schema.items(schema.entry(results, "tasks", list, where), dict, f"{where}: 'tasks'")
    matrix = schema.items(schema.entry(results, "accuracy_matrix", list, where), list, f"{where}: 'accuracy_matrix'")
    if len(tasks) > len(names) or len(matrix) != len(tasks):
        raise UserError(f"{where}: {len(tasks)} finished tasks, {len(matrix)} matrix rows, {len(names)} task names")
    for number, (task, row) in enumerate(zip(tasks, matrix), start=1):
        if schema.entry(task, "task", int, f"{where}: tasks[{number - 1}]") != number:
            raise UserError(f"{where}: tasks[{number - 1}] is not task {number}")
        accuracy = schema.entry(task, "test_accuracy", float, f"{where}: tasks[{number - 1}]")
        schema.in_range(accuracy, 0.0, 100.0, f"{where}: tasks[{number - 1}]: 'test_accuracy'")
        if len(row) != len(names) or not all(a is None or schema.is_number(a) for a in row):
            raise UserError(f"{where}: accuracy_matrix[{number - 1}] must hold {len(names)} numbers or nulls")
    schema.entry(results, "eval_every_task", bool, where)
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
        return dict.fromkeys(METRICS)
    diagonal = [matrix[j][j] for j in range(t)]
    earlier = range(t - 1)
    best = [max(matrix[row][j] for row in range(j, t - 1) if matrix[row][j] is not None) for j in earlier]
    return {
        "average_accuracy": sum(last) / t,
        "average_forgetting": sum(d - a for d, a in zip(diagonal, last)) / t,
        "average_forgetting_previous": sum(diagonal[j] - last[j] for j in earlier) / (t - 1) if t > 1 else 0.0,
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
