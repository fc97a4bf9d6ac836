"""Memory Aware Synapses (Aljundi et al., ECCV 2018) over a sequence of tasks.

The run lives in memory (``RunState``: the shared trunk, the heads, ``reg_params`` and the results);
the disk is written for artefacts and checkpoints and read only when resuming.

``mas_train`` trains one task with the chosen method (``methods/``): it copies the shared trunk of
the previous task, anchors the penalty lambda * sum Omega (theta - theta*)^2 (Eq. 3) at those
weights through ``LocalSgd``, trains the trunk and the scenario's head (``scenario.py``: a new one
per task, or one shared by all tasks), measures the task's importance
Omega (for MAS Eq. 2 and 4), consolidates Omega_total = Omega_prev + Omega_t, and saves the
task's artefacts. ``compute_forgetting`` scores every task with the trunk and its head in memory
against the accuracy recorded right after it was trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config import RunConfig
from methods import Method, method_class
from model_class import TaskModel, build_shared_model, create_freeze_layers, trainable_parameters
from model_train import Precision, evaluate, make_precision, seed_everything, train_model
from optimizer_lib import LocalSgd
from reg_params import (
    RegParams,
    at_task_start,
    check_reg_params,
    consolidate_reg_params,
    init_reg_params,
    init_reg_params_across_tasks,
    load_reg_params,
    save_reg_params,
)
from scenario import check_loaded_heads, class_counts, scoring_head, start_head
from utils import Diverged
from utils.artefacts.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    check_optimizer_state,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from utils.artefacts.model_files import (
    check_tensors,
    load_head,
    load_shared_state,
    save_head,
    save_shared_model,
    task_folder,
    write_task_files,
)
from utils.data.tasks import TaskData
from utils.runtime import distributed


@dataclass
class ForgettingRow:
    task: int
    after_training: float  # % test accuracy right after training the task (performance.txt)
    now: float  # % test accuracy with the final shared model and the task's head
    forgetting: float  # after_training - now, percentage points; positive = forgotten


@dataclass
class TaskResult:
    omega: dict[str, torch.Tensor]
    test_accuracy: float
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    importance_seconds: float = 0.0


@dataclass
class RunState:
    """A run across tasks: what the next task starts from, and what scoring needs."""

    config: RunConfig
    results: dict[str, Any]  # results.json: the finished tasks, the accuracy matrix
    shared: nn.Module | None = None  # the trunk after the last finished task
    heads: dict[int, nn.Linear] = field(default_factory=dict)
    reg_params: RegParams | None = None  # Omega_total and theta* after the last finished task
    after_training: dict[int, float] = field(default_factory=dict)  # test accuracy (%) right after each task

    def __post_init__(self) -> None:
        self.after_training.update({e["task"]: e["test_accuracy"] for e in self.results["tasks"]})

    @property
    def finished(self) -> int:
        return len(self.after_training)

    def method(self, device: torch.device) -> Method:
        return method_class(self.config.method)(self.config, device)

    def new_trunk(self, pretrained: bool = False) -> nn.Module:
        """A trunk of the run's architecture with its frozen layers (initialised from the global RNG)."""
        c = self.config
        shared = build_shared_model(c.arch, c.channels, c.image_size, pretrained)
        create_freeze_layers(shared, c.num_freeze_layers)
        return shared

    def load_finished(self, models_dir: Path) -> None:
        """``--resume``: the trunk, heads and reg_params of the finished tasks, from their files."""
        if not self.finished:
            return
        self.shared = load_shared_state(self.new_trunk(), models_dir)
        # The task scenario checks each head against its task's classes as it loads it; the others against
        # the outputs the scenario gives the shared head after that task.
        counts = class_counts(self.config.manifest)
        per_task = self.config.scenario == "task"
        self.heads = {
            t: load_head(models_dir, t, self.shared.out_features, counts[t - 1] if per_task else None)
            for t in range(1, self.finished + 1)
        }
        check_loaded_heads(self.config.scenario, self.heads, counts, models_dir)
        self.reg_params = load_reg_params(models_dir, self.shared)

    def finish_task(self, task_no: int, task: TaskData, model: TaskModel, reg_params: RegParams, accuracy: float):
        """Keep the task's trunk, head and reg_params, and write its artefacts (trunk and reg_params last)."""
        models_dir = self.config.models_dir
        if distributed.is_writer():  # every rank holds the same model: rank 0 writes it
            task_folder(models_dir, task_no).mkdir(parents=True, exist_ok=True)
            save_head(model.head, models_dir, task_no)
            write_task_files(models_dir, task_no, accuracy, task.classes)
            save_shared_model(model.shared, models_dir)
            save_reg_params(reg_params, models_dir)
        distributed.barrier()
        self.shared, self.heads[task_no], self.reg_params = model.shared, model.head, reg_params
        self.after_training[task_no] = accuracy


