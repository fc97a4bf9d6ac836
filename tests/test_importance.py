"""Importance estimators against closed forms and slow reference implementations."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from model_class import TaskModel
from utils.importance import mas_batch_importance


class LinearTrunk(nn.Module):
    """A trunk that is one Linear layer, so F(x) = H (W x + b) + c is linear in x."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _linear_setup(n: int = 10, d_in: int = 4, d_hid: int = 3, d_out: int = 2, batch_size: int = 4):
    torch.manual_seed(0)
    trunk = LinearTrunk(d_in, d_hid).double()
    head = nn.Linear(d_hid, d_out).double()
    x = torch.randn(n, d_in, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=batch_size)
    return TaskModel(trunk, head), x, loader


def test_batch_importance_of_a_linear_model_matches_the_closed_form():
    model, x, loader = _linear_setup()
    omega = mas_batch_importance(model, loader, torch.device("cpu"))
    w, b = model.shared.fc.weight.detach(), model.shared.fc.bias.detach()
    h, c = model.head.weight.detach(), model.head.bias.detach()
    # d ||F(x)||^2 / dW = 2 H^T F(x) x^T and d/db = 2 H^T F(x), with F(x) = H (W x + b) + c.
    grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
    for start in range(0, len(x), 4):
        batch = x[start : start + 4]
        f = (batch @ w.T + b) @ h.T + c  # (B, d_out)
        back = 2 * f @ h  # (B, d_hid): 2 H^T F for every sample
        grad_w += (back.T @ batch).abs()  # | sum over the batch |, then summed over batches
        grad_b += back.sum(0).abs()
    torch.testing.assert_close(omega["fc.weight"], grad_w / len(x))
    torch.testing.assert_close(omega["fc.bias"], grad_b / len(x))
    assert set(omega) == {"fc.weight", "fc.bias"}  # the head is not part of the shared model


def test_batch_importance_skips_frozen_parameters_and_leaves_weights_alone():
    model, _, loader = _linear_setup()
    model.shared.fc.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    omega = mas_batch_importance(model, loader, torch.device("cpu"))
    assert set(omega) == {"fc.weight"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
