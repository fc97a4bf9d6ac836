"""Reliability, round two: --overwrite never deletes what main.py did not write, damaged or malicious
files and flags give one line (never a traceback), non-finite values are refused where they are loaded."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from conftest import interrupted_after_checkpoint, write_dataset
from main import main
from utils.artefacts.files import load_tensor_pickle, save_pickle

FAST = ["--num_epochs", "2", "--batch_size", "4", "--init_lr", "0.05", "--reg_lambda", "0.5"]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` and the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _fails(capsys, data: Path, models: Path, *extra: str, code: int = 1) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["--data_dir", str(data), "--models_dir", str(models), *FAST, *extra])
    assert exc.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _run(data: Path, models: Path, *extra: str) -> dict:
    return main(["--data_dir", str(data), "--models_dir", str(models), *FAST, *extra])


# --------------------------------------------------------------------------- --overwrite and the data folder


@pytest.mark.parametrize(
    "where,word",
    [
        (lambda d: d, "is"),
        (lambda d: d / "Task_1", "lies inside"),
        (lambda d: d / "new" / "m", "lies inside"),
        (lambda d: d.parent, "contains"),
    ],
)
@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_a_models_dir_that_overlaps_the_data_is_refused_and_nothing_is_touched(tmp_path, capsys, where, word, flag):
    data = write_dataset(tmp_path / "Data")
    before = _tree(tmp_path)
    err = _fails(capsys, data, where(data), *([flag] if flag else []))
    assert f"{word} the data folder" in err
    assert _tree(tmp_path) == before


def test_the_reported_data_loss_case_is_refused(tmp_path, capsys):
    """data_prep.py --dataset digits && main.py --models_dir Data --overwrite deleted every image."""
    from data_prep import main as data_prep

    data_prep(["--dataset", "digits", "--data_dir", str(tmp_path / "Data")])
    capsys.readouterr()
    before = _tree(tmp_path / "Data")
    with pytest.raises(SystemExit):
        main(["--data_dir", str(tmp_path / "Data"), "--models_dir", str(tmp_path / "Data"), "--overwrite"])
    assert "is the data folder" in capsys.readouterr().err
    assert _tree(tmp_path / "Data") == before


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: (d / "notes.txt").write_text("mine"), "holds no manifest.json: it is not a split"),
        (lambda d: (d / "photos").mkdir(), "holds no manifest.json: it is not a split"),
        (lambda d: write_dataset(d), "manifest.json was not written by data_prep.py, so"),  # a hand-made split
        (lambda d: _split_with(d, "notes.txt"), "holds notes.txt, which data_prep.py does not write there"),
        (lambda d: _split_with(d, "models/shared_model.pth"), "holds models, which data_prep.py does not write"),
        (lambda d: _split_with(d, "downloads/tiny-imagenet-200.zip"), "holds downloads, which data_prep.py"),
    ],
)
@pytest.mark.parametrize("force", [True, False])
def test_data_prep_force_replaces_only_a_split_of_data_prep(tmp_path, capsys, make, message, force):
    """The class of the --overwrite fault, in data_prep.py: --force removed any --data_dir."""
    from data_prep import main as data_prep

    data = tmp_path / "Data"
    data.mkdir()
    make(data)
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exc:
        data_prep(["--dataset", "digits", "--data_dir", str(data), *(["--force"] if force else [])])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert _tree(tmp_path) == before


def _split_with(data: Path, extra: str) -> None:
    """A split of data_prep.py (another seed) with a file of the user's added at ``extra``."""
    from data_prep import main as data_prep

    data.rmdir()
    data_prep(["--dataset", "digits", "--data_dir", str(data), "--seed", "7"])
    (data / extra).parent.mkdir(parents=True, exist_ok=True)
    (data / extra).write_text("mine")