def task_seed(seed: int, task_no: int) -> int:
    """Each task draws from its own stream, so a task can be rerun alone."""
    return seed * 10_007 + task_no


def _start_task(state: RunState, task_no: int, task: TaskData, checkpoint: Checkpoint | None):
    """Model and reg_params at the start of the task, or where the checkpoint left them. The task
    trains a new trunk with the previous task's weights: the run's trunk changes only when the task
    is finished, and building it draws from the task's RNG stream as every task always has."""
    if checkpoint is None:
        seed_everything(task_seed(state.config.seed, task_no))
    shared = state.new_trunk(pretrained=task_no == 1 and checkpoint is None and state.config.pretrained)
    if task_no > 1 and checkpoint is None:
        shared.load_state_dict(state.shared.state_dict())
    head = start_head(state.config.scenario, shared, len(task.classes), state.heads.get(task_no - 1))
    model = TaskModel(shared, head)
    if checkpoint is not None:
        where = checkpoint_path(state.config)
        check_tensors(checkpoint.model, model.state_dict(), f"{where}: the model")
        model.load_state_dict(checkpoint.model)
        reg_params = at_task_start(checkpoint.reg_params)
        check_reg_params(reg_params, shared, f"{where}: reg_params")
        return model, reg_params
    if task_no == 1:
        return model, init_reg_params(shared)
    return model, init_reg_params_across_tasks(state.reg_params, shared)


def _optimizer(model: TaskModel, config: RunConfig, checkpoint: Checkpoint | None) -> LocalSgd:
    """LocalSgd over the trainable parameters, with the checkpoint's momentum buffers and SI path
    integral (checked against the parameters); the hyperparameters are always the run's."""
    params = list(trainable_parameters(model).values())
    optimizer = LocalSgd(
        params,
        lr=config.init_lr,
        reg_lambda=config.reg_lambda,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        penalty_step=config.penalty_step,
    )
    if checkpoint is not None:
        state = check_optimizer_state(checkpoint.optimizer_state, params, f"{checkpoint_path(config)}: optimizer")
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer


def checkpoint_path(config: RunConfig) -> Path:
    return Path(config.models_dir) / CHECKPOINT


def _restore(checkpoint: Checkpoint | None, precision: Precision) -> None:
    """This rank's RNG states and fp16's gradient scale, as the checkpoint left them."""
    if checkpoint is None:
        return
    restore_rng(checkpoint.rng(distributed.rank()))
    if precision.scaler is not None and checkpoint.scaler:
        precision.scaler.load_state_dict(checkpoint.scaler)


def _checkpointer(state: RunState, task_no: int, model, optimizer, reg_params, precision: Precision):
    """After every --checkpoint_every-th epoch and the task's last: every rank's RNG states go to rank 0,
    which writes the checkpoint (every rank decides alike, so they meet at the same collectives)."""
    config = state.config

    def on_epoch_end(epoch: int, history: list[dict]) -> None:
        if (epoch + 1) % config.checkpoint_every and epoch + 1 != config.num_epochs:
            return
        rng_states = distributed.gather(rng_state())
        if distributed.is_writer():
            scaler = precision.scaler.state_dict() if precision.scaler is not None else None
            args = (config.recorded(), model, optimizer, reg_params, history, rng_states, scaler)
            save_checkpoint(config.models_dir, task_no, epoch, *args)
        distributed.barrier()

    return on_epoch_end


def _check_importance(omega: dict[str, torch.Tensor], task: TaskData, penalty_step: str) -> None:
    if not all(torch.isfinite(o).all() for o in omega.values()):
        remedy = "--penalty_step proximal (stable at any lambda) or " if penalty_step == "explicit" else ""
        raise Diverged(
            f"{task.name}: the importance became NaN or infinite (the weights grew too large to score); "
            f"start again with {remedy}a lower --init_lr (or --reg_lambda), and --overwrite"
        )


