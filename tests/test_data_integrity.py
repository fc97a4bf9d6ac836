"""The data a run reads is the data in its task folders, and only that: links in a split are refused
(not followed), class names must fit the artefacts that record them, and --resume refuses images that
changed, were added or were removed since the run started (utils/data_files.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_same_run, write_dataset
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
