"""Task-agnostic accuracy (TAg) of a task-incremental run, as FACIL reports it next to the
task-aware one (TAw, each task scored with its own head: the accuracy matrix).

After task i, task j (j <= i) is scored by the argmax over the concatenated outputs of heads 1..i:
correct when it falls on task j's true class, i.e. on output C_1 + ... + C_{j-1} + y. The task's
identity is not used, so this is what the task scenario's network scores as a class-incremental
classifier. ``results.json`` holds the matrix (``task_agnostic_accuracy_matrix``, rows as the accuracy
matrix's) and ``task_agnostic``, its metrics by ``utils.artefacts.results.summarize``. The domain and class
scenarios score without the task's identity already: their accuracy matrix is the task-agnostic one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model_class import TaskModel
from model_train import evaluate
from scenario import OffsetLabels
from utils.artefacts.results import summarize
from utils.data.tasks import TaskData

TAG_MATRIX = "task_agnostic_accuracy_matrix"
TAG_METRICS = "task_agnostic"


class ConcatHeads(nn.Module):
    """The outputs of several heads side by side: one classifier over all their classes."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=1)


def task_agnostic_accuracy(
    shared: nn.Module, heads: list[nn.Module], task_no: int, task: TaskData, device: torch.device
) -> float:
    """% of task ``task_no``'s test images whose argmax over all of ``heads`` (tasks 1..i, in order) falls
    on their class; counts are summed over the ranks under torchrun (``evaluate``)."""
    offset = sum(head.out_features for head in heads[: task_no - 1])
    model = TaskModel(shared, ConcatHeads(heads)).to(device)
    return evaluate(model, OffsetLabels(task.test, offset), device, desc=f"{task.name} task-agnostic test")


def start_task_agnostic(results: dict[str, Any]) -> None:
    """A new task-scenario run's results get the empty matrix and its metrics."""
    results[TAG_MATRIX] = []
    results[TAG_METRICS] = summarize([])


def record_task_agnostic(
    results: dict[str, Any], shared: nn.Module, heads: dict[int, nn.Module], tasks: list[TaskData], full: bool, device
) -> None:
    """Row i of the matrix after task i = len(tasks): every task 1..i when ``full`` (the accuracy matrix has
    the whole row), else task i alone. A run begun before the matrix existed has none: none is started."""
    matrix = results.get(TAG_MATRIX)
    finished = len(tasks)
    if matrix is None or len(matrix) != finished - 1:
        return
    ordered = [heads[t] for t in range(1, finished + 1)]
    row: list[float | None] = [None] * len(results["task_names"])
    for task_no, task in enumerate(tasks, start=1):
        if full or task_no == finished:
            row[task_no - 1] = task_agnostic_accuracy(shared, ordered, task_no, task, device)
    matrix.append(row)
    results[TAG_METRICS] = summarize(matrix)
