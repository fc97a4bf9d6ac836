"""The l2 method: a plug-in written as one file, used end to end."""

from __future__ import annotations

import torch

from config import build_parser
from conftest import make_test_config, new_run_state
from main import main
from mas import mas_train
from utils.artefacts.files import load_tensor_pickle
from utils.data.tasks import make_task_data, read_manifest, task_dirs

SETTINGS = dict(num_epochs=3, batch_size=4, init_lr=0.1, momentum=0.0)


def test_l2_is_a_method_of_the_command_line():
    assert build_parser().parse_args(["--method", "l2"]).method == "l2"


def test_omega_counts_the_finished_tasks_and_theta_star_is_the_trunk(tiny_data, tmp_path):
    models = tmp_path / "m"
    flags = ["--num_epochs", "3", "--batch_size", "4", "--method", "l2", "--reg_lambda", "0.5"]
    results = main(["--data_dir", str(tiny_data), "--models_dir", str(models), *flags])
    assert results["label"] == "l2, lambda=0.5"
    reg_params = load_tensor_pickle(models / "reg_params.pickle")
    trunk = torch.load(models / "shared_model.pth", weights_only=True)
    assert sorted(reg_params) == sorted(trunk)
    for name, entry in reg_params.items():
        assert torch.equal(entry["prev_omega"], torch.ones_like(entry["prev_omega"]))  # after task 1
        assert torch.equal(entry["omega"], torch.full_like(entry["omega"], 2.0))  # after tasks 1 and 2
        assert torch.equal(entry["init_val"], trunk[name])


def _task2_drift(data, models, reg_lambda: float) -> float:
    """How far (L2 norm) the trunk moves from theta* during task 2."""
    config = make_test_config(data, models, method="l2", reg_lambda=reg_lambda, **SETTINGS)
    manifest = read_manifest(data)
    tasks = [make_task_data(f, manifest, 1, 8, 4, 0) for f in task_dirs(data, manifest)]
    state = new_run_state(config)
    mas_train(state, 1, tasks[0], torch.device("cpu"))
    theta_star = {n: p.detach().clone() for n, p in state.shared.named_parameters()}
    mas_train(state, 2, tasks[1], torch.device("cpu"))
    return sum((p.detach() - theta_star[n]).square().sum() for n, p in state.shared.named_parameters()).sqrt().item()


def test_the_penalty_holds_the_trunk_at_the_previous_weights(tiny_data, tmp_path):
    free = _task2_drift(tiny_data, tmp_path / "free", 0.0)
    held = _task2_drift(tiny_data, tmp_path / "held", 2.0)
    assert free > 0.05
    assert held < 0.25 * free
