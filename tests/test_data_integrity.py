"""The data a run reads is the data in its task folders, and only that: links in a split are refused
(not followed), class names must fit the artefacts that record them, and --resume refuses images that
changed, were added or were removed since the run started (utils/data/fingerprint.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_same_run, interrupted_after_checkpoint, write_dataset
from main import main

FLAGS = ["--num_epochs", "1", "--batch_size", "4", "--reg_lambda", "0.5"]


def _argv(data: Path, models: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data), "--models_dir", str(models), *FLAGS, *extra]


LINKS = {  # what is linked -> (the link, its target)
    "a folder inside a class folder": ("Task_1/train/c1_0/loop", ".."),
    "an image": ("Task_2/test/c2_0/extra.png", "../c2_1/0.png"),
    "a file that is not an image": ("Task_2/train/c2_1/notes.txt", "0.png"),
    "a class folder": ("Task_2/test/c2_0", "../train/c2_0"),
    "a split folder": ("Task_1/test", "train"),
    "a task folder": ("Task_2", "Task_1"),
}


@pytest.mark.parametrize("cache", ["off", "ram"])
@pytest.mark.parametrize("what", list(LINKS))
def test_a_link_in_a_split_is_refused_not_followed(tmp_path, error_line, what, cache):
    data = write_dataset(tmp_path / "Data")
    link, target = LINKS[what]
    if (data / link).is_dir():
        shutil.rmtree(data / link)
    (data / link).symlink_to(target)
    line = error_line(lambda: main(_argv(data, tmp_path / "m", "--cache", cache)))
    assert line == (
        f"error: {data / link} is a symbolic link; the task folders are read without following links: "
        "put the file or folder itself there"
    )
    assert not (tmp_path / "m").exists()


def test_a_linked_data_folder_is_still_read(tmp_path):
    """Only links inside the task folders are refused: the data folder itself may be one."""
    data = write_dataset(tmp_path / "Data")
    (tmp_path / "linked").symlink_to(data)
    main(_argv(tmp_path / "linked", tmp_path / "m"))
    main(_argv(data, tmp_path / "ref"))
    assert_same_run(tmp_path / "m", tmp_path / "ref")


BAD_NAMES = ["0\nzero", "tab\there", "bell\x07", "del\x7f", "line\u2028sep", "back\\slash", os.fsdecode(b"\xff")]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_class_name_that_the_artefacts_cannot_hold_is_refused(tmp_path, error_line, name):
    data = write_dataset(tmp_path / "Data")
    for split in ("train", "test"):
        (data / "Task_2" / split / name).mkdir()
        Image.new("L", (8, 8)).save(data / "Task_2" / split / name / "0.png")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tasks"][1]["classes"].append(name)
    (data / "manifest.json").write_text(json.dumps(manifest))
    line = error_line(lambda: main(_argv(data, tmp_path / "m")))
    assert line == (
        f"error: Task_2: class folder {name!r} in {data / 'Task_2' / 'train'} cannot name a class: a class name is "
        "one line of classes.txt, without path separators, line breaks, control characters or bytes that are not "
        "UTF-8; rename the folder"
    )
    assert not (tmp_path / "m").exists()


def test_unusual_but_valid_class_names_are_kept(tmp_path):
    """Spaces, dots, non-ASCII letters: classes.txt holds one line per class, as named."""
    data = write_dataset(tmp_path / "Data", num_tasks=1, classes_per_task=3)
    names = ["a b", ".hidden", "ünï çødé"]
    for split in ("train", "test"):
        for old, new in zip(["c1_0", "c1_1", "c1_2"], names):
            (data / "Task_1" / split / old).rename(data / "Task_1" / split / new)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tasks"][0]["classes"] = names
    (data / "manifest.json").write_text(json.dumps(manifest))
    main(_argv(data, tmp_path / "m"))
    text = (tmp_path / "m" / "Task_1" / "classes.txt").read_text(encoding="utf-8")
    assert text == "3\n" + "".join(f"{n}\n" for n in sorted(names))


def _snapshot(models: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(models.rglob("*")) if p.is_file()}


def _refusal(data: Path, models: Path, rel: str, how: str, count: int = 1) -> str:
    others = f" ({count} files differ)" if count > 1 else ""
    return (
        f"error: --resume: {data / rel} {how} since the run in {models} started{others}; a run continues only on "
        "the images it started with: restore them, or start again with --overwrite"
    )


def _other_image(path: Path) -> None:
    """A valid image of the same size in place of ``path``, with other pixels."""
    Image.new("L", (8, 8), color=7).save(path)


DATA_CHANGES = {  # name -> (change of the data folder, the first differing file, how, files that differ)
    "a byte of an image of the finished task 1": (
        lambda d: (d / "Task_1/train/c1_0/2.png").write_bytes(
            (b := (d / "Task_1/train/c1_0/2.png").read_bytes())[:-20] + bytes([b[-20] ^ 1]) + b[-19:]
        ),
        "Task_1/train/c1_0/2.png",
        "changed",
        1,
    ),
    "an image replaced by another": (
        lambda d: _other_image(d / "Task_2/test/c2_1/1.png"),
        "Task_2/test/c2_1/1.png",
        "changed",
        1,
    ),
    "an image added": (
        lambda d: _other_image(d / "Task_2/test/c2_0/new.png"),
        "Task_2/test/c2_0/new.png",
        "was added",
        1,
    ),
    "an image removed": (lambda d: (d / "Task_1/test/c1_1/0.png").unlink(), "Task_1/test/c1_1/0.png", "was removed", 1),
    "an image renamed": (
        lambda d: (d / "Task_2/train/c2_1/3.png").rename(d / "Task_2/train/c2_1/9.png"),
        "Task_2/train/c2_1/3.png",
        "was removed",
        2,
    ),
}


@pytest.mark.parametrize("change", list(DATA_CHANGES))
def test_resume_refuses_images_that_differ_from_the_runs(tmp_path, error_line, change):
    """Every task finished: --resume would score them on other images."""
    data, models = write_dataset(tmp_path / "Data"), tmp_path / "m"
    main(_argv(data, models))
    before = _snapshot(models)
    damage, rel, how, count = DATA_CHANGES[change]
    damage(data)
    line = error_line(lambda: main(_argv(data, models, "--resume")))
    assert line == _refusal(data, models, rel, how, count)
    assert _snapshot(models) == before


@pytest.mark.parametrize("cache", ["off", "ram", "auto"])
def test_an_interrupted_run_resumes_only_on_the_images_it_started_with(tmp_path, monkeypatch, error_line, cache):
    """Interrupted in task 1 (only its checkpoint is saved); an image of task 2 changes: refused, in every
    cache mode. Put back, the resumed run equals one that was never interrupted, bit for bit."""
    data, models = write_dataset(tmp_path / "Data"), tmp_path / "m"
    argv = _argv(data, models, "--num_epochs", "2", "--cache", cache)
    main([*argv[:3], str(tmp_path / "reference"), *argv[4:]])
    with interrupted_after_checkpoint(monkeypatch, task_no=1, epoch=0), pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 130
    before = _snapshot(models)
    image = data / "Task_2" / "test" / "c2_1" / "1.png"
    original = image.read_bytes()
    _other_image(image)
    line = error_line(lambda: main([*argv, "--resume"]))
    assert line == _refusal(data, models, "Task_2/test/c2_1/1.png", "changed")
    assert _snapshot(models) == before
    image.write_bytes(original)
    main([*argv, "--resume"])
    assert_same_run(models, tmp_path / "reference")


def test_a_run_without_a_record_of_its_images_still_resumes(tmp_path, capsys):
    """A run begun before the record existed: not checked, one note, and the record is written then."""
    data, models = write_dataset(tmp_path / "Data"), tmp_path / "m"
    main(_argv(data, models))
    record = (models / "data_files.json").read_text()
    (models / "data_files.json").unlink()
    capsys.readouterr()
    main(_argv(data, models, "--resume"))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {models} holds no record of its images (the run began before they were recorded): they are not "
        f"checked; recorded now in {models / 'data_files.json'}"
    ]
    assert (models / "data_files.json").read_text() == record


def test_the_record_names_every_image_with_its_size_and_hash(tmp_path):
    import hashlib

    data, models = write_dataset(tmp_path / "Data"), tmp_path / "m"
    main(_argv(data, models))
    record = json.loads((models / "data_files.json").read_text())
    images = sorted(p for p in data.rglob("*.png"))
    assert record == {
        "format": 1,
        "files": {
            p.relative_to(data).as_posix(): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
            for p in images
        },
    }


def test_a_damaged_record_is_one_line(tmp_path, error_line):
    data, models = write_dataset(tmp_path / "Data"), tmp_path / "m"
    main(_argv(data, models))
    (models / "data_files.json").write_text('{"format": 1, "files": {"Task_1/train/c1_0/0.png": [1]}}')
    line = error_line(lambda: main(_argv(data, models, "--resume")))
    assert line == f"error: {models / 'data_files.json'} is not a record of a run's images written by this program"