def test_data_prep_force_replaces_a_split_and_an_empty_folder(tmp_path, capsys):
    from data_prep import main as data_prep

    (tmp_path / "empty").mkdir()
    data_prep(["--dataset", "digits", "--data_dir", str(tmp_path / "empty"), "--force"])
    data_prep(["--dataset", "digits", "--data_dir", str(tmp_path / "split"), "--seed", "7"])
    data_prep(["--dataset", "digits", "--data_dir", str(tmp_path / "split"), "--force"])
    assert _tree(tmp_path / "empty") == _tree(tmp_path / "split")


def test_overwrite_refuses_task_folders_that_are_not_a_run(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data")
    other = write_dataset(tmp_path / "other")  # task folders of images, no results.json, no checkpoint
    before = _tree(other)
    err = _fails(capsys, data, other, "--overwrite")
    assert "is not a run of this program" in err and "Task_1" in err
    assert _tree(other) == before


@pytest.mark.parametrize(
    "extra",
    ["Task_1/notes.txt", "Task_2/image.png", "plots/mine.png", "Task_1/sub/x.txt", "plots/accuracy_matrix_x.png"],
)
def test_overwrite_of_a_run_with_foreign_files_deletes_nothing(tmp_path, capsys, extra):
    data = write_dataset(tmp_path / "Data")
    models = tmp_path / "m"
    _run(data, models, "--plot")
    (models / extra).parent.mkdir(parents=True, exist_ok=True)
    (models / extra).write_text("mine")
    before = _tree(models)
    err = _fails(capsys, data, models, "--overwrite")
    assert f"would delete {(models / extra).parent if extra.count('/') > 1 else models / extra}" in err
    assert _tree(models) == before


def test_overwrite_of_a_run_removes_its_artefacts_and_keeps_other_files(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data")
    models = tmp_path / "m"
    _run(data, models, "--plot")
    (models / "notes.txt").write_text("mine")
    (models / ".gitkeep").write_text("")
    (models / "Task_1" / ".head.pth.x1.tmp").write_text("left by a crash")
    first = _tree(models)
    _run(data, models, "--overwrite", "--seed", "3")
    after = _tree(models)
    assert after["notes.txt"] == first["notes.txt"] and ".gitkeep" in after
    assert "plots/forgetting.png" not in after  # the earlier run's plots went with it
    assert after["shared_model.pth"] != first["shared_model.pth"]


@pytest.mark.parametrize(
    "results", [{"format": 2, "args": {}}, {"some": "other tool"}, [1, 2], {"format": 1, "args": {}, "tasks": "x"}]
)
def test_a_results_file_of_another_program_is_not_overwritten(tmp_path, capsys, results):
    data = write_dataset(tmp_path / "Data")
    models = tmp_path / "m"
    (models / "Task_1").mkdir(parents=True)
    (models / "Task_1" / "head.pth").write_text("x")
    (models / "results.json").write_text(json.dumps(results))
    before = _tree(models)
    err = _fails(capsys, data, models, "--overwrite")
    assert str(models / "results.json") in err
    assert _tree(models) == before


# --------------------------------------------------------------------------- non-finite and damaged artefacts


def _unfinish_task_2(models: Path) -> None:
    """Make the run in ``models`` end after task 1, so that --resume loads its files and trains task 2."""
    results = json.loads((models / "results.json").read_text())
    results.update(tasks=results["tasks"][:1], accuracy_matrix=results["accuracy_matrix"][:1], complete=False)
    (models / "results.json").write_text(json.dumps(results))


@pytest.mark.parametrize("key", ["omega", "init_val", "prev_omega"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_reg_params_are_refused_at_load_naming_file_and_parameter(tmp_path, capsys, key, value):
    data = write_dataset(tmp_path / "Data")
    models = tmp_path / "m"
    _run(data, models)
    _unfinish_task_2(models)
    reg_params = load_tensor_pickle(models / "reg_params.pickle")
    reg_params["net.3.bias"][key][5] = value
    save_pickle(reg_params, models / "reg_params.pickle")
    err = _fails(capsys, data, models, "--resume")
    assert err == f"error: {models / 'reg_params.pickle'}: parameter 'net.3.bias' holds NaN or infinite values"


def _checkpoint_run(tmp_path, monkeypatch, capsys) -> tuple[Path, Path]:
    """A run stopped after the first epoch of task 1: its data and models folder."""
    data = write_dataset(tmp_path / "Data")
    with interrupted_after_checkpoint(monkeypatch), pytest.raises(SystemExit):
        _run(data, tmp_path / "m")
    capsys.readouterr()
    return data, tmp_path / "m"


def _damage_checkpoint(models: Path, damage) -> None:
    checkpoint = torch.load(models / "checkpoint.pth", weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, models / "checkpoint.pth")


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda c: c["model"]["shared.net.1.weight"].fill_(math.nan),
            "the model: parameter 'shared.net.1.weight' holds NaN",
        ),
        (
            lambda c: c["reg_params"]["net.3.weight"]["omega"].fill_(math.inf),
            "reg_params: parameter 'net.3.weight' holds NaN",
        ),
        (
            lambda c: c["optimizer"]["state"][0]["momentum_buffer"].fill_(math.nan),
            "optimizer: momentum_buffer of parameter 0 has the wrong shape or non-finite",
        ),
        (
            lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
            "optimizer: momentum_buffer of parameter 0 has the wrong shape",
        ),
        (lambda c: c["optimizer"]["state"].update({99: {}}), "optimizer: state for parameter 99"),
        (
            lambda c: c["optimizer"]["state"][1].update(evil=torch.zeros(1)),
            "optimizer: parameter 1 has an unknown state 'evil'",
        ),
        (lambda c: c["reg_params"].pop("net.1.bias"), "reg_params has no entry for parameter 'net.1.bias'"),
        (lambda c: c["reg_params"]["net.1.bias"].pop("init_val"), "reg_params['net.1.bias'] has no 'init_val' entry"),
        (lambda c: c["model"].pop("head.bias"), "the model has no entry for parameter 'head.bias'"),
        (lambda c: c.update(epoch="3"), "'epoch' must be an integer"),
        (lambda c: c.update(task=-1), "'task' and 'epoch' are out of range"),
        (
            lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
            "'rng' is not a valid random number generator state",
        ),
        (lambda c: c["rng"].update(python=(3, (1, 2), None)), "'rng' is not a valid random number generator state"),
        (lambda c: c["rng"].pop("numpy"), "'rng' is not a valid random number generator state"),
        (lambda c: c.update(history={"a": 1}), "'history' must be a list"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys, monkeypatch, damage, message):
    data, models = _checkpoint_run(tmp_path, monkeypatch, capsys)
    _damage_checkpoint(models, damage)
    err = _fails(capsys, data, models, "--resume")
    assert err.startswith(f"error: {models / 'checkpoint.pth'}") and message in err, err


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.update(tasks=[{"task": 2, "test_accuracy": 50.0}]),
        lambda r: r.update(tasks=[{"task": 1, "test_accuracy": "high"}]),
        lambda r: r.update(tasks=[{"task": 1, "test_accuracy": 150.0}]),
        lambda r: r.update(accuracy_matrix=[[1.0]]),
        lambda r: r.update(accuracy_matrix=[["a", None]]),
        lambda r: r.pop("task_names"),
        lambda r: r.update(args=[]),
    ],
)
def test_a_damaged_results_file_is_one_line_naming_it(tmp_path, capsys, damage):
    data = write_dataset(tmp_path / "Data")
    models = tmp_path / "m"
    _run(data, models)
    _unfinish_task_2(models)
    results = json.loads((models / "results.json").read_text())
    damage(results)
    (models / "results.json").write_text(json.dumps(results))
    err = _fails(capsys, data, models, "--resume")
    assert err.startswith(f"error: {models / 'results.json'}"), err


def test_a_pickle_with_a_huge_shape_is_refused(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data")
    models = tmp_path / "m"
    _run(data, models)
    _unfinish_task_2(models)
    reg_params = load_tensor_pickle(models / "reg_params.pickle")
    reg_params["net.1.weight"]["omega"] = torch.zeros(1, 1).expand(256, 10**6)
    (models / "reg_params.pickle").write_bytes(pickle.dumps(reg_params))
    err = _fails(capsys, data, models, "--resume")
    assert "net.1.weight" in err and "shape" in err


# --------------------------------------------------------------------------- the manifest


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.pop("tasks"), "has no 'tasks' entry"),
        (lambda m: m.update(tasks=[]), "'tasks' lists no task"),
        (lambda m: m.update(tasks="Task_1"), "'tasks' must be a list"),
        (lambda m: m["tasks"][0].update(name="Task_7"), "'name' must be 'Task_1'"),
        (lambda m: m["tasks"][1].update(classes=["a", "a"]), "'classes' must list each class"),
        (lambda m: m["tasks"][1].update(classes=[1, 2]), "'classes'[0] must be a string"),
        (lambda m: m.update(image_size="8"), "'image_size' must be an integer"),
        (lambda m: m.update(image_size=0), "'image_size' must be between 1 and"),
        (lambda m: m.update(image_size=10**9), "'image_size' must be between 1 and"),
        (lambda m: m.update(channels=2), "'channels' must be 1 or 3"),
        (lambda m: m.update(mean=[0.5, 0.5]), "'mean' has 2 values for 1 channels"),
        (lambda m: m.update(std=[0.0]), "every 'std' must be > 0"),
        (lambda m: m.update(std=["x"]), "'std'[0] must be a finite number"),
        (lambda m: m.update(augment="yes"), "'augment' must be a boolean"),
        (lambda m: m.update(defaults=[1]), "'defaults' must be an object"),
        (lambda m: m.update(num_tasks=5), "'num_tasks' is 5 but 'tasks' lists 2"),
        (lambda m: m["defaults"].update(batch_size=0), "default batch_size=0"),
        (lambda m: m["defaults"].update(models_dir="x"), "unknown default 'models_dir'"),
        (lambda m: m["defaults"].update(pretrained="no"), "default pretrained='no': must be true or false"),
        (lambda m: m["defaults"].update(init_lr="nan"), "default init_lr='nan'"),
        (lambda m: m.update(default_arch="resnet"), "default arch='resnet'"),
    ],
)
def test_a_malformed_manifest_is_one_line(tmp_path, capsys, change, message):
    data = write_dataset(tmp_path / "Data")
    manifest = json.loads((data / "manifest.json").read_text())
    change(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))
    err = _fails(capsys, data, tmp_path / "m")
    assert message in err and str(data / "manifest.json") in err, err
    assert not (tmp_path / "m").exists()


