"""--checkpoint_every N (SIGKILL then resume, bit-identical), each checkpoint storage written once, the
divergence remedy in the message, and the command that Ctrl-C under torchrun prints (it resumes)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_same_run, interrupted_after_checkpoint, write_dataset
from main import main
from model_train import _what_is_kept
from optimizer_lib import LocalSgd
from utils.artefacts.checkpoint import CHECKPOINT

RUN = ["--verbose", "--num_epochs", "5", "--batch_size", "4", "--init_lr", "0.02", "--reg_lambda", "0.5", "--seed", "4"]
TIMEOUT = 300


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("every") / "Data", num_tasks=2, n_train=40, size=8)


def _main_argv(data: Path, models: Path, *extra: str) -> list[str]:
    return [sys.executable, "-u", str(ROOT / "main.py"), "--data_dir", str(data), "--models_dir", str(models), *RUN]


def test_checkpoint_every_2_then_sigkill_resumes_bit_identical(data, tmp_path):
    reference, models = tmp_path / "reference", tmp_path / "models"
    done = subprocess.run(_main_argv(data, reference), cwd=ROOT, env=_env(), capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(
        [*_main_argv(data, models), "--checkpoint_every", "2"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("Task_2 epoch   3/"):  # epoch 3 is not checkpointed: the last is epoch 2's
            proc.kill()
            break
    proc.communicate(timeout=60)
    checkpoint = torch.load(models / CHECKPOINT, weights_only=True)
    assert checkpoint["task"] == 2 and (checkpoint["epoch"] + 1) % 2 == 0
    resumed = subprocess.run(  # another N on resume: it changes no result
        [*_main_argv(data, models), "--resume", "--checkpoint_every", "3"], cwd=ROOT, env=_env(), capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(models, reference)


def test_checkpoint_every_must_be_at_least_1(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--data_dir", str(data), "--models_dir", str(tmp_path / "m"), "--checkpoint_every", "0"])
    assert stop.value.code == 2
    assert "argument --checkpoint_every: must be >= 1, got 0" in capsys.readouterr().err


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def test_a_checkpoint_holds_each_tensor_once(data, tmp_path, monkeypatch):
    models = tmp_path / "m"
    with interrupted_after_checkpoint(monkeypatch, task_no=2, epoch=1), pytest.raises(SystemExit):
        main(["--data_dir", str(data), "--models_dir", str(models), *RUN])
    payload = torch.load(models / CHECKPOINT, weights_only=True)
    tensors = _tensors(payload)
    with zipfile.ZipFile(models / CHECKPOINT) as archive:
        stored = [i.file_size for i in archive.infolist() if "/data/" in i.filename]
    # One storage per tensor, each exactly that tensor's bytes: nothing twice, no base of a view.
    assert len(stored) == len(tensors)
    assert sum(stored) == sum(t.numel() * t.element_size() for t in tensors)
    trainable = sum(t.numel() * 4 for t in payload["reg_params"].values() for t in (t["omega"],))
    model = sum(t.numel() * t.element_size() for t in payload["model"].values())
    momentum = sum(s["momentum_buffer"].numel() * 4 for s in payload["optimizer"]["state"].values())
    rng = sum(t.numel() * t.element_size() for t in _tensors(payload["rng"]))
    assert sum(stored) == model + momentum + 2 * trainable + rng  # + 2: Omega and theta*


def test_the_divergence_message_names_the_proximal_step_only_when_the_explicit_one_diverged():
    param = torch.nn.Parameter(torch.zeros(2))
    explicit, proximal = (LocalSgd([param], lr=0.1, penalty_step=step) for step in ("explicit", "proximal"))
    assert _what_is_kept(1, explicit) == (
        "the last epoch's checkpoint is kept; start again with --penalty_step proximal (stable at any lambda) or "
        "a lower --init_lr (or --reg_lambda), and --overwrite"
    )
    assert _what_is_kept(0, proximal) == (
        "no epoch of this task finished, so no checkpoint of it exists; start again with a lower --init_lr "
        "(or --reg_lambda), and --overwrite"
    )


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def test_ctrl_c_under_torchrun_prints_the_torchrun_line_that_resumes(tmp_path):
    data = write_dataset(tmp_path / "Data", num_tasks=2, n_train=12, n_test=4)
    flags = [
        "--verbose",
        "--num_epochs",
        "12",
        "--batch_size",
        "8",
        "--init_lr",
        "0.05",
        "--momentum",
        "0.9",
        "--seed",
        "5",
    ]
    reference, models = tmp_path / "reference", tmp_path / "models"
    launch = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "main.py", "--data_dir", str(data)]
    done = subprocess.run(
        [*launch, "--models_dir", str(reference), *flags], cwd=ROOT, env=_env(), capture_output=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    group = subprocess.Popen(
        [*launch, "--models_dir", str(models), *flags],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in group.stdout:
        if line.startswith("Task_2 epoch   2/"):
            os.killpg(group.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
            break
    _, err = group.communicate(timeout=TIMEOUT)
    assert group.returncode != 0
    lines = err.splitlines()  # rank 0's message, then torchrun's own report of the signal
    command = lines[lines.index(next(x for x in lines if x.startswith("interrupted: "))) + 1].strip()
    expected = f"torchrun --standalone --nproc_per_node 2 main.py --data_dir {data} --models_dir {models}"
    assert command == " ".join([expected, *flags, "--resume"])
    resumed = subprocess.run(
        [*_torchrun(), *shlex.split(command)[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    assert_same_run(models, reference)
