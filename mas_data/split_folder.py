"""What ``--data_dir`` and ``--download_dir`` hold before a run: a file where a folder should be,
a finished split of the same arguments (nothing to do), another split (replaced only with --force),
or something data_prep.py did not write (never replaced: it may be the user's own data)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from mas_data.flags import applies
from utils import UserError
from utils.artefacts.files import load_json
from utils.data.manifest import MANIFEST, written_by_data_prep


def check_folders(args: argparse.Namespace) -> None:
    """A folder flag that names a file would fail deep inside; say so first."""
    flags = ["data_dir"] + (["download_dir"] if applies("download_dir", args) else [])
    for flag in flags:
        path = Path(getattr(args, flag))
        nearest = next((p for p in (path, *path.parents) if p.exists()), None)  # itself, or what holds it
        if nearest is not None and not nearest.is_dir():
            where = f"{path} is" if nearest == path else f"{path}: {nearest} is"
            raise UserError(f"--{flag} {where} a file, not a folder; choose another --{flag}")


def existing_split(data_dir: Path, signature: dict, force: bool) -> bool:
    """True when ``data_dir`` already holds this split; an error when it holds something else.

    ``--force`` replaces a split of this program, nothing else: a folder with anything besides
    ``manifest.json`` and ``Task_<n>`` folders is refused, with or without it (it may be the
    user's own data, a models folder or their home)."""
    if not data_dir.exists():
        return False
    manifest = check_only_a_split(data_dir)
    if force or manifest is None:  # None: an empty folder
        return False
    prepared = manifest["prepared_with"]
    if prepared != signature:
        raise UserError(
            f"{data_dir} already holds a split made with {prepared}, not {signature}; "
            "pass --force to replace it, or choose another --data_dir"
        )
    return True


def check_only_a_split(data_dir: Path) -> dict | None:
    """An error unless ``data_dir`` is empty or holds only what data_prep.py writes there; its
    manifest (None when empty)."""
    entries = sorted(os.scandir(data_dir), key=lambda e: e.name)
    if not entries:
        return None
    if MANIFEST not in {e.name for e in entries}:
        raise UserError(
            f"{data_dir} exists and holds no {MANIFEST}: it is not a split of data_prep.py, "
            "so it is not replaced; move it away or choose another --data_dir"
        )
    manifest = load_json(data_dir / MANIFEST)
    if not written_by_data_prep(manifest):
        raise UserError(
            f"{data_dir / MANIFEST} was not written by data_prep.py, so {data_dir} is not replaced; "
            "move it away or choose another --data_dir"
        )
    for entry in entries:
        is_task = entry.is_dir(follow_symlinks=False) and re.fullmatch(r"Task_\d+", entry.name)
        if not (is_task or (entry.name == MANIFEST and entry.is_file(follow_symlinks=False))):
            raise UserError(
                f"{data_dir} holds {entry.name}, which data_prep.py does not write there, so it is not "
                "replaced; move that away, or choose another --data_dir"
            )
    return manifest
