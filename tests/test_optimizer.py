"""LocalSgd and OmegaUpdate against torch.optim.SGD and closed forms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import optimizer_lib
from optimizer_lib import LocalSgd, OmegaUpdate


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _train(model: nn.Module, optimizer, steps: int = 5, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(7, 5, generator=gen)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01), (0.5, 0.1)])
def test_zero_lambda_matches_torch_sgd_exactly(momentum, weight_decay):
    ours, ref = _model(), _model()
    opt = LocalSgd(ours.parameters(), lr=0.1, reg_lambda=0.0, momentum=momentum, weight_decay=weight_decay)
    # Importance attached but lambda = 0: still exactly SGD.
    for p in ours.parameters():
        opt.set_importance(p, torch.rand_like(p), torch.randn_like(p))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    _train(ours, opt)
    _train(ref, ref_opt)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_no_importance_matches_torch_sgd_exactly_with_positive_lambda():
    ours, ref = _model(), _model()
    _train(ours, LocalSgd(ours.parameters(), lr=0.05, reg_lambda=3.0, momentum=0.9))
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9))
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_data_gradient_step_is_the_penalty_gradient(momentum):
    torch.manual_seed(0)
    theta = nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
    omega = torch.rand(6, 3, dtype=torch.float64)
    theta_star = torch.randn(6, 3, dtype=torch.float64)
    before = theta.detach().clone()
    lr, reg_lambda = 0.01, 0.7
    opt = LocalSgd([theta], lr=lr, reg_lambda=reg_lambda, momentum=momentum, fused="eager")
    opt.set_importance(theta, omega, theta_star)
    theta.grad = torch.zeros_like(theta)
    opt.step()
    expected = before - lr * 2 * reg_lambda * omega * (before - theta_star)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-15, atol=1e-15)


def test_penalty_is_a_quadratic_pull_over_many_steps():
    # With zero data gradient and no momentum, theta - theta* shrinks by (1 - 2 lr lambda Omega) per step.
    theta = nn.Parameter(torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))
    omega = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    opt = LocalSgd([theta], lr=0.1, reg_lambda=0.5, fused="eager")
    opt.set_importance(theta, omega, torch.zeros(3, dtype=torch.float64))
    for _ in range(10):
        theta.grad = torch.zeros_like(theta)
        opt.step()
    expected = torch.tensor([1.0, 2.0 * 0.9**10, -3.0 * 0.6**10], dtype=torch.float64)
    torch.testing.assert_close(theta.detach(), expected)


def test_state_dict_round_trip_keeps_importance_and_momentum():
    model = _model()
    opt = LocalSgd(model.parameters(), lr=0.1, reg_lambda=0.3, momentum=0.9, fused="eager")
    for p in model.parameters():
        opt.set_importance(p, torch.rand_like(p), p.detach().clone())
    _train(model, opt, steps=3)
    clone = copy.deepcopy(model)
    opt2 = LocalSgd(clone.parameters(), lr=0.1, reg_lambda=0.3, momentum=0.9, fused="eager")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved and loaded
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(opt.state[p]["omega"], opt2.state[q]["omega"])
        assert torch.equal(opt.state[p]["theta_star"], opt2.state[q]["theta_star"])
    _train(model, opt, steps=3, seed=5)
    _train(clone, opt2, steps=3, seed=5)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_importance_follows_the_parameter_dtype_and_device():
    theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LocalSgd([theta], lr=0.1, reg_lambda=1.0)
    opt.set_importance(theta, torch.ones(3), torch.ones(3))
    assert opt.state[theta]["omega"].dtype == torch.float64
    assert opt.state[theta]["theta_star"].device == theta.device
    with pytest.raises(ValueError, match="shapes"):
        opt.set_importance(theta, torch.ones(4), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "learning rate"),
        (dict(lr=0.1, reg_lambda=-1.0), "reg_lambda"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, weight_decay=-0.1), "weight_decay"),
        (dict(lr=0.1, fused="fast"), "fused"),
    ],
)
def test_hyperparameters_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSgd([nn.Parameter(torch.zeros(1))], **kwargs)


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.01), (0.0, 0.0)])
def test_compiled_step_equals_eager_step(momentum, weight_decay):
    models = [_model(), _model()]
    opts = []
    for model, fused in zip(models, ("compile", "eager")):
        opt = LocalSgd(
            model.parameters(), lr=0.05, reg_lambda=0.4, momentum=momentum, weight_decay=weight_decay, fused=fused
        )
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            opt.set_importance(p, torch.rand(p.shape, generator=gen), p.detach() + 0.1)
        opts.append(opt)
    for model, opt in zip(models, opts):
        _train(model, opt, steps=4)
        opt.param_groups[0]["lr"] = 0.01  # a new learning rate must not change the result path
        _train(model, opt, steps=2, seed=9)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_mode_falls_back_to_eager_when_compilation_fails(monkeypatch):
    def broken():
        def fail(*args):
            raise RuntimeError("no compiler")

        return fail

    monkeypatch.setattr(optimizer_lib, "_compiled_step", broken)
    monkeypatch.setattr(optimizer_lib, "COMPILE_MIN_NUMEL", 1)
    ours, ref = _model(), _model()
    opt = LocalSgd(ours.parameters(), lr=0.1, reg_lambda=0.5, momentum=0.9)
    ref_opt = LocalSgd(ref.parameters(), lr=0.1, reg_lambda=0.5, momentum=0.9, fused="eager")
    for o, m in ((opt, ours), (ref_opt, ref)):
        for p in m.parameters():
            o.set_importance(p, torch.ones_like(p), torch.zeros_like(p))
    with pytest.warns(UserWarning, match="torch.compile failed"):
        _train(ours, opt, steps=1)
    _train(ours, opt, steps=2, seed=2)
    _train(ref, ref_opt, steps=1)
    _train(ref, ref_opt, steps=2, seed=2)
    assert opt.fused == "eager"
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_omega_update_is_the_mean_over_samples_of_abs_batch_gradients():
    theta = nn.Parameter(torch.zeros(4))
    opt = OmegaUpdate([theta])
    batch_grads = [
        torch.tensor([1.0, -2.0, 3.0, 0.0]),
        torch.tensor([-1.0, -2.0, 5.0, 4.0]),
        torch.tensor([0.5, 0.0, -1.0, 2.0]),
    ]
    sizes = [4, 4, 2]  # a short last batch
    for g, n in zip(batch_grads, sizes):
        theta.grad = g.clone()
        opt.step(batch_size=n)
    expected = sum(g.abs() for g in batch_grads) / sum(sizes)
    torch.testing.assert_close(opt.state[theta]["omega"], expected)
    assert opt.state[theta]["num_samples"] == 10
    assert torch.equal(theta.detach(), torch.zeros(4))
    with pytest.raises(ValueError):
        opt.step(batch_size=0)
