"""The checkpoint travels as one typed object (utils/checkpoint.Checkpoint) that knows what a resume
needs; the reg_params invariant at a task's start (prev_omega == omega) lives in reg_params.py."""

from __future__ import annotations

import torch
from torch import nn

from reg_params import at_task_start, init_reg_params
from utils.artefacts.checkpoint import Checkpoint, load_checkpoint, rng_state, save_checkpoint


def test_a_saved_checkpoint_loads_as_a_typed_object(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    reg_params = init_reg_params(model)
    history = [{"epoch": 1, "loss": 0.5, "accuracy": 50.0, "lr": 0.1, "seconds": 0.0}]
    states = [rng_state(), rng_state()]
    save_checkpoint(tmp_path, 2, 0, {"seed": 3}, model, optimizer, reg_params, history, states)
    checkpoint = load_checkpoint(tmp_path)
    assert isinstance(checkpoint, Checkpoint) and (checkpoint.task, checkpoint.epoch) == (2, 0)
    assert checkpoint.args == {"seed": 3} and checkpoint.history == history and checkpoint.scaler is None
    assert all(torch.equal(checkpoint.model[k], v) for k, v in model.state_dict().items())
    assert sorted(checkpoint.optimizer_state) == [0, 1, 2, 3]
    assert torch.equal(checkpoint.rng(1)["torch"], states[1]["torch"])
    assert sorted(next(iter(checkpoint.reg_params.values()))) == ["init_val", "omega"]  # Omega stored once


def test_at_task_start_restores_prev_omega_as_its_own_copy():
    omega = torch.tensor([1.0, 2.0])
    restored = at_task_start({"w": {"omega": omega, "init_val": torch.zeros(2)}})
    assert torch.equal(restored["w"]["prev_omega"], omega) and restored["w"]["prev_omega"] is not omega
    restored["w"]["omega"].add_(1.0)  # consolidation adds the task's Omega in place
    assert torch.equal(restored["w"]["prev_omega"], torch.tensor([1.0, 2.0]))
