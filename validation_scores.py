"""The validation accuracy matrix of a run with ``--val_fraction`` (utils/data/validation.py).

val[i][j] is the accuracy (%) on task j's held-out training images, with the test transforms and
the head the scenario scores task j with (as its test set), after training task i: the same shape and
semantics as ``accuracy_matrix`` (utils/artefacts/results.py), None where not scored (j > i, and j < i
with ``--no-eval_every_task``).
"""

from __future__ import annotations

from typing import Any

import torch

from mas import RunState, score_task
from utils.artefacts.results import summarize
from utils.data.tasks import TaskData


def score_validation(
    state: RunState, seen: list[TaskData], n_tasks: int, device: torch.device, every_task: bool
) -> list[float | None]:
    """The matrix row after the last of the ``seen`` tasks, scored with the run's trunk in memory."""
    row: list[float | None] = [None] * n_tasks
    scored = range(1, len(seen) + 1) if every_task else [len(seen)]
    for task_no in scored:
        task = seen[task_no - 1]
        row[task_no - 1] = score_task(state, task_no, task.validation, device, f"{task.name} validation")
    return row


def record_validation(results: dict[str, Any], row: list[float | None]) -> None:
    """Append ``row`` to ``validation_accuracy_matrix``; ``validation_average_accuracy`` is the mean of
    the last row when every task seen so far was scored in it (None otherwise)."""
    matrix = results.setdefault("validation_accuracy_matrix", [])
    matrix.append(row)
    results["validation_average_accuracy"] = summarize(matrix)["average_accuracy"]  # as the test matrix's
