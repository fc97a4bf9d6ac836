"""Every error ends the process promptly with its one line and exit 1, DataLoader workers or not, in
every cache mode: a worker's error (a corrupt image, a decompression bomb), an error raised in the main
process mid-epoch (the loss diverges), and a refused artefact on --resume. DataLoader workers ignore
SIGTERM (utils/runtime/interrupt.py), so an exit that left their loader open used to wait for them forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data_cache import _png_declaring

from conftest import ROOT, write_dataset

DRIVER = "import runpy; runpy.run_path('tests/error_driver.py', run_name='__main__')"
FLAGS = ["--num_epochs", "2", "--batch_size", "4", "--reg_lambda", "0.5", "--num_workers", "2"]
LIMIT = 30  # seconds: a run of this size takes a few


def _failed_run(data: Path, models: Path, *extra: str, mode: str = "none") -> str:
    """Run main.py in its own process group; it must exit 1 within LIMIT seconds with one error line
    (the last line of stderr, no traceback). Returns that line."""
    argv = ["--data_dir", str(data), "--models_dir", str(models), *FLAGS, *extra]
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, mode, *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    tic = time.monotonic()
    try:
        _, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the process did not exit within {LIMIT} s after its error")
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert time.monotonic() - tic < LIMIT
    return lines[0]


def _finished_tasks(models: Path) -> list[int]:
    return [t["task"] for t in json.loads((models / "results.json").read_text())["tasks"]]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_dataset(tmp_path / "Data", num_tasks=2, n_train=10, n_test=6)


BAD_IMAGES = {
    "truncated": lambda good: good[: len(good) // 2],
    "bomb": lambda good: _png_declaring(12_000, 12_000),
}


@pytest.mark.parametrize("cache", ["off", "ram", "auto"])
@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_a_bad_image_read_by_a_worker_ends_the_process(data, tmp_path, kind, cache):
    """In task 2's test split: task 1 is finished and kept when the image is reached."""
    bad = data / "Task_2" / "test" / "c2_1" / "3.png"
    bad.write_bytes(BAD_IMAGES[kind](bad.read_bytes()))
    line = _failed_run(data, tmp_path / "m", "--cache", cache)
    assert line.startswith(f"error: corrupt or unreadable image {bad}: ")
    assert _finished_tasks(tmp_path / "m") == [1]
    assert (tmp_path / "m" / "Task_1" / "head.pth").is_file()


@pytest.mark.parametrize("cache", ["off", "ram"])
def test_an_error_in_the_main_process_mid_epoch_ends_the_process(data, tmp_path, cache):
    """The loss becomes NaN at the 2nd batch of task 1's second epoch (5 batches an epoch), while the
    workers are serving the next ones."""
    line = _failed_run(data, tmp_path / "m", "--cache", cache, mode="nan:7")
    assert line.startswith("error: Task_1: the training loss became nan at Task_1 epoch 2/2")
    checkpoint = torch.load(tmp_path / "m" / "checkpoint.pth", weights_only=False)
    assert (checkpoint["task"], checkpoint["epoch"]) == (1, 0)


def test_a_refused_head_on_resume_ends_the_process(data, tmp_path):
    models = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "main.py", "--data_dir", str(data), "--models_dir", str(models), *FLAGS, "--cache", "off"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    head = models / "Task_1" / "head.pth"
    torch.save({"weight": torch.zeros(3, 256), "bias": torch.zeros(3)}, head)
    before = {p: p.read_bytes() for p in sorted(models.rglob("*")) if p.is_file()}
    line = _failed_run(data, models, "--cache", "off", "--resume")
    assert line == (
        f"error: {head} holds a head of 3 outputs over 256 features, but Task_1 has 2 classes "
        "and the trunk gives 256 features"
    )
    assert {p: p.read_bytes() for p in sorted(models.rglob("*")) if p.is_file()} == before
