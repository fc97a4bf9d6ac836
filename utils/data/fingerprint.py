"""The record of the images a run reads, so that ``--resume`` refuses data that changed under the run.

``data_files.json`` in the models folder maps every image of every task's train and test split, by its
path relative to the data folder, to its size and the SHA-256 of its bytes. A run writes it when it
starts (every image is read once, with a progress bar); ``--resume`` reads the images again and
compares before anything is written: the first file in path order that was added, removed or changed
is one error line. The manifest is compared separately (``config.data_fingerprint``), and the data
folder may move (paths are relative). A run begun before the record existed resumes unchecked, with
one note, and its record is written then.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils import UserError
from utils.artefacts.files import load_json, save_text
from utils.data.decode import list_images
from utils.data.tasks import task_dirs

DATA_FILES = "data_files.json"
FORMAT = 1
READERS = 8  # threads reading files at once: hashing releases the GIL, and reads wait on the disk
Record = dict[str, list]  # relative path -> [size in bytes, sha256 hex digest]


def image_paths(data_dir: str | Path, manifest: Mapping[str, Any]) -> list[str]:
    """Every image of every task's train and test split, as ImageFolder lists them."""
    paths = []
    for task_dir in task_dirs(data_dir, manifest):
        for split in ("train", "test"):
            paths += [path for path, _ in list_images(str(task_dir / split))[1]]
    return paths


def _size_and_digest(path: str) -> list:
    try:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            return [os.fstat(handle.fileno()).st_size, digest]
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from err


def current_record(data_dir: str | Path, manifest: Mapping[str, Any]) -> Record:
    """Size and SHA-256 of every image, keyed by its path relative to ``data_dir`` ('/'-separated)."""
    paths = image_paths(data_dir, manifest)
    with (
        ThreadPoolExecutor(READERS) as pool,
        tqdm(total=len(paths), desc="fingerprinting the images", unit="img", leave=False, disable=None) as bar,
    ):
        record = {}
        for path, entry in zip(paths, pool.map(_size_and_digest, paths)):
            record[Path(os.path.relpath(path, data_dir)).as_posix()] = entry
            bar.update()
    return dict(sorted(record.items()))


def _save_record(record: Record, path: Path) -> None:
    """JSON with one file a line (a data set's record holds 10^5 of them)."""
    lines = [f"    {json.dumps(name)}: {json.dumps(entry)}" for name, entry in record.items()]
    save_text(f'{{"format": {FORMAT}, "files": {{\n' + ",\n".join(lines) + "\n}}\n", path)


def record_data_files(data_dir: str | Path, manifest: Mapping[str, Any], models_dir: str | Path) -> None:
    """Write the record of the run's images into its models folder (at the start of a run)."""
    _save_record(current_record(data_dir, manifest), Path(models_dir) / DATA_FILES)


def _stored_record(path: Path) -> Record | None:
    if not path.exists():
        return None
    stored = load_json(path)
    files = stored.get("files") if isinstance(stored, dict) and stored.get("format") == FORMAT else None
    valid = isinstance(files, dict) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and isinstance(e[1], str) for e in files.values()
    )
    if not valid:
        raise UserError(f"{path} is not a record of a run's images written by this program")
    return files


def differences(stored: Record, current: Record) -> list[tuple[str, str]]:
    """(path, 'was added' / 'was removed' / 'changed') for every file that differs, in path order."""
    found = []
    for path in sorted(stored.keys() | current.keys()):
        if path not in current:
            found.append((path, "was removed"))
        elif path not in stored:
            found.append((path, "was added"))
        elif stored[path] != current[path]:
            found.append((path, "changed"))
    return found


def check_data_files(data_dir: str | Path, manifest: Mapping[str, Any], models_dir: str | Path) -> None:
    """--resume: the images must be those the run started with; the first that differs is one UserError.
    A run without a record (begun before it existed) is not checked: one note, and the record is written."""
    path = Path(models_dir) / DATA_FILES
    stored = _stored_record(path)
    current = current_record(data_dir, manifest)
    if stored is None:
        print(
            f"note: {models_dir} holds no record of its images (the run began before they were recorded): "
            f"they are not checked; recorded now in {path}"
        )
        _save_record(current, path)
        return
    found = differences(stored, current)
    if found:
        first, how = found[0]
        others = f" ({len(found)} files differ)" if len(found) > 1 else ""
        raise UserError(
            f"--resume: {Path(data_dir) / first} {how} since the run in {models_dir} started{others}; "
            "a run continues only on the images it started with: restore them, or start again with --overwrite"
        )
