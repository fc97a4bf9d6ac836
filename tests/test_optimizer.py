"""LocalSgd and OmegaUpdate against torch.optim.SGD and closed forms."""

from __future__ import annotations

import copy
import math

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


# --- penalty_step="proximal" (issue 11) ---


def _one_param(values, dtype=torch.float64) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=dtype))


def _proximal_by_hand(theta, g, buf, omega, theta_star, lr, reg_lambda, momentum, weight_decay):
    """buf <- m buf + g + wd theta (no penalty), v = theta - lr buf, theta <- (v + c theta*) / (1 + c)
    with c = 2 lr / (1 - m) lambda Omega."""
    buf = momentum * buf + g + weight_decay * theta
    v = theta - lr * buf
    c = 2 * lr / (1 - momentum) * reg_lambda * omega
    return (v + c * theta_star) / (1 + c), buf


@pytest.mark.parametrize("fused", ["eager", "compile"])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05), (0.0, 0.05)])
def test_proximal_step_matches_hand_computation(fused, momentum, weight_decay):
    theta = _one_param([1.0, -2.0, 0.5, 3.0, 0.0, -0.25])
    omega = torch.tensor([0.0, 1.0, 4.0, 250.0, 2.0, 0.5], dtype=torch.float64)
    theta_star = torch.tensor([0.5, 0.0, -1.0, 2.0, 1.0, -0.25], dtype=torch.float64)
    g = torch.tensor([0.3, -1.0, 2.0, 0.0, -0.5, 1.5], dtype=torch.float64)
    buf0 = torch.tensor([0.1, 0.2, -0.3, 0.4, -0.5, 0.6], dtype=torch.float64)
    lr, reg_lambda = 0.1, 0.7  # c = 0.14 * Omega, up to 35: far beyond the explicit step's limit
    opt = LocalSgd([theta], lr, reg_lambda, momentum, weight_decay, fused=fused, penalty_step="proximal")
    opt.set_importance(theta, omega, theta_star)
    if momentum > 0:
        opt.state[theta]["momentum_buffer"] = buf0.clone()
    expected, expected_buf = _proximal_by_hand(
        theta.detach().clone(),
        g,
        buf0 if momentum > 0 else 0.0,
        omega,
        theta_star,
        lr,
        reg_lambda,
        momentum,
        weight_decay,
    )
    theta.grad = g.clone()
    opt.step()
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-14, atol=1e-15)
    if momentum > 0:  # the buffer holds the data gradient (and weight decay) only
        torch.testing.assert_close(opt.state[theta]["momentum_buffer"], expected_buf, rtol=1e-14, atol=1e-15)
    # A second step with a new learning rate: same arithmetic, and on the compiled path no recompilation.
    opt.param_groups[0]["lr"] = lr = 0.03
    buf = opt.state[theta]["momentum_buffer"].clone() if momentum > 0 else 0.0
    expected, _ = _proximal_by_hand(
        theta.detach().clone(), g, buf, omega, theta_star, lr, reg_lambda, momentum, weight_decay
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        opt.step()
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-14, atol=1e-15)


def _first_step(penalty_step: str, lr: float) -> torch.Tensor:
    theta = _one_param([1.0, -2.0, 0.5, 3.0])
    opt = LocalSgd([theta], lr, reg_lambda=2.0, momentum=0.0, weight_decay=0.1, penalty_step=penalty_step)
    opt.set_importance(
        theta, torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    )
    theta.grad = torch.tensor([0.5, -1.0, 2.0, 1.0], dtype=torch.float64)
    opt.step()
    return theta.detach()


def test_proximal_step_approaches_the_explicit_step_as_c_squared():
    # Both are first-order steps on the same gradient flow; without momentum, with c = 2 lr lambda Omega
    # -> 0 (lr -> 0) they differ by O(c^2). with d = g + wd theta and v = theta - lr d,
    # proximal - explicit = (c^2 (theta - theta*) + c lr d) / (1 + c), which is lr^2 times a constant
    # over 1 + c: halving lr (and so c) divides it by 4 (1 + c/2) / (1 + c), about 4 here (c <= 1.2e-2).
    diffs = [(_first_step("proximal", lr) - _first_step("explicit", lr)).norm().item() for lr in (1e-3, 5e-4)]
    assert diffs[1] > 0
    assert diffs[0] / diffs[1] == pytest.approx(4.0, rel=0.01)


