"""Ctrl-C and SIGTERM sent to the whole process group, DataLoader workers included, at chosen and at
random moments: exit 130, one message with the resume command, and a resume that ends exactly as an
uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_run, write_dataset
from main import main

FLAGS = [
    "--verbose",
    "--num_epochs",
    "3",
    "--batch_size",
    "4",
    "--init_lr",
    "0.05",
    "--reg_lambda",
    "0.5",
    "--seed",
    "11",
]
WORKERS = ["--num_workers", "2"]
DRIVER = "import runpy; runpy.run_path('tests/interrupt_driver.py', run_name='__main__')"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("intr") / "Data", num_tasks=2, n_train=24, n_test=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("ref") / "models"
    main(["--data_dir", str(data), "--models_dir", str(models), *FLAGS, *WORKERS])
    return models


def _argv(data: Path, models: Path) -> list[str]:
    return ["--data_dir", str(data), "--models_dir", str(models), *FLAGS, *WORKERS]


def _interrupted(proc: subprocess.Popen, models: Path) -> list[str]:
    """The interrupted run's stderr: exit 130, no traceback, one message; returns the command it gives."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "exited unexpectedly" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-2].startswith("interrupted"), err
    assert sum(line.startswith("interrupted") for line in lines) == 1, err
    command = lines[-1].split()
    assert command[:2] == ["python3", "main.py"]
    if lines[-2].startswith("interrupted before anything was saved"):
        assert "--resume" not in command and not (models / "results.json").exists()
    else:
        assert command[-1] == "--resume"
    return command[2:]


def _finish_and_compare(argv: list[str], models: Path, reference: Path) -> None:
    main(argv)  # the resume (or the fresh start the message asked for), in this process
    assert_same_run(models, reference)
    assert not (models / "checkpoint.pth").exists() and not list(models.rglob(".*.tmp"))


@pytest.mark.parametrize(
    "moment,signame",
    [
        ("worker:1", "SIGINT"),  # the very first loader's workers are starting
        ("worker:9", "SIGINT"),  # workers of a later epoch
        ("step:20", "SIGINT"),  # mid-epoch, task 1
        ("step:50", "SIGTERM"),  # mid-epoch, task 2
        ("importance:1", "SIGINT"),  # the importance pass of task 1
        ("evaluate:2", "SIGINT"),  # the test of task 2 (after task 1's test)
        ("evaluate:3", "SIGTERM"),  # scoring task 1 with task 2's trunk (the accuracy matrix)
        ("save:1", "SIGINT"),  # the first checkpoint is being written
        ("save:12", "SIGINT"),  # a later write (a task's artefacts)
    ],
)
def test_signal_to_the_process_group_at_a_chosen_moment(data, reference, tmp_path, moment, signame):
    models = tmp_path / "models"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, moment, signame, *_argv(data, models)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    command = _interrupted(proc, models)
    _finish_and_compare(command, models, reference)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_ctrl_c_at_a_random_moment(data, reference, tmp_path, seed):
    models, log = tmp_path / "models", tmp_path / "stdout.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "main.py", *_argv(data, models)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    while "== Task_1" not in log.read_text():  # imports done, the run has started
        assert proc.poll() is None, "the run ended before it started a task"
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    assert proc.poll() is None, "the run ended before the signal was sent: make the run longer"
    os.killpg(proc.pid, signal.SIGINT)
    command = _interrupted(proc, models)
    _finish_and_compare(command, models, reference)
