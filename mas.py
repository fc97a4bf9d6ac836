"""Memory Aware Synapses (Aljundi et al., ECCV 2018) over a sequence of tasks.

``mas_train`` trains one task: it rebuilds the shared model from the previous task's
artefacts, anchors the penalty lambda * sum Omega (theta - theta*)^2 (Eq. 3) at those
weights through ``LocalSgd``, trains a new head and the trunk, measures the task's
importance Omega (Eq. 2 and 4), consolidates Omega_total = Omega_prev + Omega_t, and
saves the task's artefacts. ``compute_forgetting`` scores every task with its stored
head against the accuracy recorded right after it was trained.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model_class import TaskModel, build_head
from model_train import TaskResult, seed_everything, train_model
from optimizer_lib import LocalSgd
from utils.data_utils import TaskData
from utils.importance import mas_batch_importance
from utils.mas_utils import (
    attach_importance,
    consolidate_reg_params,
    create_freeze_layers,
    init_reg_params,
    init_reg_params_across_tasks,
    load_reg_params,
    penalty_stiffness,
    save_reg_params,
    trainable_parameters,
)
from utils.model_utils import (
    build_shared_model,
    evaluate,
    load_head,
    load_shared_model,
    read_performance,
    save_head,
    save_shared_model,
    task_folder,
    write_task_files,
)


@dataclass
class ForgettingRow:
    task: int
    after_training: float  # % test accuracy right after training the task (performance.txt)
    now: float  # % test accuracy with the final shared model and the task's head
    forgetting: float  # after_training - now, percentage points; positive = forgotten


def task_seed(seed: int, task_no: int) -> int:
    """Each task draws from its own stream, so a task can be rerun alone."""
    return seed * 10_007 + task_no


def _shared_model(task_no: int, args: argparse.Namespace) -> torch.nn.Module:
    if task_no == 1:
        shared = build_shared_model(args.arch, args.channels, args.image_size, args.pretrained)
    else:
        shared = load_shared_model(args.models_dir, args.arch, args.channels, args.image_size)
    create_freeze_layers(shared, args.num_freeze_layers)
    return shared


def _warn_if_unstable(reg_params: dict, args: argparse.Namespace) -> None:
    stiffness = penalty_stiffness(reg_params, args.init_lr, args.reg_lambda)
    limit = 2.0 * (1.0 + args.momentum)
    if stiffness >= limit:
        tqdm.write(
            f"warning: init_lr * 2 * reg_lambda * max(Omega) = {stiffness:.3g} exceeds {limit:.3g}, the stability "
            "limit of SGD on the penalty; training will likely diverge: lower --init_lr or --reg_lambda"
        )


def mas_train(task_no: int, task: TaskData, args: argparse.Namespace, device: torch.device) -> TaskResult:
    """Train task ``task_no`` (1-based) and write its artefacts under ``args.models_dir``."""
    seed_everything(task_seed(args.seed, task_no))
    shared = _shared_model(task_no, args)
    model = TaskModel(shared, build_head(shared, len(task.classes))).to(device)
    if task_no == 1:
        reg_params = init_reg_params(shared)
    else:
        reg_params = init_reg_params_across_tasks(load_reg_params(args.models_dir, shared), shared)
    optimizer = LocalSgd(
        trainable_parameters(model).values(),
        lr=args.init_lr,
        reg_lambda=args.reg_lambda,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    if task_no > 1 and args.reg_lambda > 0:
        attach_importance(optimizer, shared, reg_params)
        _warn_if_unstable(reg_params, args)

    def importance(trained: torch.nn.Module, data: TaskData) -> dict[str, torch.Tensor]:
        return mas_batch_importance(trained, data.importance, device)

    result = train_model(model, optimizer, task, args.num_epochs, args.init_lr, device, importance)
    reg_params = consolidate_reg_params(reg_params, result.omega, shared)
    task_folder(args.models_dir, task_no).mkdir(parents=True, exist_ok=True)
    save_head(model.head, args.models_dir, task_no)
    write_task_files(args.models_dir, task_no, result.test_accuracy, task.classes)
    save_shared_model(shared, args.models_dir)
    save_reg_params(reg_params, args.models_dir)
    return result


def compute_forgetting(
    models_dir: str | Path, tasks: list[TaskData], args: argparse.Namespace, device: torch.device
) -> list[ForgettingRow]:
    """Forgetting of each task: accuracy right after training it minus accuracy now."""
    shared = load_shared_model(models_dir, args.arch, args.channels, args.image_size)
    rows = []
    for task_no, task in enumerate(tasks, start=1):
        head = load_head(models_dir, task_no, shared.out_features)
        now = evaluate(TaskModel(shared, head).to(device), task.test, device, desc=f"{task.name} final test")
        before = read_performance(models_dir, task_no)
        rows.append(ForgettingRow(task_no, before, now, before - now))
    return rows
