"""A data_prep.py killed (SIGKILL) while its staging folders fill leaves them behind; the next run
removes them, and never the folder of a run that is still alive (issue 14, disk leaks). The kills
are real: a subprocess, killed at the moment its staging folder is seen filling on disk."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from test_data_prep_tiny import ROOT, write_tiny_zip

import data_prep as dp
from mas_data import staging

REPO = Path(__file__).resolve().parents[1]
SLOW_BUILD = ["--dataset", "digits", "--scenario", "permuted", "--num_tasks", "60"]  # 108000 PNG files


def start(cwd: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "data_prep.py"), *flags],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def filling(folder: Path, prefix: str) -> Callable[[], Path | None]:
    """The first folder ``<folder>/<prefix>*`` that already holds a file."""

    def found() -> Path | None:
        for entry in os.scandir(folder) if folder.is_dir() else []:
            if entry.name.startswith(prefix) and any(p.is_file() for p in Path(entry.path).rglob("*")):
                return Path(entry.path)
        return None

    return found


def wait_for(found: Callable[[], Path | None], proc: subprocess.Popen, seconds: float = 120) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (path := found()) is not None:
            return path
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed mid-build: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the staging folder never appeared")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_build_killed_midway_is_cleaned_up_by_the_next_run(tmp_path, capsys):
    proc = start(tmp_path, *SLOW_BUILD, "--data_dir", "Data")
    staged = wait_for(filling(tmp_path, ".Data.building-"), proc)
    kill(proc)
    assert staged.is_dir() and any(staged.rglob("*.png"))  # what the kill leaves
    assert not (tmp_path / "Data").exists()
    dp.main(["--dataset", "digits", "--scenario", "permuted", "--num_tasks", "2", "--data_dir", str(tmp_path / "Data")])
    assert f"removing {staged}, left behind by an interrupted data_prep.py" in capsys.readouterr().out
    assert names(tmp_path) == ["Data"]
    assert json.loads((tmp_path / "Data" / "manifest.json").read_text())["num_tasks"] == 2


def test_a_rerun_that_finds_the_split_done_still_cleans_up(tmp_path, capsys):
    flags = ["--dataset", "digits", "--scenario", "permuted", "--num_tasks", "2", "--data_dir", "Data"]
    dp.main([*flags[:-1], str(tmp_path / "Data")])
    proc = start(tmp_path, *flags, "--force")  # a rebuild, killed before it replaces Data
    staged = wait_for(filling(tmp_path, ".Data.building-"), proc)
    kill(proc)
    capsys.readouterr()
    dp.main([*flags[:-1], str(tmp_path / "Data")])
    out = capsys.readouterr().out
    assert f"removing {staged}" in out and "nothing to do" in out
    assert names(tmp_path) == ["Data"]


@pytest.fixture(scope="module")
def big_zip(tmp_path_factory) -> Path:
    """The Tiny-ImageNet stand-in plus 3000 small members, so that its extraction takes a while."""
    extra = {f"{ROOT}/val/padding/{i:04d}.txt": os.urandom(2048) for i in range(3000)}
    return write_tiny_zip(tmp_path_factory.mktemp("zip") / "big.zip", extra=extra)


def test_an_extraction_killed_midway_is_cleaned_up_by_the_next_run(tmp_path, capsys, big_zip):
    md5 = hashlib.md5(big_zip.read_bytes()).hexdigest()
    flags = ["--archive", str(big_zip), "--md5", md5, "--num_tasks", "2"]
    flags += ["--data_dir", str(tmp_path / "Data"), "--download_dir", str(tmp_path / "dl")]
    proc = start(tmp_path, *flags)
    extracting = wait_for(filling(tmp_path / "dl", f".{ROOT}.building-"), proc)
    kill(proc)
    building = [p for p in tmp_path.iterdir() if p.name.startswith(".Data.building-")]
    assert extracting.is_dir() and len(building) == 1  # both staging folders are left by the kill
    with zipfile.ZipFile(big_zip) as zf:
        assert len(list(extracting.rglob("*"))) < len(zf.infolist())  # killed midway
    dp.main(flags)
    out = capsys.readouterr().out
    assert f"removing {building[0]}" in out and f"removing {extracting}" in out
    assert names(tmp_path) == ["Data", "dl"]
    assert names(tmp_path / "dl") == [ROOT]


def test_the_staging_folder_of_a_live_run_is_left_alone(tmp_path):
    proc = start(tmp_path, *SLOW_BUILD, "--data_dir", "Data")
    try:
        staged = wait_for(filling(tmp_path, ".Data.building-"), proc)
        staging.remove_stale_staging(tmp_path / "Data")
        assert staged.is_dir() and proc.poll() is None  # alive, and its folder kept
    finally:
        kill(proc)
    staging.remove_stale_staging(tmp_path / "Data")
    assert names(tmp_path) == []


def test_a_second_run_beside_a_live_one_keeps_its_folder_and_finishes(tmp_path):
    proc = start(tmp_path, *SLOW_BUILD, "--data_dir", "Data")
    try:
        staged = wait_for(filling(tmp_path, ".Data.building-"), proc)
        dp.main(["--dataset", "digits", "--data_dir", str(tmp_path / "Data")])
        assert staged.is_dir() and proc.poll() is None
        assert names(tmp_path) == sorted(["Data", staged.name])
    finally:
        kill(proc)


HOLDER = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
HOLDER += "print('locked', flush=True); time.sleep(120)"


@pytest.mark.parametrize(
    ("where", "target"),
    [(".", "Data"), (".", "Data"), ("dl", ROOT)],
    ids=["building", "old", "extraction"],
)
def test_a_folder_is_removed_only_once_its_lock_holder_is_gone(tmp_path, request, where, target):
    kind = request.node.callspec.id
    name = {"building": ".Data.building-abc", "old": ".Data.old-.Data.building-abc"}.get(kind, f".{ROOT}.building-x")
    folder = tmp_path / where / name
    (folder / "Task_1").mkdir(parents=True)
    (folder / "Task_1" / "image.png").write_bytes(b"png")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        staging.remove_stale_staging(tmp_path / where / target)
        assert (folder / "Task_1" / "image.png").is_file()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    staging.remove_stale_staging(tmp_path / where / target)
    assert not folder.exists()


def test_what_is_not_a_staging_folder_of_this_target_is_never_touched(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    kept = [".Data.backup", ".Data.new-abc", ".Other.building-abc", "Data.building-abc", ".Data"]
    for name in kept:
        (tmp_path / name).mkdir()
    (tmp_path / ".Data.building-file").write_text("a file, not a folder")
    (tmp_path / ".Data.building-link").symlink_to(elsewhere, target_is_directory=True)
    staging.remove_stale_staging(tmp_path / "Data")
    assert names(tmp_path) == sorted([*kept, ".Data.building-file", ".Data.building-link", "elsewhere"])
    assert (elsewhere / "keep").is_dir()


def test_without_file_locks_nothing_is_removed_and_the_build_still_works(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(staging.fcntl, "flock", no_locks)
    (tmp_path / ".Data.building-old").mkdir()
    dp.main(["--dataset", "digits", "--data_dir", str(tmp_path / "Data")])
    assert names(tmp_path) == [".Data.building-old", "Data"]  # nobody can tell whether its owner lives


def test_a_failed_publish_puts_the_old_split_back(tmp_path, monkeypatch):
    data_dir = tmp_path / "Data"
    dp.main(["--dataset", "digits", "--data_dir", str(data_dir)])
    before = (data_dir / "manifest.json").read_bytes()
    real_rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".Data.building-"):
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(SystemExit):
        dp.main(["--dataset", "digits", "--data_dir", str(data_dir), "--force"])
    assert (data_dir / "manifest.json").read_bytes() == before
    assert names(tmp_path) == ["Data"]
