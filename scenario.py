"""The three scenarios of continual learning (van de Ven & Tolias, "Three scenarios for continual
learning", 2019): what the network's output layer is in each, which labels the loss and the tests
use, and what a head file of a run holds.

- ``task`` (task-incremental, the MAS paper's multi-head setting and the default): a head per task;
  the task's identity is given at test, so task j is scored with head j.
- ``domain`` (domain-incremental): one head shared by all tasks, which all have the same number of
  classes; label k of every task is output k. Task t starts from the head after task t-1, and the
  tests score every task with the current head.
- ``class`` (class-incremental): one head whose outputs grow with each task's classes, C_1 + ... + C_t
  at task t (the rows of earlier classes copied from the previous head, the new rows drawn from the
  task's RNG stream). Task t's labels are offset by the number of earlier classes, so its loss and
  its tests use the outputs of every class seen so far, with no task identity.

``Task_k/head.pth`` holds the head as it was after task k in every scenario (domain and class: the
shared head at that point). The trunk, the importance and the penalty are the same in all three;
only the head the network ends in, and so the outputs whose squared norm MAS measures, differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_class import build_head
from utils import UserError
from utils.artefacts.model_files import HEAD, task_folder
from utils.data.tasks import TaskData

SCENARIOS = ("task", "domain", "class")
DESCRIPTIONS = {
    "task": "task-incremental: a head per task, the task given at test",
    "domain": "domain-incremental: one head shared by all tasks, no task given at test",
    "class": "class-incremental: one head over every class seen so far, no task given at test",
}


def class_counts(manifest: Mapping[str, Any]) -> list[int]:
    """The number of classes of each task, in training order."""
    return [len(task["classes"]) for task in manifest["tasks"]]


def check_scenario(scenario: str, manifest: Mapping[str, Any]) -> None:
    """The domain scenario shares one head: every task needs the same number of classes."""
    counts = class_counts(manifest)
    if scenario == "domain" and len(set(counts)) > 1:
        shown = ", ".join(f"{t['name']} {n}" for t, n in zip(manifest["tasks"], counts))
        raise UserError(
            f"--scenario domain shares one head, so every task needs the same number of classes; this data's "
            f"tasks have {shown}: use --scenario task or class"
        )


def label_offset(scenario: str, counts: list[int], task_no: int) -> int:
    """The output of task ``task_no``'s class 0: the number of earlier classes in the class scenario."""
    return sum(counts[: task_no - 1]) if scenario == "class" else 0


def head_outputs(scenario: str, counts: list[int], task_no: int) -> int:
    """How many outputs the head after task ``task_no`` has."""
    return sum(counts[:task_no]) if scenario == "class" else counts[task_no - 1]


class OffsetLabels:
    """A loader whose labels are shifted by ``offset``; everything else is the wrapped loader's."""

    def __init__(self, loader: Any, offset: int) -> None:
        self.loader = loader
        self.offset = offset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, labels in self.loader:
            yield inputs, labels + self.offset

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def with_label_offset(task: TaskData, offset: int) -> TaskData:
    """``task`` with every loader's labels shifted by ``offset`` (the task itself when 0)."""
    if offset == 0:
        return task
    loaders = [k for k in ("train", "importance", "test", "validation") if getattr(task, k) is not None]
    shifted = {k: OffsetLabels(getattr(task, k), offset) for k in loaders}
    return dataclasses.replace(task, **shifted)


def scenario_tasks(scenario: str, tasks: list[TaskData], counts: list[int]) -> list[TaskData]:
    """The tasks as the scenario labels them: in the class scenario task t's labels follow the earlier
    tasks' classes, so training, importance (EWC's labels) and tests all see the offset labels."""
    return [with_label_offset(task, label_offset(scenario, counts, t)) for t, task in enumerate(tasks, start=1)]


def start_head(scenario: str, trunk: nn.Module, n_classes: int, previous: nn.Linear | None) -> nn.Linear:
    """The head task t trains: new (task), the previous one (domain), or the previous one with
    ``n_classes`` new rows (class). A new head of ``n_classes`` rows is drawn in every scenario, so every
    task draws the same random numbers from its stream, whichever the scenario."""
    new = build_head(trunk, n_classes)
    if scenario == "task" or previous is None:
        return new
    if scenario == "domain":
        new.load_state_dict(previous.state_dict())
        return new
    grown = nn.utils.skip_init(nn.Linear, trunk.out_features, previous.out_features + n_classes)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([previous.weight.detach().to(new.weight.device), new.weight]))
        grown.bias.copy_(torch.cat([previous.bias.detach().to(new.bias.device), new.bias]))
    return grown


def scoring_head(scenario: str, heads: Mapping[int, nn.Linear], task_no: int, finished: int) -> nn.Linear:
    """The head that scores task ``task_no`` after task ``finished``: its own (task) or the current one."""
    return heads[task_no] if scenario == "task" else heads[finished]


def check_loaded_heads(scenario: str, heads: Mapping[int, nn.Linear], counts: list[int], models_dir: Path) -> None:
    """``--resume``: every finished task's head has the outputs the scenario gives it at that task."""
    for task_no, head in heads.items():
        expected = head_outputs(scenario, counts, task_no)
        if head.out_features != expected:
            raise UserError(
                f"{task_folder(models_dir, task_no) / HEAD} holds a head of {head.out_features} outputs; "
                f"after task {task_no} the {scenario} scenario has {expected}: is it a run of another scenario?"
            )