def _quadratic_run(penalty_step: str, momentum: float, steps: int, lr: float, curvature: float, omega: float):
    """Minimise  curvature / 2 (theta - 1)^2  (data)  +  0.5 * omega * theta^2  (penalty, theta* = 0)."""
    theta = _one_param([3.0])
    opt = LocalSgd([theta], lr, reg_lambda=0.5, momentum=momentum, fused="eager", penalty_step=penalty_step)
    opt.set_importance(theta, torch.tensor([omega], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    for _ in range(steps):
        theta.grad = curvature * (theta.detach() - 1.0)
        opt.step()
    return theta.detach().item()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_proximal_converges_where_explicit_diverges_on_a_stiff_penalty(momentum):
    lr, curvature, omega = 0.1, 1.0, 1e7  # lr * 2 lambda Omega = 1e6
    # Closed form of argmin  (theta - 1)^2 / 2 + lambda Omega theta^2  (Eq. 3 with lambda = 0.5).
    minimiser = curvature / (curvature + omega)
    assert _quadratic_run("proximal", momentum, 200, lr, curvature, omega) == pytest.approx(minimiser, rel=1e-9)
    explicit = _quadratic_run("explicit", momentum, 30, lr, curvature, omega)
    assert not math.isfinite(explicit) or abs(explicit) > 1e100


def test_proximal_and_explicit_reach_the_same_minimiser_with_momentum():
    # A well-conditioned case where both steps converge: with the proximal step taken with the
    # effective step lr / (1 - m), both reach the minimiser of Eq. 3 (the penalty is not weakened).
    lr, curvature, omega, momentum = 0.1, 1.0, 4.0, 0.9
    explicit = _quadratic_run("explicit", momentum, 1000, lr, curvature, omega)
    proximal = _quadratic_run("proximal", momentum, 1000, lr, curvature, omega)
    assert explicit == pytest.approx(curvature / (curvature + omega), rel=1e-9)
    assert proximal == pytest.approx(curvature / (curvature + omega), rel=1e-9)


def test_proximal_path_integral_uses_data_gradient_and_full_change():
    theta = _one_param([1.0, -2.0])
    opt = LocalSgd([theta], lr=0.5, reg_lambda=1.0, penalty_step="proximal", fused="eager")
    opt.set_importance(theta, torch.tensor([2.0, 0.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    opt.start_path_integral(theta)
    g = torch.tensor([0.4, -0.2], dtype=torch.float64)
    theta.grad = g.clone()
    opt.step()
    # c = 2 * 0.5 * 1 * Omega = (2, 0): theta_new = (theta - 0.5 g) / (1 + c) = (0.8 / 3, -1.9)
    delta = torch.tensor([0.8 / 3 - 1.0, 0.1], dtype=torch.float64)
    torch.testing.assert_close(opt.state[theta]["path_integral"], -g * delta, rtol=1e-14, atol=1e-15)


def test_state_dict_round_trip_keeps_penalty_step():
    theta = _one_param([1.0])
    saved = LocalSgd([theta], lr=0.1, reg_lambda=1.0, penalty_step="proximal").state_dict()
    opt = LocalSgd([theta], lr=0.1, reg_lambda=1.0)
    opt.load_state_dict(copy.deepcopy(saved))
    assert opt.param_groups[0]["penalty_step"] == "proximal"
    del saved["param_groups"][0]["penalty_step"]  # a state_dict from before the option existed
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["penalty_step"] == "explicit"


def test_invalid_penalty_step_is_refused():
    with pytest.raises(ValueError, match=r"penalty_step must be one of \('explicit', 'proximal'\), got 'implicit'"):
        LocalSgd([_one_param([1.0])], lr=0.1, penalty_step="implicit")
    theta = _one_param([1.0])
    opt = LocalSgd([theta], lr=0.1, reg_lambda=1.0)
    opt.set_importance(theta, torch.ones(1), torch.zeros(1))
    opt.param_groups[0]["penalty_step"] = "Proximal"  # changed after construction: refused at the step
    theta.grad = torch.zeros_like(theta)
    with pytest.raises(ValueError, match="penalty_step"):
        opt.step()


def test_proximal_factor_follows_a_new_omega():
    theta = _one_param([1.0, -1.0])
    opt = LocalSgd([theta], lr=0.5, reg_lambda=1.0, penalty_step="proximal", fused="eager")
    for omega in (1.0, 3.0):  # keep = 1 / (1 + 2 * 0.5 * 1 * Omega): 1/2, then 1/4
        with torch.no_grad():
            theta.copy_(torch.tensor([1.0, -1.0], dtype=torch.float64))
        opt.set_importance(theta, torch.full((2,), omega, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
        theta.grad = torch.zeros_like(theta)
        opt.step()
        torch.testing.assert_close(theta.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64) / (1 + omega))
