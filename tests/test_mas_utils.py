"""reg_params life cycle, freezing, and the penalty after a save/load round trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_test_config, new_run_state
from importance import mas_batch_importance
from mas import RunState, mas_train, task_seed
from model_class import AlexNetTrunk, MlpTrunk, TaskModel, build_shared_model, create_freeze_layers
from model_train import seed_everything
from reg_params import check_reg_params, consolidate_reg_params, init_reg_params, init_reg_params_across_tasks
from utils import UserError
from utils.artefacts.files import load_tensor_pickle, save_pickle
from utils.artefacts.model_files import load_head, load_shared_state, read_performance
from utils.data.tasks import make_task_data, read_manifest, task_dirs


def _config(data, models, **overrides):
    """main.py's defaults, with the tiny MLP data and the given overrides."""
    settings = dict(batch_size=4, num_epochs=3, init_lr=0.05, reg_lambda=1.0, momentum=0.0)
    return make_test_config(data, models, **{**settings, **overrides})


def _tasks(data, config):
    manifest = read_manifest(data)
    return [make_task_data(f, manifest, 1, 8, config.batch_size, 0) for f in task_dirs(data, manifest)]


def _load_shared_model(models) -> torch.nn.Module:
    return load_shared_state(MlpTrunk(64), models)


def _reloaded(config, finished: int) -> RunState:
    """A run read back from the files of its first ``finished`` tasks (what --resume does)."""
    tasks = [{"task": t, "test_accuracy": read_performance(config.models_dir, t)} for t in range(1, finished + 1)]
    state = RunState(config, {"tasks": tasks})
    state.load_finished(Path(config.models_dir))
    return state


def test_freeze_layers_alexnet_convolutions_from_the_input():
    trunk = AlexNetTrunk()
    frozen = create_freeze_layers(trunk, 2)
    assert frozen == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    assert not trunk.features[3].weight.requires_grad and trunk.features[6].weight.requires_grad
    assert all(p.requires_grad for p in trunk.classifier.parameters())


def test_freeze_layers_mlp_and_bounds():
    trunk = MlpTrunk(64)
    assert create_freeze_layers(trunk, 1) == ["net.1.weight", "net.1.bias"]
    assert sorted(init_reg_params(trunk)) == ["net.3.bias", "net.3.weight"]  # frozen: no importance
    with pytest.raises(UserError, match="between 0 and 2"):
        create_freeze_layers(MlpTrunk(64), 3)


def test_life_cycle_prev_omega_and_consolidation():
    trunk = MlpTrunk(4)
    reg = init_reg_params(trunk)
    assert all(torch.equal(e["omega"], torch.zeros_like(e["omega"])) for e in reg.values())
    omega1 = {n: torch.rand_like(p) for n, p in trunk.named_parameters()}
    reg = consolidate_reg_params(reg, omega1, trunk)
    for name, p in trunk.named_parameters():
        assert torch.equal(reg[name]["omega"], omega1[name]) and torch.equal(reg[name]["init_val"], p.detach())
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(1.0)  # "training" of task 2
    reg = init_reg_params_across_tasks(reg, trunk)
    omega2 = {n: torch.rand_like(p) for n, p in trunk.named_parameters()}
    reg = consolidate_reg_params(reg, omega2, trunk)
    for name, p in trunk.named_parameters():
        assert torch.equal(reg[name]["prev_omega"], omega1[name])
        torch.testing.assert_close(reg[name]["omega"], omega1[name] + omega2[name])
        assert torch.equal(reg[name]["init_val"], p.detach())


def test_check_reg_params_names_the_offending_parameter():
    trunk = MlpTrunk(4)
    reg = init_reg_params(trunk)
    reg["net.3.weight"]["omega"] = torch.zeros(2, 2)
    with pytest.raises(UserError, match=r"parameter 'net.3.weight' has shape \(2, 2\)"):
        check_reg_params(reg, trunk, "reg_params")
    del reg["net.3.weight"]
    with pytest.raises(UserError, match="no entry for parameter 'net.3.weight'"):
        check_reg_params(reg, trunk, "reg_params")


def test_saved_reg_params_hold_the_consolidated_importance(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path / "m")
    tasks = _tasks(tiny_data, config)
    state = new_run_state(config)
    mas_train(state, 1, tasks[0], torch.device("cpu"))
    after_1 = load_tensor_pickle(tmp_path / "m" / "reg_params.pickle")
    mas_train(state, 2, tasks[1], torch.device("cpu"))
    after_2 = load_tensor_pickle(tmp_path / "m" / "reg_params.pickle")
    # Omega of task 2 measured independently with the stored model and head.
    shared = _load_shared_model(tmp_path / "m")
    model = TaskModel(shared, load_head(tmp_path / "m", 2, shared.out_features, 2))
    omega_2 = mas_batch_importance(model, tasks[1].importance, torch.device("cpu"))
    for name, entry in after_2.items():
        assert torch.equal(entry["prev_omega"], after_1[name]["omega"])
        torch.testing.assert_close(entry["omega"], after_1[name]["omega"] + omega_2[name])
        assert torch.equal(entry["init_val"], shared.state_dict()[name])


def _task2_drift(data, models, reg_lambda: float, seed_models) -> float:
    """Distance that net.3.weight moves from theta* during task 2, after a reload from disk."""
    shutil.copytree(seed_models, models)
    config = _config(data, models, reg_lambda=reg_lambda, num_epochs=5, init_lr=0.1)
    reg = load_tensor_pickle(models / "reg_params.pickle")
    reg["net.3.weight"]["omega"] = torch.full_like(reg["net.3.weight"]["omega"], 4.0)
    save_pickle(reg, models / "reg_params.pickle")
    theta_star = _load_shared_model(models).state_dict()["net.3.weight"]
    mas_train(_reloaded(config, 1), 2, _tasks(data, config)[1], torch.device("cpu"))
    after = _load_shared_model(models).state_dict()["net.3.weight"]
    return (after - theta_star).norm().item()


def test_penalty_is_active_in_task_2_after_a_save_load_round_trip(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path / "task1")
    mas_train(new_run_state(config), 1, _tasks(tiny_data, config)[0], torch.device("cpu"))
    free = _task2_drift(tiny_data, tmp_path / "free", 0.0, tmp_path / "task1")
    held = _task2_drift(tiny_data, tmp_path / "held", 1.0, tmp_path / "task1")
    assert free > 0.05
    assert held < 0.1 * free


def test_frozen_layers_do_not_change_across_tasks(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path / "m", num_freeze_layers=1)
    tasks = _tasks(tiny_data, config)
    seed_everything(task_seed(config.seed, 1))
    initial = build_shared_model("mlp", 1, 8, pretrained=False).state_dict()
    state = new_run_state(config)
    for task_no, task in enumerate(tasks, start=1):
        mas_train(state, task_no, task, torch.device("cpu"))
    final = _load_shared_model(tmp_path / "m").state_dict()
    assert torch.equal(final["net.1.weight"], initial["net.1.weight"])
    assert torch.equal(final["net.1.bias"], initial["net.1.bias"])
    assert not torch.equal(final["net.3.weight"], initial["net.3.weight"])
    assert sorted(load_tensor_pickle(tmp_path / "m" / "reg_params.pickle")) == ["net.3.bias", "net.3.weight"]
