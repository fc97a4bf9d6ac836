"""The schema of ``Data/manifest.json`` (written by ``data_prep.py``), checked once, where it is read.

Required: ``dataset`` (string), ``tasks`` (a non-empty list of ``{"name", "classes"}``, the names
``Task_1 ... Task_T`` in order, each with distinct class names), ``image_size``, ``channels`` (1 or 3),
``mean`` and ``std`` (one finite number per channel, std > 0). Optional: ``augment`` (boolean),
``default_arch`` (string), ``defaults`` (an object; each entry is checked like the flag it stands for
by config.py), ``num_tasks`` (the number of tasks), ``num_train``/``num_test`` per task (counts),
``class_names`` (strings), ``prepared_with`` and any other field data_prep.py records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils import UserError
from utils.schema import entry, in_range, items

MAX_IMAGE_SIZE = 65_535


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
