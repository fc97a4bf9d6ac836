"""--amp: bf16 autocast trains and the penalty still holds; fp16's gradient scaler hands LocalSgd
unscaled gradients, so the penalty is added to the true gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data_prep import main as data_prep
from main import main
from model_train import Precision, _backward_and_step, make_precision
from optimizer_lib import LocalSgd


@pytest.fixture(scope="module")
def permuted_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("permuted") / "Data"
    data_prep(["--dataset", "digits", "--scenario", "permuted", "--num_tasks", "3", "--data_dir", str(out)])
    return out


@pytest.mark.slow  # a whole main.py run (the quick tier leaves it out)
def test_bf16_trains_and_mas_forgets_less_than_finetuning(permuted_digits, tmp_path):
    runs = {}
    for name, flags in {"finetune": ["--method", "finetune"], "mas": ["--method", "mas", "--reg_lambda", "1"]}.items():
        argv = ["--data_dir", str(permuted_digits), "--models_dir", str(tmp_path / name), "--num_epochs", "5"]
        runs[name] = main([*argv, "--amp", "bf16", *flags])
        assert runs[name]["args"]["amp"] == "bf16"
    assert runs["finetune"]["average_forgetting_previous"] > 3.0  # the permuted tasks interfere
    assert runs["mas"]["average_forgetting_previous"] < 0.5 * runs["finetune"]["average_forgetting_previous"]
    assert runs["mas"]["average_accuracy"] > 85.0


def _step(scaler: torch.amp.GradScaler | None, data_grad_scale: float = 1.0) -> tuple[torch.Tensor, LocalSgd]:
    """One step of LocalSgd with the penalty on theta = (1, -2, 3), loss = sum(w * theta) * scale."""
    torch.manual_seed(0)
    theta = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = LocalSgd([theta], lr=0.1, reg_lambda=0.5, momentum=0.9, weight_decay=0.01)
    opt.set_importance(theta, torch.tensor([1.0, 4.0, 0.5]), torch.zeros(3))
    loss = (torch.tensor([0.3, -0.2, 0.7]) * theta).sum() * data_grad_scale
    _backward_and_step(loss, opt, scaler)
    return theta.detach(), opt


def test_fp16_scaler_unscales_before_the_penalty_is_added():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, _ = _step(scaler)
    plain, _ = _step(None)
    # By hand: g = (0.3, -0.2, 0.7), d = g + wd theta + 2 lambda Omega (theta - theta*), buf = d, theta - lr d.
    theta = torch.tensor([1.0, -2.0, 3.0])
    d = torch.tensor([0.3, -0.2, 0.7]) + 0.01 * theta + 2 * 0.5 * torch.tensor([1.0, 4.0, 0.5]) * theta
    torch.testing.assert_close(scaled, theta - 0.1 * d)
    torch.testing.assert_close(scaled, plain)
    assert scaler.get_scale() == 1024.0  # no overflow: the scale is kept (it grows only after 2000 steps)


def test_fp16_scaler_skips_a_step_whose_gradients_overflow():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    theta, opt = _step(scaler, data_grad_scale=2.0**20)  # scaled gradients beyond float32: inf
    assert torch.equal(theta, torch.tensor([1.0, -2.0, 3.0]))  # no step, no penalty applied to inf
    assert "momentum_buffer" not in opt.state[next(iter(opt.state))]
    assert scaler.get_scale() == 2.0**119  # halved for the next step


def test_precision_of_each_mode():
    cpu = torch.device("cpu")
    assert make_precision("off", cpu) == Precision()
    assert make_precision("bf16", cpu).dtype is torch.bfloat16 and make_precision("bf16", cpu).scaler is None
    fp16 = make_precision("fp16", cpu)
    assert fp16.dtype is torch.float16 and isinstance(fp16.scaler, torch.amp.GradScaler)


def test_amp_is_recorded_and_refused_on_resume_with_another_value(tiny_data, tmp_path, capsys):
    argv = ["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / "m"), "--num_epochs", "1"]
    main([*argv, "--amp", "bf16"])
    with pytest.raises(SystemExit):
        main([*argv, "--resume"])
    assert "--amp 'bf16' -> 'off'" in capsys.readouterr().err
