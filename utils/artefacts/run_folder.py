"""The models folder of a run: what ``main.py`` writes there, how a run folder is recognised, and
what ``--overwrite`` may remove.

A folder is a run of this program when it holds a ``results.json`` or a ``checkpoint.pth`` that this
program wrote (their format tags are checked); a run writes one of them after its first epoch.
``--overwrite`` removes only such a folder's artefacts, file by file: the files listed here, the
``Task_N`` folders and ``plots/`` when they hold nothing else. Anything else stops it before it
deletes anything. A models folder that is, contains or lies inside the data folder is refused.
The folder's ``.lock`` (utils/runtime/folder_lock.py: one writer at a time) is no run artefact: it is not
listed, not removed by ``--overwrite`` (the run holds it), and not a foreign file.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from utils import UserError
from utils.artefacts.checkpoint import CHECKPOINT, load_checkpoint
from utils.artefacts.model_files import CLASSES, HEAD, PERFORMANCE, REG_PARAMS, SHARED_MODEL
from utils.artefacts.results import MATRIX_CSV, RESULTS, load_results

RUN_FILES = (RESULTS, MATRIX_CSV, CHECKPOINT, SHARED_MODEL, REG_PARAMS)
TASK_FILES = (HEAD, PERFORMANCE, CLASSES)
PLOTS = "plots"
_TASK_DIR = re.compile(r"^Task_\d+$")
_PLOT_FILE = re.compile(r"^(accuracy_matrix(_\d+)?|forgetting|before_after)\.png$")  # before_after: older runs
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # an atomic write that a crash interrupted


def run_artefacts(models_dir: Path) -> list[str]:
    """Entries of ``models_dir`` with the names of a run's artefacts."""
    if not models_dir.is_dir():
        return []
    names = [p.name for p in models_dir.iterdir()]
    return sorted(n for n in names if n in RUN_FILES or n == PLOTS or _TASK_DIR.match(n))


def is_run_folder(models_dir: Path) -> bool:
    """True when ``models_dir`` holds a results.json or checkpoint.pth of this program (damaged ones
    stop with their own message: the folder is not deleted on a guess)."""
    return load_results(models_dir) is not None or load_checkpoint(models_dir, quick=True) is not None


def _written_by_a_run(path: Path) -> bool:
    name, parent = path.name, path.parent.name
    if _TEMPORARY.match(name):
        return True
    if parent == PLOTS:
        return bool(_PLOT_FILE.match(name))
    return name in TASK_FILES


def _foreign_files(models_dir: Path) -> list[Path]:
    """Files and folders inside the run's Task_N/ and plots/ folders that a run does not write."""
    folders = [models_dir / n for n in run_artefacts(models_dir) if (models_dir / n).is_dir()]
    foreign = [p for folder in folders for p in folder.iterdir() if p.is_dir() or not _written_by_a_run(p)]
    return sorted(foreign)


def remove_previous_run(models_dir: Path) -> None:
    """--overwrite: delete the earlier run's artefacts, and nothing this program did not write."""
    if not is_run_folder(models_dir):
        shown = ", ".join(run_artefacts(models_dir)[:4])
        raise UserError(
            f"{models_dir} holds {shown} but no {RESULTS} or {CHECKPOINT} written by main.py, so it is not a "
            "run of this program and --overwrite will not delete it; move those away or choose another --models_dir"
        )
    foreign = _foreign_files(models_dir)
    if foreign:
        raise UserError(
            f"--overwrite would delete {foreign[0]}, which main.py does not write; nothing was deleted: "
            "move it away (or choose another --models_dir)"
        )
    for name in run_artefacts(models_dir):
        path = models_dir / name
        if path.is_dir():
            for inner in path.iterdir():
                inner.unlink()
            path.rmdir()
        else:
            path.unlink()


def check_models_dir(models_dir: Path, data_dir: Path) -> None:
    """A folder the run can write to, apart from the data. Creates it."""
    models, data = models_dir.resolve(), data_dir.resolve()
    for overlap, where in (
        (models == data, "is"),
        (data.is_relative_to(models), "contains"),
        (models.is_relative_to(data), "lies inside"),
    ):
        if overlap:
            raise UserError(f"--models_dir {models_dir} {where} the data folder {data_dir}; choose another folder")
    if models_dir.exists() and not models_dir.is_dir():
        raise UserError(f"--models_dir {models_dir} exists and is not a folder")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        os.listdir(models_dir)
        with tempfile.TemporaryFile(dir=models_dir):
            pass
    except OSError as err:
        raise UserError(f"cannot use --models_dir {models_dir}: {err.strerror or err}") from err


def remove_stale_temporaries(models_dir: Path) -> None:
    """Temporary files of writes that a crash interrupted (the files they would have replaced are intact)."""
    for folder in [models_dir, *(models_dir / n for n in run_artefacts(models_dir))]:
        if folder.is_dir():
            for path in folder.iterdir():
                if _TEMPORARY.match(path.name):
                    path.unlink(missing_ok=True)