def test_a_manifest_that_is_not_json_or_not_an_object(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data")
    for text in ("{", "[]", "null", '"x"'):
        (data / "manifest.json").write_text(text)
        assert str(data / "manifest.json") in _fails(capsys, data, tmp_path / "m")


# --------------------------------------------------------------------------- flags at their boundaries

NUMERIC_FLAGS = {
    "--batch_size": ("1", "2147483647"),
    "--num_freeze_layers": ("0", "2"),
    "--num_epochs": ("1",),
    "--init_lr": ("1e-300", "0.5", "1e30"),
    "--reg_lambda": ("0", "1e30"),
    "--momentum": ("0", "0.999"),
    "--weight_decay": ("0", "1e30"),
    "--image_size": ("1", "8", "63"),
    "--num_workers": ("0", "1"),
    "--seed": ("0", "4294967295"),
    "--si_xi": ("1e-300", "1e30"),
}
BAD_VALUES = (
    "-1",
    "1e31",
    "2147483648",
    "4294967296",
    "9223372036854775808",
    "1e999",
    "nan",
    "inf",
    "-inf",
    "",
    "x",
    "1.5",
)


@pytest.mark.parametrize("flag", sorted(NUMERIC_FLAGS))
def test_every_numeric_flag_at_its_boundaries_is_one_line_or_a_run(tmp_path, capsys, flag):
    data = write_dataset(tmp_path / "Data", n_train=2, n_test=2)
    for i, value in enumerate((*NUMERIC_FLAGS[flag], *BAD_VALUES)):
        extra = ["--method", "si"] if flag == "--si_xi" else []
        argv = ["--data_dir", str(data), "--models_dir", str(tmp_path / f"m{i}"), "--num_epochs", "1", *extra]
        try:
            main([*argv, f"{flag}={value}"])
            outcome = 0
        except SystemExit as exc:
            outcome = exc.code
        err = capsys.readouterr().err.strip()
        assert outcome in (0, 1, 2), (flag, value)
        assert outcome == 0 or (len(err.splitlines()) == 1 and err.split(": ")[0] in ("error", "main.py")), (
            flag,
            value,
            err,
        )
        assert "Traceback" not in err
        if value in NUMERIC_FLAGS[flag] and outcome:
            assert "loss became" in err or "became NaN or infinite" in err, (flag, value, err)  # may only diverge


@pytest.mark.parametrize("flag", ["--init_lr", "--reg_lambda", "--weight_decay", "--momentum", "--si_xi"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
def test_float_flags_refuse_inf_and_nan(tiny_data, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["--data_dir", str(tiny_data), f"{flag}={value}"])
    assert exc.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"main.py: error: argument {flag}: must be a finite number, got {value} (see --help)"
    )


def test_image_size_below_alexnets_smallest_input_is_one_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data", channels=3)
    err = _fails(capsys, data, tmp_path / "m", "--arch", "alexnet", "--no-pretrained", "--image_size", "32")
    assert err == "error: --image_size 32 is too small for --arch alexnet: it takes at least 63 pixels"
    assert not (tmp_path / "m").exists()


def test_alexnets_smallest_input_is_63_pixels():
    from model_class import AlexNetTrunk

    trunk = AlexNetTrunk().eval()
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 63, 63)).shape == (1, 4096)
        with pytest.raises(RuntimeError):
            trunk(torch.zeros(1, 3, 62, 62))


