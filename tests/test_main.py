"""End-to-end runs of main.main() on generated task sequences, and its error handling."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, write_dataset
from main import main
from model_class import MlpTrunk, TaskModel
from utils.artefacts.files import load_tensor_pickle

FAST = ["--num_epochs", "2", "--batch_size", "4", "--init_lr", "0.05", "--reg_lambda", "0.5"]
ROW = re.compile(r"^\s*(\d+) \|\s*([-\d.]+) \|\s*([-\d.]+) \|\s*([-\d.]+)$")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _independent_accuracy(data: Path, models: Path, task_no: int) -> float:
    """Score a task from the files alone: PIL + numpy preprocessing, state_dicts from disk."""
    manifest = json.loads((data / "manifest.json").read_text())
    trunk = MlpTrunk(manifest["image_size"] ** 2)
    trunk.load_state_dict(torch.load(models / "shared_model.pth", weights_only=True))
    head_state = torch.load(models / f"Task_{task_no}" / "head.pth", weights_only=True)
    head = torch.nn.Linear(trunk.out_features, head_state["weight"].shape[0])
    head.load_state_dict(head_state)
    model = TaskModel(trunk, head).eval()
    classes = manifest["tasks"][task_no - 1]["classes"]
    correct = total = 0
    for label, name in enumerate(sorted(classes)):
        for path in sorted((data / f"Task_{task_no}" / "test" / name).iterdir()):
            pixels = np.asarray(Image.open(path), dtype=np.float32) / 255.0
            x = (torch.from_numpy(pixels) - manifest["mean"][0]) / manifest["std"][0]
            with torch.no_grad():
                correct += int(model(x[None, None]).argmax(1).item() == label)
            total += 1
    return 100.0 * correct / total


def test_end_to_end_writes_the_output_tree_and_a_table_that_matches_the_files(tiny_data, tmp_path, capsys):
    models = tmp_path / "models"
    results = main(["--data_dir", str(tiny_data), "--models_dir", str(models), *FAST])
    out = capsys.readouterr().out
    assert _files(models) == {
        "data_files.json",
        "reg_params.pickle",
        "shared_model.pth",
        "results.json",
        "accuracy_matrix.csv",
        "Task_1/head.pth",
        "Task_1/performance.txt",
        "Task_1/classes.txt",
        "Task_2/head.pth",
        "Task_2/performance.txt",
        "Task_2/classes.txt",
    }
    assert (models / "Task_2" / "classes.txt").read_text() == "2\nc2_0\nc2_1\n"
    rows = [ROW.match(line).groups() for line in out.splitlines() if ROW.match(line)]
    assert [int(r[0]) for r in rows] == [1, 2]
    for task_no, after, now, forgetting in rows:
        stored = float((models / f"Task_{task_no}" / "performance.txt").read_text())
        independent = _independent_accuracy(tiny_data, models, int(task_no))
        assert float(after) == pytest.approx(stored, abs=0.005)
        assert float(now) == pytest.approx(independent, abs=0.005)
        assert float(forgetting) == pytest.approx(stored - independent, abs=0.01)
    assert results["average_forgetting"] == pytest.approx(
        np.mean([r["after_training"] - r["now"] for r in results["forgetting"]])
    )
    assert re.search(r"^\s*avg \|", out, re.M)
    reg_params = load_tensor_pickle(models / "reg_params.pickle")
    trunk_names = [n for n, _ in MlpTrunk(64).named_parameters()]
    assert sorted(reg_params) == sorted(trunk_names)
    for entry in reg_params.values():
        assert set(entry) == {"omega", "init_val", "prev_omega"}
        assert all(t.device.type == "cpu" for t in entry.values())
        assert (entry["omega"] >= entry["prev_omega"]).all() and (entry["omega"] > entry["prev_omega"]).any()


def test_same_seed_gives_the_same_table_and_another_seed_does_not(tiny_data, tmp_path):
    runs = [
        main(["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / f"m{i}"), "--seed", str(s), *FAST])
        for i, s in enumerate((3, 3, 4))
    ]
    assert runs[0]["forgetting"] == runs[1]["forgetting"]
    w = [torch.load(tmp_path / f"m{i}" / "shared_model.pth", weights_only=True)["net.1.weight"] for i in range(3)]
    assert torch.equal(w[0], w[1])
    assert not torch.equal(w[0], w[2])


def test_command_line_flags_win_over_manifest_defaults(tiny_data, tmp_path):
    results = main(
        ["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / "m"), *FAST, "--num_freeze_layers", "1"]
    )
    assert results["args"]["arch"] == "mlp"  # from the manifest
    assert results["args"]["pretrained"] is False  # from the manifest
    assert results["args"]["num_freeze_layers"] == 1  # from the command line
    assert results["args"]["image_size"] == 8  # the stored size, for mlp


def _error(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    return exc.value.code, err


def test_missing_data_folder_is_one_clear_line(tmp_path, capsys):
    code, err = _error(["--data_dir", str(tmp_path / "nowhere"), "--models_dir", str(tmp_path / "m")], capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: data folder {tmp_path / 'nowhere'} does not exist; run `python3 data_prep.py` first"
    ]
    assert not (tmp_path / "m").exists()


def test_missing_task_folder(tiny_data, tmp_path, capsys):
    import shutil

    shutil.rmtree(tiny_data / "Task_2")
    code, err = _error(["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / "m")], capsys)
    assert code == 1
    assert "task folder" in err and "Task_2 is missing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_train_and_test_with_different_classes_names_the_task(tiny_data, tmp_path, capsys):
    (tiny_data / "Task_2" / "test" / "c2_1").rename(tiny_data / "Task_2" / "test" / "other")
    code, err = _error(["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / "m")], capsys)
    assert code == 1
    assert err.strip() == (
        "error: Task_2: train and test hold different classes (only in train: ['c2_1']; only in test: ['other'])"
    )


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--reg_lambda", "-1", "argument --reg_lambda: must be >= 0.0, got -1"),
        ("--batch_size", "0", "argument --batch_size: must be >= 1, got 0"),
        ("--momentum", "1.5", "argument --momentum: must be in [0, 1), got 1.5"),
    ],
)
def test_out_of_range_flags(tiny_data, flag, value, message, capsys):
    code, err = _error(["--data_dir", str(tiny_data), flag, value], capsys)
    assert code == 2
    assert err.strip() == f"main.py: error: {message} (see --help)"


def test_too_many_frozen_layers(tiny_data, tmp_path, capsys):
    code, err = _error(
        ["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / "m"), "--num_freeze_layers", "3"], capsys
    )
    assert code == 1
    assert err.strip() == "error: --num_freeze_layers must be between 0 and 2 (the trunk has 2 such layers), got 3"


def test_use_gpu_without_cuda(tiny_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = _error(["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / "m"), "--use_gpu"], capsys)
    assert code == 1
    assert "CUDA is not available" in err


def test_command_line_error_has_no_traceback(tmp_path):
    data = write_dataset(tmp_path / "Data")
    (data / "Task_1" / "train" / "c1_0" / "0.png").write_bytes(b"not a png")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--data_dir",
            str(data),
            "--models_dir",
            str(tmp_path / "m"),
            "--num_epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: corrupt or unreadable image ")
    assert "0.png" in proc.stderr


def test_help_shows_every_default():
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in (
        "--use_gpu",
        "--batch_size",
        "--num_freeze_layers",
        "--num_epochs",
        "--init_lr",
        "--reg_lambda",
        "--data_dir",
        "--models_dir",
        "--arch",
        "--momentum",
        "--weight_decay",
        "--pretrained",
        "--image_size",
        "--num_workers",
        "--seed",
    ):
        assert flag in proc.stdout
    assert proc.stdout.count("(default:") >= 15


def test_manifest_defaults_are_checked_like_flags(tiny_data, tmp_path, capsys):
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    manifest["defaults"]["init_lr"] = -0.5
    (tiny_data / "manifest.json").write_text(json.dumps(manifest))
    code, err = _error(["--data_dir", str(tiny_data), "--models_dir", str(tmp_path / "m")], capsys)
    assert code == 1
    assert err.strip() == f"error: {tiny_data / 'manifest.json'}: default init_lr=-0.5: must be > 0, got -0.5"


def test_the_files_on_disk_reproduce_the_table_scored_in_memory(tiny_data, tmp_path):
    """The table is scored from the trunk and heads in memory; the artefacts must give the same numbers."""
    from conftest import make_test_config
    from mas import RunState, TaskModel
    from model_train import evaluate
    from utils.artefacts.results import load_results
    from utils.data.tasks import make_task_data, read_manifest, task_dirs

    models = tmp_path / "models"
    results = main(["--data_dir", str(tiny_data), "--models_dir", str(models), *FAST, "--seed", "5"])
    state = RunState(make_test_config(tiny_data, models), load_results(models))
    state.load_finished(models)  # trunk, heads and reg_params from their files
    manifest = read_manifest(tiny_data)
    tasks = [make_task_data(f, manifest, 1, 8, 4, 0) for f in task_dirs(tiny_data, manifest)]
    from_files = [
        evaluate(TaskModel(state.shared, state.heads[t]), task.test, torch.device("cpu"))
        for t, task in enumerate(tasks, start=1)
    ]
    assert from_files == results["accuracy_matrix"][-1] == [r["now"] for r in results["forgetting"]]
    performance = [float((models / f"Task_{t}" / "performance.txt").read_text()) for t in (1, 2)]
    assert performance == pytest.approx([r["after_training"] for r in results["forgetting"]], abs=1e-6)


def test_help_is_grouped_for_a_user(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.index("Train a sequence of tasks with Memory Aware Synapses") < text.index("data:")
    titles = ["data:", "model:", "optimisation:", "method:", "protocol:", "run management:", "devices:"]
    positions = [text.index(f"\n{title}\n") for title in titles]
    assert positions == sorted(positions)
    flags = {"data:": "--cache", "model:": "--arch", "optimisation:": "--init_lr", "method:": "--reg_lambda"}
    flags |= {"protocol:": "--scenario", "run management:": "--resume", "devices:": "--use_gpu"}
    for title, next_title in zip(titles, [*titles[1:], "--method mas"]):
        section = text[text.index(f"\n{title}\n") : text.index(f"\n{next_title}")]
        assert flags[title] in section, title
