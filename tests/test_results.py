"""results.json, accuracy_matrix.csv, the metrics, and the plots."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from main import main
from utils.artefacts import plot
from utils.artefacts.results import summarize

RUN = ["--num_epochs", "2", "--batch_size", "4", "--init_lr", "0.05", "--reg_lambda", "0.5"]


def _run(data, models, *extra):
    return main(["--data_dir", str(data), "--models_dir", str(models), *RUN, *extra])


@pytest.fixture
def three_tasks(tmp_path):
    from conftest import write_dataset

    return write_dataset(tmp_path / "Data", num_tasks=3)


def test_metrics_of_a_hand_made_matrix():
    matrix = [[80.0, None, None], [90.0, 95.0, None], [70.0, 85.0, 99.0]]
    metrics = summarize(matrix)
    assert metrics["average_accuracy"] == pytest.approx((70 + 85 + 99) / 3)
    assert metrics["average_forgetting"] == pytest.approx(((80 - 70) + (95 - 85) + 0) / 3)  # the seed's
    assert metrics["average_forgetting_max"] == pytest.approx(((90 - 70) + (95 - 85)) / 2)  # Chaudhry et al.
    assert metrics["backward_transfer"] == pytest.approx(((70 - 80) + (85 - 95)) / 2)
    assert summarize([[80.0, None], [None, 95.0]])["average_accuracy"] is None  # last row incomplete


def test_results_json_and_csv_after_a_run(three_tasks, tmp_path):
    models = tmp_path / "m"
    returned = _run(three_tasks, models)
    results = json.loads((models / "results.json").read_text())
    assert results["complete"] and results["method"] == "mas" and results["seed"] == 0
    assert results["versions"]["torch"] == torch.__version__
    assert results["args"]["reg_lambda"] == 0.5 and results["args"]["num_epochs"] == 2
    matrix = results["accuracy_matrix"]
    assert [[a is None for a in row] for row in matrix] == [[False, True, True], [False, False, True], [False] * 3]
    for j in range(3):
        stored = float((models / f"Task_{j + 1}" / "performance.txt").read_text())
        assert matrix[j][j] == pytest.approx(stored, abs=1e-6)
    assert matrix[2] == [r["now"] for r in returned["forgetting"]]
    assert results["average_accuracy"] == pytest.approx(sum(matrix[2]) / 3)
    assert results["average_forgetting"] == pytest.approx(returned["average_forgetting"], abs=1e-5)
    for entry in results["tasks"]:
        assert [h["epoch"] for h in entry["history"]] == [1, 2]
        assert all(set(h) == {"epoch", "loss", "accuracy", "lr", "seconds"} for h in entry["history"])
        assert entry["wall_seconds"] >= entry["train_seconds"] + entry["importance_seconds"] > 0
    csv = (models / "accuracy_matrix.csv").read_text().splitlines()
    assert csv[0] == "after_task,Task_1,Task_2,Task_3"
    assert csv[1] == f"Task_1,{matrix[0][0]:.4f},,"
    assert csv[3] == "Task_3," + ",".join(f"{a:.4f}" for a in matrix[2])


def test_without_intermediate_evaluations_the_matrix_has_the_diagonal_and_the_last_row(three_tasks, tmp_path):
    models = tmp_path / "m"
    full = _run(three_tasks, tmp_path / "full")
    _run(three_tasks, models, "--no-eval_every_task")
    results = json.loads((models / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    assert [[a is None for a in row] for row in matrix] == [[False, True, True], [True, False, True], [False] * 3]
    assert matrix[2] == full["accuracy_matrix"][2]  # same training, same final row
    assert "only their diagonal" in results["note"]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    with Image.open(path) as img:
        img.verify()
    return struct.unpack(">II", data[16:24])


def test_plot_flag_writes_the_heatmap_and_the_forgetting_chart(tiny_data, tmp_path, capsys):
    models = tmp_path / "m"
    _run(tiny_data, models, "--plot")
    assert _png_size(models / "plots" / "accuracy_matrix.png") == (640, 560)
    assert _png_size(models / "plots" / "forgetting.png") == (960, 540)
    assert f"wrote {models / 'plots' / 'forgetting.png'}" in capsys.readouterr().out


def test_standalone_plot_compares_several_runs(tiny_data, tmp_path):
    _run(tiny_data, tmp_path / "mas")
    _run(tiny_data, tmp_path / "ft", "--method", "finetune")
    written = plot.main([str(tmp_path / "mas"), str(tmp_path / "ft" / "results.json"), "--out", str(tmp_path / "p")])
    # Heatmaps are named after the runs' labels, not numbered.
    assert sorted(p.name for p in written) == [
        "accuracy_matrix_finetune.png",
        "accuracy_matrix_mas_batch_lambda_0.5.png",
        "forgetting.png",
    ]
    assert all(_png_size(p) == ((960, 540) if p.name == "forgetting.png" else (640, 560)) for p in written)
    labels = [plot.run_label(json.loads((tmp_path / r / "results.json").read_text())) for r in ("mas", "ft")]
    assert labels == ["mas batch, lambda=0.5", "finetune"]


def test_standalone_plot_of_a_folder_without_results(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path), "--out", str(tmp_path / "p")])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} holds no results.json with a finished task"


def test_colour_and_axis_ranges_are_fitted_to_the_values():
    # 91-100 % must not share one colour of a fixed 0-100 scale.
    assert plot.fitted_range(np.array([91.2, 99.7, np.nan]), min_span=2.0) == (91.0, 100.0)
    assert plot.fitted_range(np.array([97.0, 97.0]), min_span=2.0) == (96.0, 98.0)
    assert plot.fitted_range(np.array([np.nan]), min_span=1.0) == (0.0, 1.0)


def test_file_names_come_from_labels_and_stay_unique():
    labels = ["mas batch, lambda=0.5", "mas batch, lambda=0.5", "ewc, lambda=1e+06", "///"]
    assert plot.file_stems(labels) == ["mas_batch_lambda_0.5", "mas_batch_lambda_0.5_2", "ewc_lambda_1e+06", "run"]


def test_forgetting_per_task_is_the_diagonal_minus_the_last_row():
    results = {"accuracy_matrix": [[90.0, None, None], [80.0, 95.0, None], [70.5, None, 99.0]]}
    assert plot.forgetting_per_task(results) == [19.5, None]  # task 2 not scored at the end: no value


def test_seven_runs_give_seven_heatmaps_and_one_forgetting_chart(tmp_path):
    matrix = [[99.0, None, None], [97.0, 98.0, None], [96.0, 97.5, 99.5]]
    results = {"dataset": "digits", "task_names": ["T1", "T2", "T3"], "accuracy_matrix": matrix}
    runs = [(f"m{k}, lambda={k}", results) for k in range(7)]
    written = plot.write_plots(runs, tmp_path)
    assert len({p.name for p in written}) == 8 and (tmp_path / "forgetting.png").is_file()
