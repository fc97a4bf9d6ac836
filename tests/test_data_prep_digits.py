"""data_prep.py --dataset digits: exact content, idempotence, refusal to overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data_prep import main as data_prep
from presets import presets_for


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "Data"
    data_prep(["--dataset", "digits", "--data_dir", str(out)])
    return out


def test_digits_layout_and_manifest(digits_dir):
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert [t["classes"] for t in manifest["tasks"]] == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"], ["8", "9"]]
    assert manifest["num_tasks"] == 5
    # Data only: main.py's presets for digits (the MLP, ...) live on the training side, in presets.py.
    assert "default_arch" not in manifest and "defaults" not in manifest
    assert presets_for(manifest)["arch"] == "mlp"
    assert (manifest["image_size"], manifest["channels"]) == (8, 1)
    n_train = sum(t["num_train"] for t in manifest["tasks"])
    n_test = sum(t["num_test"] for t in manifest["tasks"])
    assert (n_train, n_test) == (1257, 540)  # 1797 images, 70/30
    labels = load_digits().target
    for task in manifest["tasks"]:
        for split in ("train", "test"):
            folders = sorted(p.name for p in (digits_dir / task["name"] / split).iterdir())
            assert folders == task["classes"]
            files = [f for c in folders for f in (digits_dir / task["name"] / split / c).iterdir()]
            assert len(files) == task[f"num_{split}"]
        # stratified: each digit keeps about 70 % of its images in train
        for digit in task["classes"]:
            train = len(list((digits_dir / task["name"] / "train" / digit).iterdir()))
            assert abs(train / np.sum(labels == int(digit)) - 0.7) < 0.01


def test_digits_pixels_are_the_scikit_learn_images(digits_dir):
    digits = load_digits()
    files = sorted((digits_dir / "Task_3" / "test" / "5").iterdir())
    for path in files[:5]:
        index = int(path.stem)
        assert digits.target[index] == 5
        expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
        with Image.open(path) as img:
            assert img.mode == "L" and img.size == (8, 8)
            assert np.array_equal(np.asarray(img), expected)


def test_train_and_test_are_disjoint(digits_dir):
    for task in ("Task_1", "Task_5"):
        train = {p.name for p in (digits_dir / task / "train").rglob("*.png")}
        test = {p.name for p in (digits_dir / task / "test").rglob("*.png")}
        assert train and test and not train & test


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path, capsys):
    out = tmp_path / "Data"
    data_prep(["--dataset", "digits", "--data_dir", str(out)])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    data_prep(["--dataset", "digits", "--data_dir", str(out)])
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(SystemExit) as exc:
        data_prep(["--dataset", "digits", "--data_dir", str(out), "--seed", "1"])
    assert exc.value.code == 1
    assert "pass --force" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    data_prep(["--dataset", "digits", "--data_dir", str(out), "--seed", "1", "--force"])
    assert json.loads((out / "manifest.json").read_text())["prepared_with"]["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folders left


def test_a_write_error_is_one_line_and_leaves_no_data(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import data_prep
    from mas_data import image_tasks

    def full_disk(pixels, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(image_tasks, "save_png", full_disk)
    out = tmp_path / "Data"
    with pytest.raises(SystemExit) as exc:
        data_prep.main(["--dataset", "digits", "--data_dir", str(out)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not write ") and err.endswith(f": No space left on device; {out} is unchanged")
    assert len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_split_gets_the_usual_folder_mode(digits_dir):
    from utils.artefacts.files import shared_mode

    assert digits_dir.stat().st_mode & 0o777 == shared_mode(directory=True)
    assert (digits_dir / "manifest.json").stat().st_mode & 0o777 == shared_mode()
