"""Exact importance estimators against one-sample-at-a-time autograd references and closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from importance import (
    ewc_fisher,
    local_mas_importance,
    mas_batch_importance,
    mas_per_sample_importance,
)
from methods.si import si_importance
from model_class import ConvNetTrunk, MlpTrunk, TaskModel
from optimizer_lib import LocalSgd

CPU = torch.device("cpu")


class TinyAlexNet(nn.Module):
    """AlexNet's shape in miniature: conv/ReLU/pool features (in-place ReLUs), dropout, fc/ReLU classifier."""

    out_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, kernel_size=5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(5 * 4 * 4, 7),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(7, 6),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class ScaledMlp(nn.Module):
    """A trunk with a parameter outside Linear/Conv2d, to exercise the torch.func fallback."""

    out_features = 5

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.randn(5))
        self.grouped = nn.Conv2d(2, 2, kernel_size=1, groups=2)  # grouped: not a closed-form layer here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x)) * self.scale
        return h + self.grouped(h[:, :2, None, None]).flatten(1).sum(1, keepdim=True)


def _setup(trunk: nn.Module, x_shape: tuple, n: int = 9, classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = TaskModel(trunk, nn.Linear(trunk.out_features, classes)).double()
    x = torch.randn(n, *x_shape, dtype=torch.float64)
    y = torch.randint(0, classes, (n,))
    return model, TensorDataset(x, y)


def _reference(model: TaskModel, dataset, sample_loss, power: int) -> dict[str, torch.Tensor]:
    """(1/N) sum_k |d loss(x_k) / d theta|^power by autograd, one sample at a time."""
    model.eval()
    params = {n: p for n, p in model.shared.named_parameters() if p.requires_grad}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in dataset:
        grads = torch.autograd.grad(sample_loss(model(x[None]), y[None]), list(params.values()))
        for n, g in zip(params, grads):
            totals[n] += g.abs() ** power
    return {n: t / len(dataset) for n, t in totals.items()}


def _squared_norm(out, y):
    return out.pow(2).sum()


def _nll(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _assert_close(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-12, msg=name)


CASES = {
    "tiny_alexnet": (TinyAlexNet, (3, 16, 16)),
    "convnet": (lambda: ConvNetTrunk(3, 12), (3, 12, 12)),
    "mlp": (lambda: MlpTrunk(12), (1, 3, 4)),
    "fallback": (ScaledMlp, (4,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_mas_equals_a_batch_size_1_loop(case):
    trunk, shape = CASES[case]
    model, data = _setup(trunk(), shape)
    ours = mas_per_sample_importance(model, DataLoader(data, batch_size=4), CPU)
    _assert_close(ours, _reference(model, data, _squared_norm, power=1))


def test_batch_estimator_with_batch_size_1_is_the_per_sample_estimator():
    model, data = _setup(TinyAlexNet(), (3, 16, 16))
    batch_1 = mas_batch_importance(model, DataLoader(data, batch_size=1), CPU)
    _assert_close(batch_1, mas_per_sample_importance(model, DataLoader(data, batch_size=5), CPU))


def test_per_sample_is_at_least_the_batch_estimator_and_batch_size_matters():
    model, data = _setup(TinyAlexNet(), (3, 16, 16), n=16)
    exact = mas_per_sample_importance(model, DataLoader(data, batch_size=16), CPU)
    by_batch = {b: mas_batch_importance(model, DataLoader(data, batch_size=b), CPU) for b in (4, 16)}
    for name in exact:
        assert (exact[name] >= by_batch[4][name] - 1e-12).all()
        assert (by_batch[4][name] >= by_batch[16][name] - 1e-12).all()  # bigger batches: more cancellation
    assert (exact["features.0.weight"] > by_batch[16]["features.0.weight"] + 1e-9).any()  # signed inputs: cancellation


def test_frozen_parameters_have_no_per_sample_importance():
    model, data = _setup(TinyAlexNet(), (3, 16, 16))
    model.shared.features[0].requires_grad_(False)
    ours = mas_per_sample_importance(model, DataLoader(data, batch_size=4), CPU)
    assert "features.0.weight" not in ours
    _assert_close(ours, _reference(model, data, _squared_norm, power=1))


def test_ewc_fisher_equals_a_batch_size_1_loop_on_a_conv_net():
    model, data = _setup(TinyAlexNet(), (3, 16, 16))
    _assert_close(ewc_fisher(model, DataLoader(data, batch_size=4), CPU), _reference(model, data, _nll, power=2))


def test_ewc_fisher_of_logistic_regression_matches_the_closed_form():
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(4, 3))  # logits W x + b
    trunk.out_features = 3
    head = nn.Linear(3, 3)
    with torch.no_grad():  # an identity head, so F(x) = W x + b is softmax regression
        head.weight.copy_(torch.eye(3))
        head.bias.zero_()
    model = TaskModel(trunk, head).double()
    x = torch.randn(11, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    fisher = ewc_fisher(model, DataLoader(TensorDataset(x, y), batch_size=4), CPU)
    w, b = trunk[0].weight.detach(), trunk[0].bias.detach()
    residual = torch.softmax(x @ w.T + b, dim=1) - F.one_hot(y, 3).double()  # d(-log p_y)/dz = p - e_y
    torch.testing.assert_close(fisher["0.weight"], (residual.square().T @ x.square()) / 11)
    torch.testing.assert_close(fisher["0.bias"], residual.square().mean(0))


def test_local_mas_on_linear_relu_is_the_hebbian_product():
    torch.manual_seed(2)
    trunk = MlpTrunk(6).double()
    model = TaskModel(trunk, nn.Linear(256, 2).double())
    x = torch.randn(10, 6, dtype=torch.float64)
    omega = local_mas_importance(model, DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), 4), CPU)
    layer1, layer2 = trunk.net[1], trunk.net[3]
    with torch.no_grad():
        y1 = torch.relu(layer1(x))
        y2 = torch.relu(layer2(y1))
    # Omega_ij = mean_k |2 y_i x_j| for every weight, mean_k |2 y_i| for every bias
    torch.testing.assert_close(omega["net.1.weight"], (2 * y1).abs().T @ x.abs() / 10)
    torch.testing.assert_close(omega["net.1.bias"], (2 * y1).abs().mean(0))
    torch.testing.assert_close(omega["net.3.weight"], (2 * y2).abs().T @ y1.abs() / 10)
    torch.testing.assert_close(omega["net.3.bias"], (2 * y2).abs().mean(0))


def test_local_mas_on_a_conv_layer_equals_a_per_sample_autograd_reference():
    model, data = _setup(TinyAlexNet(), (3, 16, 16))
    omega = local_mas_importance(model, DataLoader(data, batch_size=4), CPU)
    conv = model.shared.features[3]
    pooled = nn.Sequential(*list(model.shared.features)[:3])
    reference = {"weight": torch.zeros_like(conv.weight), "bias": torch.zeros_like(conv.bias)}
    model.eval()
    for x, _ in data:
        layer_input = pooled(x[None]).detach()  # the layer's input is a constant
        out = torch.relu(conv(layer_input)).pow(2).sum()  # ||y_l||^2 with y_l after the following ReLU
        g_w, g_b = torch.autograd.grad(out, [conv.weight, conv.bias])
        reference["weight"] += g_w.abs() / len(data)
        reference["bias"] += g_b.abs() / len(data)
    torch.testing.assert_close(omega["features.3.weight"], reference["weight"])
    torch.testing.assert_close(omega["features.3.bias"], reference["bias"])


def test_local_mas_without_a_following_activation_uses_the_layer_output():
    torch.manual_seed(3)
    trunk = nn.Sequential(nn.Linear(3, 2))
    trunk.out_features = 2
    model = TaskModel(trunk, nn.Linear(2, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    omega = local_mas_importance(model, DataLoader(TensorDataset(x, torch.zeros(5, dtype=torch.long))), CPU)
    with torch.no_grad():
        z = trunk(x)
    torch.testing.assert_close(omega["0.weight"], (2 * z).abs().T @ x.abs() / 5)


class OneParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def test_si_on_a_quadratic_loss_matches_a_hand_computation():
    # L = (theta - 1)^2, so g = 2 (theta - 1); plain SGD with lr 0.1 from theta = 0.
    shared = OneParameter()
    opt = LocalSgd(shared.parameters(), lr=0.1, momentum=0.0, fused="eager")
    opt.start_path_integral(shared.theta)
    for _ in range(3):
        opt.zero_grad()
        (shared.theta - 1).pow(2).sum().backward()
        opt.step()
    # steps: 0 -> 0.2 -> 0.36 -> 0.488; path integral sum -g * dtheta = 2*0.2 + 1.6*0.16 + 1.28*0.128
    assert shared.theta.item() == pytest.approx(0.488)
    path = 0.4 + 0.256 + 0.16384
    assert opt.state[shared.theta]["path_integral"].item() == pytest.approx(path)
    omega = si_importance(opt, shared, {"theta": torch.zeros(1, dtype=torch.float64)}, xi=0.1)
    assert omega["theta"].item() == pytest.approx(path / (0.488**2 + 0.1))


def test_si_path_integral_uses_the_data_gradient_not_the_penalty():
    shared = OneParameter()
    opt = LocalSgd(shared.parameters(), lr=0.1, reg_lambda=1.0, momentum=0.0, fused="eager")
    opt.set_importance(shared.theta, torch.ones(1, dtype=torch.float64), torch.full((1,), 1.0, dtype=torch.float64))
    opt.start_path_integral(shared.theta)
    shared.theta.grad = torch.zeros(1, dtype=torch.float64)  # no data gradient: only the penalty moves theta
    opt.step()
    assert shared.theta.item() == pytest.approx(0.2)  # 0 - 0.1 * 2 * 1 * 1 * (0 - 1)
    assert opt.state[shared.theta]["path_integral"].item() == 0.0


def test_si_gives_no_importance_where_the_path_integral_is_negative():
    shared = OneParameter()
    opt = LocalSgd(shared.parameters(), lr=0.1, momentum=0.0, fused="eager")
    opt.start_path_integral(shared.theta)
    opt.state[shared.theta]["path_integral"].fill_(-3.0)
    omega = si_importance(opt, shared, {"theta": torch.zeros(1, dtype=torch.float64)}, xi=0.1)
    assert omega["theta"].item() == 0.0


# --------------------------------------------------------------------------- the batch estimator


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
