"""The scenarios under torchrun on the CPU (gloo): 2 ranks score as 1 process, the task-agnostic
matrix included, with test sets that do not split evenly (3 images: shards of 2 and 1) or leave a
rank nothing (1 image). Real processes, bounded in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_dataset
from main import main
from task_agnostic import TAG_MATRIX

FLAGS = ["--num_epochs", "2", "--batch_size", "8", "--init_lr", "0.05", "--seed", "3", "--reg_lambda", "0.5"]
TIMEOUT = 300


def _two_ranks(data: Path, models: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py"]
    command += ["--data_dir", str(data), "--models_dir", str(models), *FLAGS, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _results(models: Path) -> dict:
    return json.loads((models / "results.json").read_text())


@pytest.mark.parametrize(
    ("scenario", "classes", "n_test"),
    [("task", 3, 1), ("class", 3, 1), ("domain", 1, 1)],
    ids=["task-uneven-shards", "class-uneven-shards", "domain-empty-shard"],
)
def test_two_ranks_score_as_one_process(tmp_path, scenario, classes, n_test):
    # 24 training images a task: 3 global batches of 8; the test set: 3 images (2 + 1) or 1 (1 + 0).
    data = write_dataset(tmp_path / "Data", num_tasks=2, classes_per_task=classes, n_train=24 // classes, n_test=n_test)
    main(["--data_dir", str(data), "--models_dir", str(tmp_path / "single"), *FLAGS, "--scenario", scenario])
    done = _two_ranks(data, tmp_path / "ranks", "--scenario", scenario)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ranks = _results(tmp_path / "single"), _results(tmp_path / "ranks")
    assert ranks["accuracy_matrix"] == single["accuracy_matrix"]
    assert ranks.get(TAG_MATRIX) == single.get(TAG_MATRIX) and (TAG_MATRIX in ranks) == (scenario == "task")
    for task in (1, 2):
        ours, ref = (
            torch.load(tmp_path / m / f"Task_{task}" / "head.pth", weights_only=True) for m in ("ranks", "single")
        )
        assert all(torch.allclose(ours[k], ref[k], rtol=1e-5, atol=1e-7) for k in ref)
    assert done.stdout.count("task-agnostic average accuracy") == (1 if scenario == "task" else 0)  # rank 0 prints
