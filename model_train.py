"""Training of one task (Memory Aware Synapses, Aljundi et al., ECCV 2018, Eq. 3).

``train_model`` runs the epoch loop on the cross-entropy loss (the MAS penalty of Eq. 3
is added locally by the optimizer, never here), then the importance pass on the
task's training data, then the test evaluation. It knows nothing about which method
runs: the method is the ``importance_fn`` it is given.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from tqdm import tqdm

from utils import Diverged
from utils.data_utils import TaskData
from utils.model_utils import evaluate

LR_DECAY_EPOCHS = 20  # the seed decays the learning rate x0.1 every 20 epochs
ImportanceFn = Callable[[nn.Module, TaskData], dict[str, torch.Tensor]]


@dataclass
class TaskResult:
    omega: dict[str, torch.Tensor]
    test_accuracy: float
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    importance_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global RNG is what third-party code draws from)
    torch.manual_seed(seed)


def exp_lr_scheduler(optimizer: Optimizer, epoch: int, init_lr: float) -> float:
    """lr = init_lr * 0.1 ** (epoch // 20), set on every parameter group."""
    lr = init_lr * 0.1 ** (epoch // LR_DECAY_EPOCHS)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_one_epoch(
    model: nn.Module, optimizer: Optimizer, task: TaskData, device: torch.device, desc: str
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) over one pass of the training loader."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    loss_sum = correct = seen = 0
    bar = tqdm(task.train, desc=desc, leave=False, disable=None)
    for inputs, labels in bar:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = criterion(logits, labels)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise Diverged(
                f"{task.name}: the training loss became {loss_value} at {desc}; the last epoch's checkpoint is "
                "kept; start again with a lower --init_lr (or --reg_lambda) and --overwrite"
            )
        loss.backward()
        optimizer.step()
        loss_sum += loss_value * labels.numel()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return loss_sum / seen, 100.0 * correct / seen


def train_model(
    model: nn.Module,
    optimizer: Optimizer,
    task: TaskData,
    num_epochs: int,
    init_lr: float,
    device: torch.device,
    importance_fn: ImportanceFn,
    start_epoch: int = 0,
    history: list[dict] | None = None,
    on_epoch_end: Callable[[int, list[dict]], None] | None = None,
) -> TaskResult:
    """Epochs ``start_epoch .. num_epochs-1``, then the importance pass, then the test score."""
    history = list(history or [])
    started = time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        tic = time.perf_counter()
        lr = exp_lr_scheduler(optimizer, epoch, init_lr)
        loss, accuracy = train_one_epoch(model, optimizer, task, device, f"{task.name} epoch {epoch + 1}/{num_epochs}")
        seconds = time.perf_counter() - tic
        history.append({"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "lr": lr, "seconds": seconds})
        tqdm.write(
            f"{task.name} epoch {epoch + 1:>3}/{num_epochs}  loss {loss:.4f}  acc {accuracy:6.2f}%  "
            f"lr {lr:.2e}  {seconds:.1f}s"
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    train_seconds = time.perf_counter() - started
    tic = time.perf_counter()
    omega = importance_fn(model, task)
    importance_seconds = time.perf_counter() - tic
    test_accuracy = evaluate(model, task.test, device, desc=f"{task.name} test")
    return TaskResult(omega, test_accuracy, history, train_seconds, importance_seconds)
