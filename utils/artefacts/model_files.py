"""The files of a run's models: the shared trunk, the per-task heads and their text files, and
the ImageNet AlexNet weights. Only reading and writing here; the networks are built in
``model_class.py``.

Output tree under ``--models_dir`` (as the seed implementation)::

    shared_model.pth        state_dict of the shared trunk after the last finished task
    reg_params.pickle       MAS state, see reg_params.py
    Task_i/head.pth         state_dict of task i's Linear head
    Task_i/performance.txt  test accuracy (%) right after training task i
    Task_i/classes.txt      number of classes, then one class name per line
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn

from utils import UserError
from utils.artefacts.files import load_torch, save_text, save_torch

SHARED_MODEL = "shared_model.pth"
REG_PARAMS = "reg_params.pickle"  # written by reg_params.py
HEAD = "head.pth"
PERFORMANCE = "performance.txt"
CLASSES = "classes.txt"
# torchvision's AlexNet_Weights.IMAGENET1K_V1.url (a test checks it), written out: importing torchvision
# costs two seconds of start-up. Module-level so tests can point it at a server on 127.0.0.1.
ALEXNET_WEIGHTS_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def pretrained_alexnet_state() -> dict[str, torch.Tensor]:
    """ImageNet AlexNet weights through torch.hub's cache (downloaded once, hash-checked).

    torch.hub prints "Downloading: ..." on stdout; it is held back so that an offline run
    prints its one error line and nothing else."""
    url = ALEXNET_WEIGHTS_URL
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    cached = target.is_file()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            state = torch.hub.load_state_dict_from_url(
                url, map_location="cpu", progress=True, check_hash=True, weights_only=True
            )
    except (URLError, OSError, RuntimeError, EOFError) as err:
        raise UserError(
            f"could not get the ImageNet AlexNet weights ({getattr(err, 'reason', err)}): "
            f"download {url} to {target}, or run with --no-pretrained"
        ) from err
    if not cached:
        print(f"downloaded the ImageNet AlexNet weights to {target}")
    return state


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Same names and shapes, or a UserError naming the first offending parameter."""
    if not isinstance(found, dict):
        raise UserError(f"{what} is not a dict of tensors keyed by parameter name")
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected), key=str)
    if missing:
        raise UserError(f"{what} has no entry for parameter {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise UserError(f"{what} has an unknown parameter {extra[0]!r} ({len(extra)} not in the model)")
    for name, tensor in found.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{what}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"{what}: parameter {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what}: parameter {name!r} holds NaN or infinite values")


def load_state_into(module: nn.Module, path: Path, what: str | None = None) -> nn.Module:
    """Load a state_dict file into ``module`` after checking every name, shape and value."""
    state = load_torch(path)
    check_tensors(state, module.state_dict(), what or str(path))
    module.load_state_dict(state)
    return module


def task_folder(models_dir: str | Path, task_no: int) -> Path:
    return Path(models_dir) / f"Task_{task_no}"


def save_shared_model(shared: nn.Module, models_dir: str | Path) -> None:
    save_torch(shared.state_dict(), Path(models_dir) / SHARED_MODEL)


def load_shared_state(shared: nn.Module, models_dir: str | Path) -> nn.Module:
    """The weights of ``shared_model.pth`` into a trunk of the run's architecture."""
    return load_state_into(shared, Path(models_dir) / SHARED_MODEL)


def save_head(head: nn.Linear, models_dir: str | Path, task_no: int) -> None:
    save_torch(head.state_dict(), task_folder(models_dir, task_no) / HEAD)


def load_head(models_dir: str | Path, task_no: int, in_features: int, num_classes: int | None) -> nn.Linear:
    """Task ``task_no``'s head, a Linear(in_features, num_classes): a file of another shape (from another
    task or run, or tampered with) is one UserError naming it, what it holds and what was expected.
    ``num_classes`` None: any number of outputs (the caller checks them, see scenario.check_loaded_heads)."""
    path = task_folder(models_dir, task_no) / HEAD
    state = load_torch(path)
    weight = state.get("weight") if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UserError(f"{path} is not a classification head (no 2-d 'weight')")
    num_classes = weight.shape[0] if num_classes is None else num_classes
    if tuple(weight.shape) != (num_classes, in_features):
        raise UserError(
            f"{path} holds a head of {weight.shape[0]} outputs over {weight.shape[1]} features, but Task_{task_no} "
            f"has {num_classes} classes and the trunk gives {in_features} features"
        )
    head = nn.Linear(in_features, num_classes)
    check_tensors(state, head.state_dict(), str(path))
    head.load_state_dict(state)
    return head


def write_task_files(models_dir: str | Path, task_no: int, accuracy: float, classes: list[str]) -> None:
    folder = task_folder(models_dir, task_no)
    save_text(f"{accuracy:.6f}\n", folder / PERFORMANCE)
    save_text(f"{len(classes)}\n" + "".join(f"{c}\n" for c in classes), folder / CLASSES)


def read_performance(models_dir: str | Path, task_no: int) -> float:
    path = task_folder(models_dir, task_no) / PERFORMANCE
    try:
        return float(path.read_text().strip())
    except FileNotFoundError as err:
        raise UserError(f"missing file {path}; was task {task_no} trained into this folder?") from err
    except ValueError as err:
        raise UserError(f"{path} does not hold an accuracy: {err}") from err
