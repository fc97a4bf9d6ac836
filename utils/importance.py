"""Importance estimators of Memory Aware Synapses (Aljundi et al., ECCV 2018).

An estimator is a pure function ``(model, loader, device) -> {param_name: Omega}`` over
the trainable parameters of ``model.shared``; ``model`` is the shared trunk with the
head of the task just trained, F(x) = head(shared(x)).

MAS (Eq. 2 and 4):  Omega_ij = (1/N) sum_k | d ||F(x_k)||_2^2 / d theta_ij |.

- ``mas_batch_importance``: the authors' default estimator. It back-propagates the
  batch sum sum_k ||F(x_k)||_2^2 and averages |gradient of the batch| over samples, so
  the absolute value is taken after summing over a batch (|sum_k g_k| <= sum_k |g_k|):
  it equals Eq. 2 only with batch size 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from optimizer_lib import OmegaUpdate
from utils.mas_utils import trainable_parameters


def mas_batch_importance(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, torch.Tensor]:
    """Omega = (1/N) sum over batches of | d/dtheta sum_{k in batch} ||F(x_k)||_2^2 |, in eval mode."""
    params = trainable_parameters(model.shared)
    omega_update = OmegaUpdate(params.values())
    model.eval()
    for inputs, _ in tqdm(loader, desc="importance", leave=False, disable=None):
        model.zero_grad(set_to_none=True)
        outputs = model(inputs.to(device))
        outputs.pow(2).sum().backward()  # Eq. 4, summed over the batch: sum_k ||F(x_k)||_2^2
        omega_update.step(batch_size=inputs.shape[0])
    model.zero_grad(set_to_none=True)
    return {
        name: omega_update.state[p]["omega"].cpu()
        if "omega" in omega_update.state[p]
        else torch.zeros_like(p, device="cpu")
        for name, p in params.items()
    }
