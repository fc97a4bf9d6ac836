"""The schema of ``Data/manifest.json``, for the side that writes it (``data_prep.py``, through
``mas_data``) and the side that reads it (``utils/data/tasks.py`` for ``main.py``): one file name,
one set of bounds, one check, run by the writer before it saves and by the reader once, where it loads.

Required: ``dataset`` (string), ``tasks`` (a non-empty list of ``{"name", "classes"}``, the names
``Task_1 ... Task_T`` in order, each with distinct class names), ``image_size`` (1 to MAX_IMAGE_SIZE),
``channels`` (1 or 3), ``mean`` and ``std`` (one finite number per channel, std > 0). Optional:
``augment`` (boolean), ``default_arch`` (string), ``defaults`` (an object; each entry is checked like
the flag it stands for by config.py), ``num_tasks`` (the number of tasks), ``num_train``/``num_test``
per task (counts), ``class_names`` (strings), ``prepared_with`` (the arguments that made the split;
its presence marks a split of data_prep.py) and any other field data_prep.py records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils import UserError
from utils.artefacts.files import save_json
from utils.schema import entry, in_range, items

MANIFEST = "manifest.json"  # inside the data folder, beside Task_1 ... Task_T
# The stored size becomes the run's --image_size when the flag is not given (every trunk but
# AlexNet), so it is bounded as that flag is: a manifest may not ask for what the command line refuses.
MAX_IMAGE_SIZE = 4096
PREPARED_WITH = "prepared_with"


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """``manifest`` if it follows the schema above, else a one-line UserError naming ``path``."""
    where = str(path)
    entry(manifest, "dataset", str, where)
    tasks = entry(manifest, "tasks", list, where)
    if not tasks:
        raise UserError(f"{where}: 'tasks' lists no task")
    for number, task in enumerate(tasks, start=1):
        _check_task(task, number, f"{where}: tasks[{number - 1}]")
    if entry(manifest, "num_tasks", int, where, default=len(tasks)) != len(tasks):
        raise UserError(f"{where}: 'num_tasks' is {manifest['num_tasks']} but 'tasks' lists {len(tasks)}")
    in_range(entry(manifest, "image_size", int, where), 1, MAX_IMAGE_SIZE, f"{where}: 'image_size'")
    channels = entry(manifest, "channels", int, where)
    if channels not in (1, 3):
        raise UserError(f"{where}: 'channels' must be 1 or 3, got {channels}")
    for key in ("mean", "std"):
        values = items(entry(manifest, key, list, where), float, f"{where}: '{key}'")
        if len(values) != channels:
            raise UserError(f"{where}: '{key}' has {len(values)} values for {channels} channels")
    if not all(s > 0 for s in manifest["std"]):
        raise UserError(f"{where}: every 'std' must be > 0, got {manifest['std']}")
    entry(manifest, "augment", bool, where, default=False)
    entry(manifest, "default_arch", str, where, default="alexnet")
    entry(manifest, "defaults", dict, where, default={})
    return manifest


def _check_task(task: Any, number: int, where: str) -> None:
    name = entry(task, "name", str, where)
    if name != f"Task_{number}":
        raise UserError(f"{where}: 'name' must be 'Task_{number}' (tasks in order), got {name!r}")
    classes = items(entry(task, "classes", list, where), str, f"{where}: 'classes'")
    if not classes or len(set(classes)) != len(classes):
        raise UserError(f"{where}: 'classes' must list each class of the task once, got {classes}")
    for key in ("num_train", "num_test"):
        if entry(task, key, int, where, default=0) < 0:
            raise UserError(f"{where}: '{key}' must be >= 0")
    items(entry(task, "class_names", list, where, default=[]), str, f"{where}: 'class_names'")


def write_manifest(fields: dict[str, Any], signature: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Save ``folder/manifest.json``: ``fields`` (a dataset's description of its tasks), then the
    number of tasks and the ``signature`` that made them, checked against the schema first so that
    data_prep.py never writes what main.py would refuse. Returns what was written."""
    manifest = {**fields, "num_tasks": len(fields["tasks"]), PREPARED_WITH: signature}
    path = folder / MANIFEST
    save_json(check_manifest(manifest, path), path)
    return manifest


def written_by_data_prep(manifest: Any) -> bool:
    """Whether a loaded manifest is one that data_prep.py wrote (it records what made the split)."""
    return isinstance(manifest, dict) and PREPARED_WITH in manifest
