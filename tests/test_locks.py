"""One writer per folder (utils/runtime/folder_lock.py): a second main.py, --resume or --overwrite against a live
run, a run after SIGKILL of the holder, a sweep killed while its child lives on, two sweeps on one
--out, and a sweep's refusal to overwrite the user's own table or plot. Real processes; a live run is
held with SIGSTOP, so that the timing of the tests does not depend on the machine's speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_run, write_dataset
from sweep import main as sweep
from utils.runtime.folder_lock import LOCK_FILE, locked_by

RUN = ["--verbose", "--num_epochs", "4", "--batch_size", "4", "--init_lr", "0.02", "--reg_lambda", "0.5", "--seed", "3"]
TIMEOUT = 300
SLUG = "mas_lam0.5_seed0"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("locks") / "Data", num_tasks=2, n_train=40, size=8)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _main_argv(data: Path, models: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-u",
        str(ROOT / "main.py"),
        "--data_dir",
        str(data),
        "--models_dir",
        str(models),
        *RUN,
        *extra,
    ]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("reference") / "models"
    done = _run(_main_argv(data, models))
    assert done.returncode == 0, done.stderr
    return models


def _stopped_in_task_1(data: Path, models: Path) -> subprocess.Popen:
    """A run stopped (SIGSTOP) after the checkpoint of task 1's first epoch: it holds the lock."""
    proc = subprocess.Popen(_main_argv(data, models), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Task_1 epoch   2/"):
            os.kill(proc.pid, signal.SIGSTOP)
            return proc
    raise AssertionError("the run ended before its second epoch")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refusal(folder: Path, pid: int) -> str:
    return (
        f"error: {folder} is in use by PID {pid} (it holds {folder / LOCK_FILE}): a folder has one writer at a "
        "time; wait for that process to end or stop it, or give another folder to "
    )


def test_a_second_writer_is_refused_and_the_live_run_ends_as_an_uninterrupted_one(data, reference, tmp_path):
    models = tmp_path / "models"
    live = _stopped_in_task_1(data, models)
    try:
        before = _files(models)
        for extra in ([], ["--resume"], ["--overwrite"]):
            done = _run(_main_argv(data, models, *extra))
            assert done.returncode == 1, extra
            assert done.stderr.splitlines() == [_refusal(models, live.pid) + "main.py"], extra
            assert _files(models) == before, extra  # nothing read-modified, nothing removed
    finally:
        os.kill(live.pid, signal.SIGCONT)
    live.communicate(timeout=TIMEOUT)
    assert live.returncode == 0
    assert_same_run(models, reference)
    assert not (models / LOCK_FILE).exists()  # removed when the run ended


def test_sigkill_of_the_holder_leaves_no_stale_lock(data, reference, tmp_path):
    models = tmp_path / "models"
    live = _stopped_in_task_1(data, models)
    live.kill()
    live.communicate(timeout=60)
    assert (models / LOCK_FILE).exists() and locked_by(models) is None  # the file stays, the lock is gone
    fresh = _run(_main_argv(data, models))
    assert fresh.returncode == 1 and "holds a previous run" in fresh.stderr  # the usual check, not the lock
    resumed = _run(_main_argv(data, models, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(models, reference)


# ---------------------------------------------------------------- sweeps


def _sweep_argv(data: Path, out: Path) -> list[str]:
    return ["--methods", "mas", "--reg_lambda", "0.5", "--seeds", "0", "--out", str(out), "--", "--data_dir", str(data)]


def _sweep_tail() -> list[str]:
    return [a for a in RUN if a not in ("--reg_lambda", "0.5", "--seed", "3")]


def _sweep_process(data: Path, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-u", str(ROOT / "sweep.py"), *_sweep_argv(data, out), *_sweep_tail()]
    return subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(folder: Path) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        pid = locked_by(folder)
        if pid:
            return pid
        time.sleep(0.01)
    raise AssertionError(f"nobody locked {folder}")


def _main_processes_on(folder: Path) -> list[int]:
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if any(w.endswith("main.py") for w in words) and str(folder) in words:
            found.append(pid)
    return found


def test_a_sweep_killed_while_its_child_runs_does_not_start_a_twin(data, tmp_path):
    out = tmp_path / "sweep"
    first = _sweep_process(data, out)
    run_dir = out / "runs" / SLUG
    child = _wait_for_lock(run_dir)
    os.kill(child, signal.SIGSTOP)  # the orphan stays alive as long as the test needs
    first.kill()
    first.communicate(timeout=60)
    try:
        again = _run([sys.executable, str(ROOT / "sweep.py"), *_sweep_argv(data, out), *_sweep_tail()])
        assert again.returncode == 1
        assert again.stderr.splitlines() == [
            f"error: {run_dir} is in use by PID {child} (a main.py still running, started by an earlier sweep?); "
            "wait for it to end or stop it, then rerun the same command"
        ]
        assert _main_processes_on(run_dir) == [child]  # no twin
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while locked_by(run_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    done = _run([sys.executable, str(ROOT / "sweep.py"), *_sweep_argv(data, out), *_sweep_tail()])
    assert done.returncode == 0, done.stderr
    assert "[1/1] mas_lam0.5_seed0: complete" in done.stdout


def test_two_sweeps_on_one_out(data, tmp_path, error_line):
    out = tmp_path / "sweep"
    first = _sweep_process(data, out)
    holder = _wait_for_lock(out)
    os.kill(holder, signal.SIGSTOP)
    try:
        line = error_line(lambda: sweep([*_sweep_argv(data, out), *_sweep_tail()]))
        assert line == _refusal(out, first.pid) + "sweep.py --out"
    finally:
        os.kill(holder, signal.SIGCONT)
    _, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err
    assert _main_processes_on(out / "runs" / SLUG) == []


@pytest.mark.parametrize("name", ["table.md", "table.csv", "plot.png"])
def test_a_sweep_leaves_the_users_own_table_or_plot_alone(data, tmp_path, error_line, name):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / name).write_bytes(b"the user's own notes\n")
    line = error_line(lambda: sweep([*_sweep_argv(data, out), *_sweep_tail()]))
    assert line == (
        f"error: {out / name} was not written by sweep.py (or was changed since), and the sweep never overwrites "
        "such a file; move it away or give another --out"
    )
    assert (out / name).read_bytes() == b"the user's own notes\n"
    assert sorted(p.name for p in out.iterdir()) == [name]  # refused before anything ran or was written
