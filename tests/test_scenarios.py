"""main.py --scenario task|domain|class (van de Ven & Tolias 2019) and the task-agnostic accuracy of the
task scenario: head shapes, the outputs the loss and the importance use, scoring without the task,
resume, refusals. Tiny generated sequences, in-process runs (torchrun in test_scenarios_distributed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import importance
import model_train
from conftest import assert_same_run, interrupted_after_checkpoint, write_dataset
from main import main
from model_class import MlpTrunk, build_head
from scenario import start_head
from task_agnostic import TAG_MATRIX, record_task_agnostic, task_agnostic_accuracy
from utils.artefacts.results import summarize
from utils.data.tasks import TaskData

FAST = ["--num_epochs", "2", "--batch_size", "4", "--init_lr", "0.05", "--reg_lambda", "0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 7 training images a class: 14 a task, in batches of 4, 4, 4, 2; 6 test images, in batches of 4, 2
    return write_dataset(tmp_path_factory.mktemp("scenarios") / "Data", num_tasks=3, n_train=7, n_test=3)


def _run(data: Path, models: Path, *flags: str) -> dict:
    return main(["--data_dir", str(data), "--models_dir", str(models), *FAST, *flags])


def _head(models: Path, task_no: int) -> dict[str, torch.Tensor]:
    return torch.load(models / f"Task_{task_no}" / "head.pth", weights_only=True)


def _score_from_files(data: Path, models: Path, task_no: int, head_task: int, offset: int) -> float:
    """Task ``task_no`` scored from the files alone: PIL + numpy, the trunk and Task_<head_task>/head.pth,
    argmax over every output of that head, correct when it is ``offset`` + the class's index."""
    manifest = json.loads((data / "manifest.json").read_text())
    trunk = MlpTrunk(manifest["image_size"] ** 2)
    trunk.load_state_dict(torch.load(models / "shared_model.pth", weights_only=True))
    state = _head(models, head_task)
    head = nn.Linear(trunk.out_features, state["weight"].shape[0])
    head.load_state_dict(state)
    correct = total = 0
    for label, name in enumerate(sorted(manifest["tasks"][task_no - 1]["classes"])):
        for path in sorted((data / f"Task_{task_no}" / "test" / name).iterdir()):
            pixels = np.asarray(Image.open(path), dtype=np.float32) / 255.0
            x = (torch.from_numpy(pixels) - manifest["mean"][0]) / manifest["std"][0]
            with torch.no_grad():
                correct += int(head(trunk.eval()(x[None, None])).argmax(1).item() == offset + label)
            total += 1
    return 100.0 * correct / total


def test_task_scenario_is_the_run_without_the_flag(data, tmp_path):
    without = _run(data, tmp_path / "without")
    flagged = _run(data, tmp_path / "flagged", "--scenario", "task")
    assert_same_run(tmp_path / "flagged", tmp_path / "without")
    assert flagged["scenario"] == without["scenario"] == "task" and flagged["args"]["scenario"] == "task"
    assert flagged[TAG_MATRIX] == without[TAG_MATRIX]
    assert [_head(tmp_path / "flagged", t)["weight"].shape[0] for t in (1, 2, 3)] == [2, 2, 2]


