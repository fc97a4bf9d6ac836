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
from model_train import ImportanceFn, TaskResult, seed_everything, train_model
from optimizer_lib import LocalSgd
from utils.checkpoint import restore_rng, save_checkpoint
from utils.data_utils import TaskData
from utils.importance import (
    ewc_fisher,
    local_mas_importance,
    mas_batch_importance,
    mas_per_sample_importance,
    si_importance,
)
from utils.mas_utils import (
    attach_importance,
    check_reg_params,
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
    check_tensors,
    evaluate,
    load_head,
    load_shared_model,
    read_performance,
    save_head,
    save_shared_model,
    task_folder,
    write_task_files,
)

METHODS = ("mas", "local_mas", "ewc", "si", "finetune")
OMEGA_ESTIMATORS = {"batch": mas_batch_importance, "per_sample": mas_per_sample_importance}


@dataclass
class ForgettingRow:
    task: int
    after_training: float  # % test accuracy right after training the task (performance.txt)
    now: float  # % test accuracy with the final shared model and the task's head
    forgetting: float  # after_training - now, percentage points; positive = forgotten


def task_seed(seed: int, task_no: int) -> int:
    """Each task draws from its own stream, so a task can be rerun alone."""
    return seed * 10_007 + task_no


def _shared_model(task_no: int, args: argparse.Namespace, weights_from_checkpoint: bool) -> torch.nn.Module:
    """Task 1 starts from a new (or ImageNet) trunk, later tasks from the previous task's; when the
    weights will come from a checkpoint only the structure is built."""
    if task_no == 1 or weights_from_checkpoint:
        pretrained = args.pretrained and not weights_from_checkpoint
        shared = build_shared_model(args.arch, args.channels, args.image_size, pretrained)
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


def select_importance(
    args: argparse.Namespace, device: torch.device, optimizer: LocalSgd, shared: torch.nn.Module, reg_params: dict
) -> ImportanceFn:
    """The one place where the method is chosen: a method is the importance it computes
    (and, for SI, what the optimizer accumulates while training). Everything else is shared."""
    if args.method == "mas":
        estimator = OMEGA_ESTIMATORS[args.omega_estimator]
        return lambda model, task: estimator(model, task.importance, device)
    if args.method == "local_mas":
        return lambda model, task: local_mas_importance(model, task.importance, device)
    if args.method == "ewc":
        return lambda model, task: ewc_fisher(model, task.importance, device)
    if args.method == "si":
        theta_start = {name: entry["init_val"] for name, entry in reg_params.items()}
        for param in trainable_parameters(shared).values():
            if "path_integral" not in optimizer.state[param]:  # a resumed task keeps its integral
                optimizer.start_path_integral(param)
        return lambda model, task: si_importance(optimizer, shared, theta_start, args.si_xi)
    if args.method == "finetune":
        return lambda model, task: {name: torch.zeros_like(e["omega"]) for name, e in reg_params.items()}
    raise ValueError(f"unknown method {args.method!r}; choose from {METHODS}")


def _start_task(task_no: int, task: TaskData, args: argparse.Namespace, checkpoint: dict | None):
    """Model and reg_params at the start of the task, or where the checkpoint left them."""
    if checkpoint is None:
        seed_everything(task_seed(args.seed, task_no))
    shared = _shared_model(task_no, args, weights_from_checkpoint=checkpoint is not None)
    model = TaskModel(shared, build_head(shared, len(task.classes)))
    if checkpoint is not None:
        check_tensors(checkpoint["model"], model.state_dict(), "the checkpoint's model")
        model.load_state_dict(checkpoint["model"])
        check_reg_params(checkpoint["reg_params"], shared, "the checkpoint's reg_params")
        return model, checkpoint["reg_params"]
    if task_no == 1:
        return model, init_reg_params(shared)
    return model, init_reg_params_across_tasks(load_reg_params(args.models_dir, shared), shared)


def _optimizer(
    model: TaskModel, reg_params: dict, args: argparse.Namespace, task_no: int, checkpoint: dict | None
) -> LocalSgd:
    optimizer = LocalSgd(
        trainable_parameters(model).values(),
        lr=args.init_lr,
        reg_lambda=args.reg_lambda,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if task_no > 1 and args.reg_lambda > 0 and args.method != "finetune":
        attach_importance(optimizer, model.shared, reg_params)
        _warn_if_unstable(reg_params, args)
    return optimizer


def _save_task(
    task_no: int, task: TaskData, args: argparse.Namespace, model: TaskModel, reg_params: dict, result: TaskResult
) -> None:
    """The task's final artefacts; the shared model and reg_params are replaced last."""
    task_folder(args.models_dir, task_no).mkdir(parents=True, exist_ok=True)
    save_head(model.head, args.models_dir, task_no)
    write_task_files(args.models_dir, task_no, result.test_accuracy, task.classes)
    save_shared_model(model.shared, args.models_dir)
    save_reg_params(reg_params, args.models_dir)


def mas_train(
    task_no: int, task: TaskData, args: argparse.Namespace, device: torch.device, checkpoint: dict | None = None
) -> TaskResult:
    """Train task ``task_no`` (1-based), from its start or from ``checkpoint``, checkpointing
    after every epoch, and write its artefacts under ``args.models_dir``."""
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    model, reg_params = _start_task(task_no, task, args, checkpoint)
    model.to(device)
    optimizer = _optimizer(model, reg_params, args, task_no, checkpoint)
    importance = select_importance(args, device, optimizer, model.shared, reg_params)
    if checkpoint is not None:
        restore_rng(checkpoint["rng"])

    def on_epoch_end(epoch: int, history: list[dict]) -> None:
        save_checkpoint(args.models_dir, task_no, epoch, args, model, optimizer, reg_params, history)

    start_epoch = 0 if checkpoint is None else checkpoint["epoch"] + 1
    history = [] if checkpoint is None else checkpoint["history"]
    result = train_model(
        model,
        optimizer,
        task,
        args.num_epochs,
        args.init_lr,
        device,
        importance,
        start_epoch=start_epoch,
        history=history,
        on_epoch_end=on_epoch_end,
    )
    reg_params = consolidate_reg_params(reg_params, result.omega, model.shared)
    _save_task(task_no, task, args, model, reg_params, result)
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
