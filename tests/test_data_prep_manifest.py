"""The manifest's one schema (utils/data/manifest.py), shared by the writer (data_prep.py) and the reader
(main.py), and data_prep.py's --help grouped by what each flag is for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import build_parser as main_parser
from conftest import write_dataset
from utils import UserError
from utils.data.manifest import MANIFEST, MAX_IMAGE_SIZE, check_manifest, write_manifest
from utils.data.tasks import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _fields(image_size: int = 8) -> dict:
    tasks = [{"name": "Task_1", "classes": ["a", "b"]}]
    return {"dataset": "x", "tasks": tasks, "image_size": image_size, "channels": 1, "mean": [0.5], "std": [0.2]}


@pytest.mark.parametrize("size", [MAX_IMAGE_SIZE, MAX_IMAGE_SIZE + 1])
def test_the_manifest_and_the_flag_bound_image_size_alike(tmp_path, size):
    """A stored size main.py's --image_size refuses is refused in the manifest too (it becomes that flag)."""
    flag_ok = True
    try:
        main_parser().parse_args(["--image_size", str(size)])
    except SystemExit:
        flag_ok = False
    try:
        check_manifest(_fields(size), tmp_path / MANIFEST)
        manifest_ok = True
    except UserError as err:
        assert str(err) == f"{tmp_path / MANIFEST}: 'image_size' must be between 1 and {MAX_IMAGE_SIZE}, got {size}"
        manifest_ok = False
    assert flag_ok == manifest_ok == (size == MAX_IMAGE_SIZE)


def test_the_writer_adds_the_count_and_signature_and_reads_back(tmp_path):
    signature = {"dataset": "x", "seed": 3}
    written = write_manifest(_fields(), signature, tmp_path)
    on_disk = (tmp_path / MANIFEST).read_text()
    assert on_disk == json.dumps({**_fields(), "num_tasks": 1, "prepared_with": signature}, indent=2) + "\n"
    assert read_manifest(tmp_path) == written == json.loads(on_disk)


def test_the_writer_refuses_what_the_reader_would_refuse_and_writes_nothing(tmp_path):
    bad = {**_fields(), "std": [0.0]}
    with pytest.raises(UserError, match=r"every 'std' must be > 0, got \[0.0\]"):
        write_manifest(bad, {"dataset": "x"}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_with_defaults_still_loads(tmp_path):
    """Manifests carry main.py presets in 'defaults' (digits, mnist, cifar); they stay readable."""
    data = write_dataset(tmp_path / "Data", defaults={"init_lr": 0.02, "num_epochs": 30})
    assert read_manifest(data)["defaults"] == {"init_lr": 0.02, "num_epochs": 30}


def test_help_groups_the_flags_by_what_they_are_for():
    done = subprocess.run(
        [sys.executable, str(REPO / "data_prep.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == ""
    text = done.stdout
    groups = ["general:", "Tiny-ImageNet only:", "digits and MNIST scenarios:", "CIFAR:", "download ("]
    starts = [text.index(f"\n{title}") for title in groups]
    assert starts == sorted(starts)
    members = {
        0: ["--dataset", "--data_dir", "--seed", "--num_tasks", "--force", "--debug"],
        1: ["--classes_per_task", "--url", "--md5", "--archive"],
        2: ["--scenario", "--angles"],
        4: ["--download_dir", "--retries"],
    }
    ends = [*starts[1:], len(text)]
    for group, flags in members.items():
        section = text[starts[group] : ends[group]]
        assert all(f"\n  {flag} " in section for flag in flags), (groups[group], section)
    assert "python3 data_prep.py --dataset digits" in text  # the description shows how to start
