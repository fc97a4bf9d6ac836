"""--val_fraction: the held-out validation split (utils/data/validation.py), its loaders and its matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_same_run, write_dataset
from main import main
from utils import UserError
from utils.data.cache import RunCache
from utils.data.tasks import make_task_data, read_manifest
from utils.data.validation import split_samples

FAST = ["--num_epochs", "1", "--batch_size", "3", "--init_lr", "0.05"]
SIZES = [10, 7, 2, 3]  # class sizes; with F = 0.3: 3, 2, 1 (at least one), 1 held out


def _samples(sizes: list[int]) -> list[tuple[str, int]]:
    return [(f"c{label}/{i}.png", label) for label, n in enumerate(sizes) for i in range(n)]


def _split(fraction: float = 0.3, seed: int = 0, task_no: int = 1, sizes: list[int] = SIZES):
    classes = [f"c{k}" for k in range(len(sizes))]
    return split_samples(_samples(sizes), classes, fraction, seed, task_no, "Task_1")


def test_the_split_is_stratified_disjoint_ordered_and_seeded():
    training, validation = _split()
    per_class = [sum(1 for _, label in validation if label == k) for k in range(len(SIZES))]
    assert per_class == [3, 2, 1, 1]
    assert sorted(training + validation) == sorted(_samples(SIZES)) and not set(training) & set(validation)
    everything = _samples(SIZES)
    assert training == [s for s in everything if s in training] and validation == [
        s for s in everything if s in validation
    ]
    assert _split() == (training, validation)
    assert _split(seed=1)[1] != validation and _split(task_no=2)[1] != validation


@pytest.mark.parametrize(("fraction", "sizes", "message"), [
    (0.75, [4, 2], "would hold out all 2 training images of class c1"),
    (0.6, [5, 1], "would hold out all 1 training images of class c1"),
    (0.2, [1, 1], "holds out no training image"),
])  # fmt: skip
def test_a_fraction_that_empties_a_class_or_holds_out_nothing_is_refused(fraction, sizes, message):
    with pytest.raises(UserError, match=message):
        _split(fraction, sizes=sizes)


@pytest.mark.parametrize("cache", ["off", "ram"])
def test_the_loaders_train_on_what_is_not_held_out(tmp_path, cache):
    data = write_dataset(tmp_path / "Data", num_tasks=2, n_train=5, n_test=2)
    manifest = read_manifest(data)
    run_cache = RunCache(cache, 0)
    task = make_task_data(data / "Task_2", manifest, 1, 8, 4, 0, cache=run_cache, val_fraction=0.4, seed=3)
    files = {k: getattr(task, k).dataset for k in ("train", "importance", "validation")}
    samples = {k: (d.files if cache == "ram" else d).samples for k, d in files.items()}
    assert samples["train"] == samples["importance"] and len(samples["validation"]) == 4  # 2 of 5 per class
    assert sorted(samples["train"] + samples["validation"]) == sorted(_all_training(data / "Task_2"))
    images = [x for x, _ in task.validation]
    assert sum(len(x) for x in images) == 4  # served, with either cache mode


def _all_training(task_dir: Path) -> list[tuple[str, int]]:
    classes = sorted(p.name for p in (task_dir / "train").iterdir())
    return [(str(f), k) for k, c in enumerate(classes) for f in sorted((task_dir / "train" / c).iterdir())]


def _run(data: Path, models: Path, *flags: str) -> dict:
    return main(["--data_dir", str(data), "--models_dir", str(models), *FAST, *flags])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("val") / "Data", num_tasks=3, n_train=5, n_test=3)


def test_the_validation_matrix_is_recorded_alike_with_either_cache(data, tmp_path):
    off = _run(data, tmp_path / "off", "--val_fraction", "0.4", "--cache", "off")
    ram = _run(data, tmp_path / "ram", "--val_fraction", "0.4", "--cache", "ram")
    assert_same_run(tmp_path / "ram", tmp_path / "off")
    matrix = off["validation_accuracy_matrix"]
    assert matrix == ram["validation_accuracy_matrix"] and len(matrix) == 3
    assert [[a is None for a in row] for row in matrix] == [[False, True, True], [False, False, True], [False] * 3]
    assert off["validation_average_accuracy"] == pytest.approx(sum(matrix[-1]) / 3)
    assert off["args"]["val_fraction"] == 0.4
    saved = json.loads((tmp_path / "off" / "results.json").read_text())
    assert saved["validation_accuracy_matrix"] == matrix


def test_no_eval_every_task_scores_only_the_diagonal_until_the_last_row(data, tmp_path):
    results = _run(data, tmp_path / "m", "--val_fraction", "0.4", "--no-eval_every_task")
    matrix = results["validation_accuracy_matrix"]
    assert [[a is None for a in row] for row in matrix] == [[False, True, True], [True, False, True], [False] * 3]


def test_fraction_zero_is_bit_identical_to_no_flag(data, tmp_path):
    plain = _run(data, tmp_path / "plain")
    zero = _run(data, tmp_path / "zero", "--val_fraction", "0")
    assert_same_run(tmp_path / "zero", tmp_path / "plain")
    assert zero["args"] == {**plain["args"], "models_dir": zero["args"]["models_dir"]}
    assert "val_fraction" not in zero["args"] and "validation_accuracy_matrix" not in zero


def test_resume_with_another_fraction_is_refused(data, tmp_path, error_line):
    _run(data, tmp_path / "a", "--val_fraction", "0.4")
    line = error_line(lambda: _run(data, tmp_path / "a", "--val_fraction", "0.2", "--resume"))
    assert line.endswith("--val_fraction 0.4 -> 0.2")
    _run(data, tmp_path / "b")
    line = error_line(lambda: _run(data, tmp_path / "b", "--val_fraction", "0.2", "--resume"))
    assert line.endswith("--val_fraction 0.0 -> 0.2")


def test_a_fraction_out_of_range_and_a_search_without_validation_are_one_line(data, tmp_path, error_line):
    with pytest.raises(SystemExit) as stop:
        _run(data, tmp_path / "m", "--val_fraction", "1")
    assert stop.value.code == 2
    line = error_line(lambda: _run(data, tmp_path / "m", "--hparam_search", "chf"))
    assert line == "error: --hparam_search chf chooses on a validation set: give --val_fraction > 0 (e.g. 0.1)"


def test_in_the_class_scenario_validation_labels_follow_the_earlier_classes(data, tmp_path):
    # Scored without the task identity over every class seen so far: task t's validation labels must be offset
    # by the earlier tasks' classes, as its test labels are (unshifted, a trained task would score about 0 %).
    results = _run(data, tmp_path / "m", "--val_fraction", "0.4", "--scenario", "class")
    validation, test = results["validation_accuracy_matrix"], results["accuracy_matrix"]
    last = len(test) - 1
    assert test[last][last] >= 75.0 and validation[last][last] >= 75.0, (test, validation)