# --------------------------------------------------------------------------- messages


def test_nan_loss_before_any_checkpoint_does_not_claim_one(tiny_data, tmp_path, capsys, monkeypatch):
    import model_train

    class NanAtOnce(torch.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            return super().forward(logits, labels) * float("nan")

    monkeypatch.setattr(model_train.nn, "CrossEntropyLoss", NanAtOnce)
    err = _fails(capsys, tiny_data, tmp_path / "m")
    assert "no epoch of this task finished, so no checkpoint of it exists" in err
    assert "checkpoint is kept" not in err
    assert not (tmp_path / "m" / "checkpoint.pth").exists()


def test_offline_pretrained_run_prints_one_line_and_creates_nothing(tmp_path, closed_port_url, capsys, monkeypatch):
    import utils.artefacts.model_files

    data = write_dataset(tmp_path / "Data", channels=3)
    monkeypatch.setattr(
        utils.artefacts.model_files, "ALEXNET_WEIGHTS_URL", f"{closed_port_url}/alexnet-owt-7be5be79.pth"
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(SystemExit) as exc:
        main(["--data_dir", str(data), "--models_dir", str(tmp_path / "m"), "--arch", "alexnet", "--pretrained"])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "Downloading" not in captured.out and "Downloading" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "--no-pretrained" in captured.err
    assert not (tmp_path / "m").exists()


def test_average_forgetting_of_the_previous_tasks(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data", num_tasks=3)
    results = _run(data, tmp_path / "m", "--method", "finetune", "--init_lr", "0.3")
    out = capsys.readouterr().out
    matrix = results["accuracy_matrix"]
    previous = [matrix[j][j] - matrix[2][j] for j in range(2)]
    assert results["average_forgetting_previous"] == pytest.approx(sum(previous) / 2)
    assert results["average_forgetting"] == pytest.approx(sum(previous) / 3)
    stored = json.loads((tmp_path / "m" / "results.json").read_text())
    assert stored["average_forgetting_previous"] == pytest.approx(sum(previous) / 2)
    assert f"average forgetting of tasks 1-2 (the avg line counts the last task too): {sum(previous) / 2:.2f} pp" in out
