"""Training and scoring of one task (Memory Aware Synapses, Aljundi et al., ECCV 2018, Eq. 3).

``train_model`` runs the epoch loop on the cross-entropy loss; the MAS penalty of Eq. 3 is
added locally by the optimizer, never here, so the loop knows nothing about which method
runs. ``evaluate`` scores a trunk with one task's head. The importance pass and the test
are called by the task runner (``mas.mas_train``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import Diverged, UserError
from utils.data.tasks import TaskData
from utils.runtime import distributed, interrupt

LR_DECAY_EPOCHS = 20  # the seed decays the learning rate x0.1 every 20 epochs
EpochEnd = Callable[[int, list[dict]], None]


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


@dataclass
class Precision:
    """--amp: the dtype of the training forward pass (None: float32) and fp16's gradient scaler.
    The importance pass and the tests always run in float32."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None


FLOAT32 = Precision()
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_precision(amp: str, device: torch.device) -> Precision:
    # fp16's narrow range needs the loss scaled up (and the gradients back down); bf16 has float32's range.
    return Precision(AMP_DTYPES[amp], torch.amp.GradScaler(device.type) if amp == "fp16" else None)


def _autocast(device: torch.device, precision: Precision):
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)


def _step_totals(loss: torch.Tensor, correct: int) -> tuple[float, int]:
    """The step's batch mean loss and its number of correct predictions, over the whole one-process
    batch. With several ranks, both are summed over them in one all-reduce with the ranks' interrupt
    requests, so that every rank sees a divergence or a Ctrl-C at the same step; each rank's loss is its
    weighted share (StepShare.loss_weights), whose sum over the ranks divided by their number is the
    batch mean."""
    if not distributed.active():
        return loss.item(), correct
    total, correct_everywhere = interrupt.check_everywhere([loss.item(), float(correct)])
    return total / torch.distributed.get_world_size(), round(correct_everywhere)


def _shared_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights_i CE_i: this rank's share of the global batch's mean cross-entropy (see StepShare)."""
    return (F.cross_entropy(logits, labels, reduction="none") * weights).sum()


def _backward_and_step(loss: torch.Tensor, optimizer: Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # unscales the gradients first: LocalSgd adds the penalty to unscaled gradients
    scaler.update()


def train_one_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    task: TaskData,
    device: torch.device,
    desc: str,
    precision: Precision = FLOAT32,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) over one pass of the training loader; under torchrun over
    every rank's samples, each counted once: the values one process reports."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    shares, size = distributed.step_shares(task.train), distributed.world_size()
    loss_sum = correct = seen = 0
    bar = tqdm(task.train, desc=desc, leave=False, disable=None if distributed.is_writer() else True)
    for step, (inputs, labels) in enumerate(bar):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        share = shares(step) if shares is not None else None
        weights = None if share is None else torch.tensor(share.loss_weights(size), device=device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            logits = model(inputs)
            loss = criterion(logits, labels) if weights is None else _shared_loss(logits, labels, weights)
        hits = logits.argmax(1) == labels
        batch_loss, batch_correct = _step_totals(loss, int(hits.sum() if weights is None else hits[weights > 0].sum()))
        if not math.isfinite(batch_loss):
            raise Diverged(f"{task.name}: the training loss became {batch_loss} at {desc}")
        _backward_and_step(loss, optimizer, precision.scaler)
        count = labels.numel() if share is None else share.global_count
        loss_sum += batch_loss * count
        correct += batch_correct
        seen += count
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return loss_sum / seen, 100.0 * correct / seen


def train_model(
    model: nn.Module,
    optimizer: Optimizer,
    task: TaskData,
    num_epochs: int,
    init_lr: float,
    device: torch.device,
    start_epoch: int = 0,
    history: list[dict] | None = None,
    on_epoch_end: EpochEnd | None = None,
    precision: Precision = FLOAT32,
    verbose: bool = False,
) -> list[dict]:
    """Epochs ``start_epoch .. num_epochs-1``; returns the history of every epoch of the task. ``verbose``:
    print each epoch's line (its loss and accuracy are the running training ones, labelled so)."""
    history = list(history or [])
    for epoch in range(start_epoch, num_epochs):
        tic = time.perf_counter()
        lr = exp_lr_scheduler(optimizer, epoch, init_lr)
        desc = f"{task.name} epoch {epoch + 1}/{num_epochs}"
        try:
            loss, accuracy = train_one_epoch(model, optimizer, task, device, desc, precision)
            _check_finite_weights(model, f"{task.name}: the weights became NaN or infinite in {desc}")
        except Diverged as err:
            raise Diverged(f"{err}; {_what_is_kept(epoch, optimizer)}") from None
        seconds = time.perf_counter() - tic
        history.append({"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "lr": lr, "seconds": seconds})
        if verbose and distributed.is_writer():
            tqdm.write(
                f"{task.name} epoch {epoch + 1:>3}/{num_epochs}  loss {loss:.4f}  train acc {accuracy:6.2f}%  "
                f"lr {lr:.2e}  {seconds:.1f}s"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    return history


def _check_finite_weights(model: nn.Module, message: str) -> None:
    """The last step of an epoch can make the weights non-finite with a finite loss: not a checkpoint."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise Diverged(message)


def _what_is_kept(epoch: int, optimizer: Optimizer | None = None) -> str:
    """What a diverged task leaves, and the remedies: the proximal penalty step (stable at any lambda)
    when the explicit one was taken, and a lower learning rate."""
    kept = (
        "the last epoch's checkpoint is kept"
        if epoch > 0
        else "no epoch of this task finished, so no checkpoint of it exists"
    )
    explicit = optimizer is None or any(g.get("penalty_step", "explicit") == "explicit" for g in optimizer.param_groups)
    remedy = "--penalty_step proximal (stable at any lambda) or " if explicit else ""
    return f"{kept}; start again with {remedy}a lower --init_lr (or --reg_lambda), and --overwrite"


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "test") -> float:
    """Top-1 accuracy in percent of ``model`` (a trunk with one task's head) on ``loader``."""
    model.eval()
    correct = total = 0
    for inputs, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        logits = model(inputs.to(device))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += labels.numel()
    if distributed.active():  # each rank scored its own shard of the test set
        counts = torch.tensor([correct, total], dtype=torch.float64, device=device)
        distributed.sum_([counts])
        correct, total = (int(c) for c in counts.tolist())
    if total == 0:
        raise UserError(f"no images to evaluate in {getattr(loader.dataset, 'root', 'the test set')}")
    return 100.0 * correct / total
