"""The validation accuracy matrix of a run with ``--val_fraction`` (utils/data/validation.py).

val[i][j] is the accuracy (%) on task j's held-out training images, with the test transforms and
task j's own head, after training task i: the same shape and semantics as ``accuracy_matrix``
(utils/artefacts/results.py), None where not scored (j > i, and j < i with ``--no-eval_every_task``).
"""

from __future__ import annotations

from typing import Any

import torch

from mas import RunState
from model_class import TaskModel
from model_train import evaluate
from scenario import scoring_head
from utils.data.tasks import TaskData


def score_validation(
    state: RunState, seen: list[TaskData], n_tasks: int, device: torch.device, every_task: bool
) -> list[float | None]:
    """The matrix row after the last of the ``seen`` tasks, scored with the run's trunk in memory."""
    row: list[float | None] = [None] * n_tasks
    scored = range(1, len(seen) + 1) if every_task else [len(seen)]
    for task_no in scored:
        task = seen[task_no - 1]
        head = scoring_head(state.config.scenario, state.heads, task_no, state.finished)  # as the test set
        model = TaskModel(state.shared, head).to(device)
        row[task_no - 1] = evaluate(model, task.validation, device, desc=f"{task.name} validation")
    return row


def record_validation(results: dict[str, Any], row: list[float | None]) -> None:
    """Append ``row`` to ``validation_accuracy_matrix``; ``validation_average_accuracy`` is the mean of
    the last row when every task seen so far was scored in it (None otherwise)."""
    matrix = results.setdefault("validation_accuracy_matrix", [])
    matrix.append(row)
    last = row[: len(matrix)]
    complete = all(a is not None for a in last)
    results["validation_average_accuracy"] = sum(last) / len(last) if complete else None
