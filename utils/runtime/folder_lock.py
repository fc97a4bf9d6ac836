"""One writer per folder: an exclusive ``flock`` on ``<folder>/.lock`` held for the writer's whole life.

A run folder (``main.py --models_dir``) and a sweep folder (``sweep.py --out``) each have exactly one
writer. The writer takes ``fcntl.flock(LOCK_EX)`` on ``.lock`` inside the folder before it reads or
removes anything there and keeps it until it ends; the kernel releases it when the process dies, so
even SIGKILL leaves no stale lock. The file holds the holder's PID for the refusal message of a
second writer, which stops with one line naming the folder and that PID. The file is removed on a
clean release (after checking that it is still the file that was locked: a writer that opened it
just before the removal locks a file no longer in the folder, notices, and takes the new one); after
SIGKILL it stays, and the next writer simply locks it again.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from utils import UserError

LOCK_FILE = ".lock"
_PID_WAIT_SECONDS = 1.0  # a holder writes its PID right after locking: how long to wait for it


class FolderLock:
    """``with FolderLock(folder, "main.py"):`` the exclusive writer of ``folder`` (which must exist)."""

    def __init__(self, folder: Path, program: str) -> None:
        self.folder, self.program = Path(folder), program
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the folder and the PID that holds it."""
        if self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._refusal()) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed it as we opened it: lock the file that is there now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing the last descriptor releases the lock
        self._fd = None

    def _refusal(self) -> str:
        pid = holder_pid(self.path)
        who = f"PID {pid}" if pid else "another process"
        return (
            f"{self.folder} is in use by {who} (it holds {self.path}): a folder has one writer at a time; "
            f"wait for that process to end or stop it, or give another folder to {self.program}"
        )

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def holder_pid(path: Path) -> int | None:
    """The PID written in a held lock file (None if unreadable)."""
    deadline = time.monotonic() + _PID_WAIT_SECONDS
    while True:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() or time.monotonic() >= deadline:
            return int(text) if text.isdigit() else None
        time.sleep(0.02)


def locked_by(folder: Path) -> int | None:
    """The PID of the process that holds ``folder``'s lock (0 if unknown), or None if none does.
    Probes by taking the lock for an instant, without writing or removing anything."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder_pid(path) or 0
    finally:
        os.close(fd)
    return None
