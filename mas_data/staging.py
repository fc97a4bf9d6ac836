"""Staging folders: a split (or an extraction) is built in a hidden folder beside its destination,
flock-ed for its whole life, and moved into place by rename only when complete; the hidden folders
of a run that was killed are found by their free lock and removed by the next run.

So an interrupted data_prep.py never leaves a half-written folder where main.py looks, and never
removes a folder that a live run is still building.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from utils.artefacts.files import shared_mode


def _lock(fd: int) -> bool:
    """Take the flock of an open folder without waiting; False when another process holds it
    (or when the file system has no locks, where nobody can tell whether its owner lives)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _flocked(folder: Path) -> Iterator[None]:
    """Hold the flock of ``folder`` (by its inode, so across renames) for the block."""
    fd = None
    with contextlib.suppress(OSError):  # not a folder (any more): nothing to hold
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if fd is not None:
            _lock(fd)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def staging_dir(data_dir: Path) -> Iterator[Path]:
    """A scratch folder ``.<name>.building-*`` beside ``data_dir`` (same file system, so the final
    move is a rename), flock-ed for its whole life: the kernel drops the lock when this process
    dies, however it dies, which is how a later run tells an abandoned folder from a live one.
    It is made under another name and renamed once locked, so that no run ever sees it unlocked."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{data_dir.name}.new-"
    fresh = Path(tempfile.mkdtemp(prefix=prefix, dir=data_dir.parent))
    staged = data_dir.with_name(f".{data_dir.name}.building-{fresh.name[len(prefix) :]}")
    with _flocked(fresh):
        try:
            fresh.rename(staged)
        except OSError:
            fresh.rmdir()
            raise
        try:
            staged.chmod(shared_mode(directory=True))  # mkdtemp makes 0700 folders; the data is shared
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def publish(staged: Path, data_dir: Path) -> None:
    """Move a complete split into place; an old one (``--force``) is removed only afterwards.

    The old split stays locked while it is ``.<name>.old-*``, so no other run removes it in the
    instant when it is the only copy."""
    if not data_dir.exists():
        staged.rename(data_dir)
        return
    old = data_dir.with_name(f".{data_dir.name}.old-{staged.name}")
    with _flocked(data_dir):
        data_dir.rename(old)
        try:
            staged.rename(data_dir)
        except BaseException:  # an error, or Ctrl-C between the two renames: the old split goes back
            old.rename(data_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(target: Path) -> None:
    """Remove the ``.<name>.building-*`` and ``.<name>.old-*`` folders beside ``target`` that a
    killed data_prep.py left; a folder whose owner is alive (its lock is held) is left alone."""
    prefixes = (f".{target.name}.building-", f".{target.name}.old-")
    try:
        entries = [e for e in os.scandir(target.parent) if e.name.startswith(prefixes)]
    except OSError:  # no such folder: nothing was left there
        return
    for entry in entries:
        folder = target.parent / entry.name
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _lock(fd):
                print(f"removing {folder}, left behind by an interrupted data_prep.py")
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