@pytest.mark.parametrize(("scenario", "outputs"), [("domain", [2, 2, 2]), ("class", [2, 4, 6])])
def test_heads_loss_and_importance_use_the_scenarios_outputs(data, tmp_path, monkeypatch, scenario, outputs):
    seen_by_loss, seen_by_importance = [], []

    class SpyLoss(nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            seen_by_loss.append((logits.shape[1], labels.min().item(), labels.max().item()))
            return super().forward(logits, labels)

    real_norm = importance._squared_output_norm
    monkeypatch.setattr(model_train.nn, "CrossEntropyLoss", SpyLoss)
    monkeypatch.setattr(
        importance, "_squared_output_norm", lambda out, y: seen_by_importance.append(out.shape[1]) or real_norm(out, y)
    )
    results = _run(data, tmp_path / "m", "--scenario", scenario)
    models = tmp_path / "m"
    assert [_head(models, t)["weight"].shape for t in (1, 2, 3)] == [(n, 256) for n in outputs]
    per_task = len(seen_by_loss) // 3  # 4 batches x 2 epochs a task
    for t, width in enumerate(outputs):
        batches = seen_by_loss[t * per_task : (t + 1) * per_task]
        offset = width - 2 if scenario == "class" else 0  # labels follow the earlier tasks' classes
        assert {b[0] for b in batches} == {width}
        assert min(b[1] for b in batches) == offset and max(b[2] for b in batches) == offset + 1
    assert sorted(set(seen_by_importance)) == sorted(set(outputs))
    assert results["scenario"] == scenario and TAG_MATRIX not in results
    # Tests score every task with the last head, no task given, from the files alone.
    last = results["accuracy_matrix"][-1]
    for t in (1, 2, 3):
        offset = 2 * (t - 1) if scenario == "class" else 0
        assert last[t - 1] == pytest.approx(_score_from_files(data, models, t, 3, offset), abs=1e-9)


def test_start_head_carries_the_previous_head_and_draws_the_new_rows_from_the_task_stream():
    trunk = MlpTrunk(4)
    previous = build_head(trunk, 3)
    torch.manual_seed(7)
    fresh = build_head(trunk, 2)
    for scenario in ("task", "domain", "class"):
        torch.manual_seed(7)
        head = start_head(scenario, trunk, 2 if scenario != "domain" else 3, previous)
        if scenario == "task":
            assert torch.equal(head.weight, fresh.weight) and torch.equal(head.bias, fresh.bias)
        elif scenario == "domain":
            assert torch.equal(head.weight, previous.weight) and head.weight is not previous.weight
        else:
            assert torch.equal(head.weight, torch.cat([previous.weight, fresh.weight]))
            assert torch.equal(head.bias, torch.cat([previous.bias, fresh.bias]))
        # the same draws in every scenario: the next random number is the one after a 2-row head
    torch.manual_seed(7)
    build_head(trunk, 2)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    start_head("class", trunk, 2, previous)
    assert torch.equal(torch.rand(1), expected_next)


def test_class_scenario_gradient_reaches_every_seen_row():
    """The loss of task 2 uses the outputs of tasks 1 and 2: softmax over all 4 outputs, label offset by 2."""
    trunk, previous = MlpTrunk(4), None
    previous = start_head("class", trunk, 2, previous)
    head = start_head("class", trunk, 2, previous)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    logits = head(trunk(x))
    loss = nn.CrossEntropyLoss()(logits, y + 2)
    by_hand = -torch.stack([logits[k].log_softmax(0)[y[k] + 2] for k in range(3)]).mean()
    assert torch.allclose(loss, by_hand)
    loss.backward()
    assert all(head.weight.grad[r].abs().sum() > 0 for r in range(4))  # earlier classes are pushed down too


def _fixed_task(name: str, points: list[tuple[float, float]], labels: list[int]) -> TaskData:
    loader = DataLoader(TensorDataset(torch.tensor(points), torch.tensor(labels)), batch_size=2)  # last batch: 1
    return TaskData(name, ["a", "b"], loader, loader, loader)


def _fixed_heads() -> list[nn.Linear]:
    """Head 1 outputs the features (x0, x1); head 2 the constants (0.5, 0.2)."""
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        second.weight.zero_()
        second.bias.copy_(torch.tensor([0.5, 0.2]))
    return [first, second]


def test_task_agnostic_accuracy_is_the_argmax_over_all_heads():
    heads, trunk, cpu = _fixed_heads(), nn.Identity(), torch.device("cpu")
    # Task 1: (1, 0) -> output 0, right; (0, 1) -> output 1, right; (0.3, 0.2) -> output 2 (head 2), wrong.
    task1 = _fixed_task("t1", [(1.0, 0.0), (0.0, 1.0), (0.3, 0.2)], [0, 1, 0])
    # Task 2 (outputs 2, 3): (0.1, 0.1) -> output 2: right for class 0, wrong for class 1;
    # (0.9, 0) -> output 0, wrong; (0, 0.1) -> output 2, right.
    task2 = _fixed_task("t2", [(0.1, 0.1), (0.1, 0.1), (0.9, 0.0), (0.0, 0.1)], [0, 1, 0, 0])
    assert task_agnostic_accuracy(trunk, heads, 1, task1, cpu) == pytest.approx(200 / 3)
    assert task_agnostic_accuracy(trunk, heads, 2, task2, cpu) == 50.0
    assert task_agnostic_accuracy(trunk, heads[:1], 1, task1, cpu) == 100.0  # after task 1: head 1 alone
    results = {"task_names": ["t1", "t2"], TAG_MATRIX: []}
    record_task_agnostic(results, trunk, {1: heads[0], 2: heads[1]}, [task1], True, cpu)
    record_task_agnostic(results, trunk, {1: heads[0], 2: heads[1]}, [task1, task2], True, cpu)
    assert results[TAG_MATRIX] == [[100.0, None], [pytest.approx(200 / 3), 50.0]]
    assert results["task_agnostic"] == summarize(results[TAG_MATRIX])
    assert results["task_agnostic"]["average_accuracy"] == pytest.approx((200 / 3 + 50) / 2)


def test_task_scenario_records_the_task_agnostic_matrix_and_one_summary_line(data, tmp_path, capsys):
    results = _run(data, tmp_path / "m", "--no-eval_every_task")
    out = capsys.readouterr().out
    matrix = results[TAG_MATRIX]
    assert [[a is not None for a in row] for row in matrix] == [
        [True, False, False],
        [False, True, False],
        [True, True, True],
    ]
    models = tmp_path / "m"
    heads = [_head(models, t) for t in (1, 2, 3)]
    joined = {k: torch.cat([h[k] for h in heads]) for k in ("weight", "bias")}
    torch.save(joined, models / "joined.pth")
    (models / "Task_9").mkdir()
    shutil.copy(models / "joined.pth", models / "Task_9" / "head.pth")
    for t in (1, 2, 3):  # the last row, from the files: argmax over the 6 outputs of heads 1..3
        assert matrix[2][t - 1] == pytest.approx(_score_from_files(data, models, t, 9, 2 * (t - 1)), abs=1e-9)
    assert results["task_agnostic"] == summarize(matrix)
    tag_lines = [line for line in out.splitlines() if line.startswith("task-agnostic average accuracy")]
    average = results["task_agnostic"]["average_accuracy"]
    assert tag_lines == [f"task-agnostic average accuracy (argmax over all heads, no task given): {average:.2f} %"]


def _error(error_line, data: Path, models: Path, *flags: str) -> str:
    return error_line(lambda: _run(data, models, *flags))


def test_resume_refuses_another_scenario(data, tmp_path, error_line):
    models = tmp_path / "m"
    _run(data, models)
    line = _error(error_line, data, models, "--resume", "--scenario", "class")
    assert line == f"error: --resume with arguments that differ from the run in {models}: --scenario 'task' -> 'class'"
    # A run recorded before --scenario existed is a task-scenario run.
    results = json.loads((models / "results.json").read_text())
    del results["args"]["scenario"], results["scenario"]
    (models / "results.json").write_text(json.dumps(results))
    line = _error(error_line, data, models, "--resume", "--scenario", "domain")
    assert line == f"error: --resume with arguments that differ from the run in {models}: --scenario 'task' -> 'domain'"
    assert _run(data, models, "--resume")["scenario"] == "task"


def test_resume_refuses_a_head_of_another_shape(data, tmp_path, error_line):
    models = tmp_path / "m"
    _run(data, models, "--scenario", "class")
    shutil.copy(models / "Task_1" / "head.pth", models / "Task_2" / "head.pth")
    line = _error(error_line, data, models, "--resume", "--scenario", "class")
    assert line == (
        f"error: {models / 'Task_2' / 'head.pth'} holds a head of 2 outputs; after task 2 the class scenario "
        "has 4: is it a run of another scenario?"
    )


@pytest.mark.parametrize("scenario", ["domain", "class"])
def test_interrupted_and_resumed_equals_an_uninterrupted_run(data, tmp_path, monkeypatch, scenario):
    _run(data, tmp_path / "reference", "--scenario", scenario)
    with interrupted_after_checkpoint(monkeypatch, task_no=2, epoch=0), pytest.raises(SystemExit):
        _run(data, tmp_path / "m", "--scenario", scenario)
    _run(data, tmp_path / "m", "--scenario", scenario, "--resume")
    assert_same_run(tmp_path / "m", tmp_path / "reference")


def test_domain_refuses_tasks_with_different_numbers_of_classes(tmp_path, error_line):
    data = write_dataset(tmp_path / "Data", num_tasks=1, classes_per_task=2)
    other = write_dataset(tmp_path / "Other", num_tasks=1, classes_per_task=3)
    shutil.move(other / "Task_1", data / "Task_2")
    for split in ("train", "test"):
        for folder in (data / "Task_2" / split).iterdir():
            folder.rename(folder.with_name(folder.name.replace("c1_", "c2_")))
    manifest = json.loads((data / "manifest.json").read_text())
    task2 = json.loads((other / "manifest.json").read_text())["tasks"][0]
    task2.update(name="Task_2", classes=[c.replace("c1_", "c2_") for c in task2["classes"]])
    manifest.update(tasks=[*manifest["tasks"], task2], num_tasks=2)
    (data / "manifest.json").write_text(json.dumps(manifest))
    line = _error(error_line, data, tmp_path / "m", "--scenario", "domain")
    assert line == (
        "error: --scenario domain shares one head, so every task needs the same number of classes; "
        "this data's tasks have Task_1 2, Task_2 3: use --scenario task or class"
    )
    assert not (tmp_path / "m").exists()
    results = _run(data, tmp_path / "c", "--scenario", "class")  # the same data runs in the class scenario
    assert _head(tmp_path / "c", 2)["weight"].shape[0] == 5 and len(results["accuracy_matrix"]) == 2


METHODS = [["mas"], ["mas", "--omega_estimator", "per_sample"], ["local_mas"], ["ewc"], ["si"], ["l2"], ["finetune"]]


@pytest.mark.parametrize("scenario", ["domain", "class"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: "_".join(m).replace("--omega_estimator_", ""))
def test_every_method_runs_in_every_scenario(tmp_path, scenario, method):
    data = write_dataset(tmp_path / "Data", num_tasks=2, n_train=3, n_test=1)  # a test batch of 2, of 1 per class
    results = main(
        ["--data_dir", str(data), "--models_dir", str(tmp_path / "m"), "--num_epochs", "1", "--batch_size", "4"]
        + ["--scenario", scenario, "--method", *method]
    )
    assert results["complete"] and results["scenario"] == scenario
    assert _head(tmp_path / "m", 2)["weight"].shape[0] == (4 if scenario == "class" else 2)