@dataclass
class TrainedTask:
    """A task's model after its epochs, with what its importance pass needs."""

    model: TaskModel
    reg_params: RegParams  # theta* and Omega at the task's start
    method: Method
    history: list[dict]
    seconds: float


def train_task(
    state: RunState,
    task_no: int,
    task: TaskData,
    device: torch.device,
    checkpoint: Checkpoint | None = None,
    hyper: RunConfig | None = None,
    checkpoints: bool = True,
) -> TrainedTask:
    """The epochs of task ``task_no`` from its start (or ``checkpoint``). ``hyper``: the run's config
    with other hyperparameters (learning rate, lambda, epochs, method) for this training only; a run's
    task (``hyper`` None or chosen by --hparam_search) writes checkpoints, a trial (``checkpoints``
    False) nothing."""
    config = hyper or state.config
    model, reg_params = _start_task(state, task_no, task, checkpoint)
    model.to(device)
    if device.type == "cuda" and config.arch == "alexnet":  # faster convolutions (not measured here: no GPU)
        model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config, checkpoint)
    method = method_class(config.method)(config, device)
    method.start_task(task_no, model, optimizer, reg_params)
    precision = make_precision(config.amp, device)
    _restore(checkpoint, precision)
    tic = time.perf_counter()
    history = train_model(
        distributed.wrap(model, device),
        optimizer,
        task,
        config.num_epochs,
        config.init_lr,
        device,
        start_epoch=0 if checkpoint is None else checkpoint.epoch + 1,
        history=None if checkpoint is None else checkpoint.history,
        on_epoch_end=_checkpointer(state, task_no, model, optimizer, reg_params, precision) if checkpoints else None,
        precision=precision,
        verbose=config.verbose,
    )
    return TrainedTask(model, reg_params, method, history, time.perf_counter() - tic)


def mas_train(
    state: RunState,
    task_no: int,
    task: TaskData,
    device: torch.device,
    checkpoint: Checkpoint | None = None,
    hyper: RunConfig | None = None,
) -> TaskResult:
    """Train task ``task_no`` (1-based), from its start or from ``checkpoint``, checkpointing after
    every epoch; measure its importance and test accuracy; keep and write its artefacts. ``hyper``:
    this task's learning rate and lambda (--hparam_search), see ``train_task``."""
    config = state.config
    if distributed.is_writer():
        Path(config.models_dir).mkdir(parents=True, exist_ok=True)
    trained = train_task(state, task_no, task, device, checkpoint, hyper)
    model, tic = trained.model, time.perf_counter()
    omega = trained.method.importance(model, task)  # the model itself, not its DDP wrapper: each rank scores its shard
    importance_seconds = time.perf_counter() - tic
    _check_importance(omega, task, config.penalty_step)
    test_accuracy = evaluate(model, task.test, device, desc=f"{task.name} test")
    reg_params = consolidate_reg_params(trained.reg_params, omega, model.shared)
    state.finish_task(task_no, task, model, reg_params, test_accuracy)
    return TaskResult(omega, test_accuracy, trained.history, trained.seconds, importance_seconds)


def compute_forgetting(state: RunState, tasks: list[TaskData], device: torch.device) -> list[ForgettingRow]:
    """Forgetting of each task: the accuracy recorded right after training it minus its accuracy now,
    with the run's trunk and the head the scenario scores it with (its own, or the current shared
    one), all in memory. The last finished task is not scored
    again: it was tested with the trunk as it is now, so its recorded accuracy is its accuracy now."""
    rows = []
    for task_no, task in enumerate(tasks, start=1):
        before = state.after_training[task_no]
        if task_no == state.finished:
            now = before
        else:
            now = score_task(state, task_no, task.test, device, f"{task.name} final test")
        rows.append(ForgettingRow(task_no, before, now, before - now))
    return rows


def score_task(state: RunState, task_no: int, loader, device: torch.device, desc: str) -> float:
    """Accuracy (%) on ``loader`` of task ``task_no`` with the run's trunk and the head the scenario
    scores that task with (its own, or the current shared one), in memory."""
    head = scoring_head(state.config.scenario, state.heads, task_no, state.finished)
    return evaluate(TaskModel(state.shared, head).to(device), loader, device, desc=desc)
