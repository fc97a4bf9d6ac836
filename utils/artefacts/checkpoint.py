"""Per-epoch checkpoints of a MAS run, and what a resumed run may continue from.

After every epoch ``<models_dir>/checkpoint.pth`` holds everything the rest of the task
depends on: model (trunk + head), optimizer state (momentum buffers, SI's path integral),
the epoch (hence the learning-rate schedule position), the RNG states of torch, numpy and
Python, the task's ``reg_params`` as they were at its start (the anchor theta* and Omega of the
penalty, Eq. 3), the epoch history and the run's arguments. A task's artefacts are final once
``results.json`` lists it; its checkpoint is then deleted. Everything is written atomically
and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils import UserError, schema
from utils.artefacts.files import load_torch, save_torch
from utils.artefacts.results import PROGRAM

CHECKPOINT = "checkpoint.pth"
# Recorded, but free to change on --resume: they do not change what the run computes (the data
# is compared through its fingerprint, not its path). --num_workers does: random augmentations
# are drawn in the workers, and which worker serves which batch depends on their number.
FREE_ON_RESUME = frozenset({"plot", "models_dir", "data_dir"})
_IMPORTANCE_KEYS = ("omega", "theta_star")  # re-attached from reg_params, no need to store twice
_STATE_KEYS = ("momentum_buffer", "path_integral")


def _with_flags_added_later(stored: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with the flags that a run of an earlier version of this program did not record,
    set to the value that computes what that version computed: such a run read its images from
    the files every epoch, took the explicit penalty step in fp32, trained a head per task (the task
    scenario), held out no validation images, searched no hyperparameters, and its importance pass read
    batches of ``--batch_size``. So a run begun before a flag existed can be resumed (with ``--cache off``
    where the new default differs), and is never silently continued otherwise."""
    added_later = {
        "amp": "off",
        "cache": "off",
        "penalty_step": "explicit",
        "scenario": "task",
        "val_fraction": 0.0,
        "hparam_search": "off",
    }
    if "batch_size" in stored:
        added_later["importance_batch_size"] = stored["batch_size"]
    return {**added_later, **stored}


def argument_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``--flag old -> new`` for every argument that changes the result (both may be recorded
    arguments: a checkpoint's against its results.json)."""
    stored, current = _with_flags_added_later(stored), _with_flags_added_later(current)
    keys = sorted((set(stored) | set(current)) - FREE_ON_RESUME)
    return [f"--{k} {stored.get(k)!r} -> {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global RNG is what we restore)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    models_dir: str | Path,
    task_no: int,
    epoch: int,
    args: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    reg_params: dict,
    history: list[dict],
    rng_states: list[dict] | None = None,
    scaler_state: dict | None = None,
) -> None:
    """State after ``epoch`` (0-based) of task ``task_no``; ``args`` are the run's recorded arguments;
    ``rng_states``: every rank's RNG states (torchrun; this process's by default); ``scaler_state``:
    fp16's gradient scaler (--amp fp16)."""
    rng_states = rng_states or [rng_state()]
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {
        i: {k: v for k, v in s.items() if k not in _IMPORTANCE_KEYS} for i, s in optimizer_state["state"].items()
    }
    save_torch(
        _own_storages(
            {
                "format": 1,
                "program": PROGRAM,
                "task": task_no,
                "epoch": epoch,
                "args": args,
                "model": model.state_dict(),
                "optimizer": optimizer_state,
                # At a task's start prev_omega == omega (see reg_params.py): store it once.
                "reg_params": {n: {"omega": e["omega"], "init_val": e["init_val"]} for n, e in reg_params.items()},
                "history": history,
                "rng": rng_states[0],
                **({"rng_per_rank": rng_states} if len(rng_states) > 1 else {}),
                **({"scaler": scaler_state} if scaler_state is not None else {}),
            }
        ),
        Path(models_dir) / CHECKPOINT,
    )


def _own_storages(payload: Any) -> Any:
    """``payload`` with every tensor in a storage of exactly its own bytes: torch.save writes each
    storage once, whole, so a view would drag its base's storage into the file. Tensors that share a
    storage (the rank-0 RNG state in ``rng`` and ``rng_per_rank``) stay shared, hence stored once;
    nothing in a checkpoint aliases another entry otherwise (theta* and Omega are copies taken at the
    task's start, the optimizer's omega and theta_star are left out), so each tensor is stored once."""
    if isinstance(payload, torch.Tensor):
        whole = payload.untyped_storage().nbytes() == payload.numel() * payload.element_size()
        return payload if whole else payload.clone(memory_format=torch.contiguous_format)
    if isinstance(payload, dict):
        return {k: _own_storages(v) for k, v in payload.items()}
    if isinstance(payload, list):
        return [_own_storages(v) for v in payload]
    if isinstance(payload, tuple):
        return tuple(_own_storages(v) for v in payload)
    return payload


@dataclass(frozen=True)
class Checkpoint:
    """The state after epoch ``epoch`` (0-based) of task ``task``, as loaded and checked: what resuming
    the task needs. Its tensors are checked against the model by the task runner (mas.py), and its
    ``reg_params`` hold Omega and theta* as stored (reg_params.at_task_start restores the rest)."""

    path: Path
    task: int
    epoch: int
    args: dict[str, Any]  # the run's recorded arguments
    model: dict[str, torch.Tensor]  # trunk and head
    optimizer_state: dict[int, dict[str, torch.Tensor]]  # LocalSgd's per-parameter state, by index
    reg_params: dict[str, dict[str, torch.Tensor]]  # name -> {"omega", "init_val"}
    history: list[dict]  # every finished epoch of the task
    rng_per_rank: list[dict[str, Any]]  # every rank's RNG states (one entry without torchrun)
    scaler: dict | None  # fp16's gradient scaler

    def rng(self, rank: int) -> dict[str, Any]:
        """The RNG states this rank saved."""
        if rank >= len(self.rng_per_rank):
            raise UserError(
                f"the checkpoint holds the RNG states of {len(self.rng_per_rank)} ranks, not of rank {rank}"
            )
        return self.rng_per_rank[rank]

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: Path) -> Checkpoint:
        return cls(
            path=path,
            task=payload["task"],
            epoch=payload["epoch"],
            args=payload["args"],
            model=payload["model"],
            optimizer_state=payload["optimizer"]["state"],
            reg_params=payload["reg_params"],
            history=payload["history"],
            rng_per_rank=payload.get("rng_per_rank") or [payload["rng"]],
            scaler=payload.get("scaler") or None,
        )


def load_checkpoint(models_dir: str | Path, quick: bool = False) -> Checkpoint | dict[str, Any] | None:
    """The checkpoint of ``models_dir``, every entry checked; None if there is none. ``quick``: the raw
    payload, only checked to be one of this program's, memory-mapped, for recognising a run folder."""
    path = Path(models_dir) / CHECKPOINT
    if not path.exists():
        return None
    checkpoint = load_torch(path, mmap=quick)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != 1:
        raise UserError(f"{path} is not a checkpoint of this program")
    if quick:
        return checkpoint
    _check_checkpoint(checkpoint, str(path))
    return Checkpoint.from_payload(checkpoint, path)


def _check_checkpoint(checkpoint: dict[str, Any], where: str) -> None:
    """Types of every entry; the tensors are checked against the model by the task runner."""
    if schema.entry(checkpoint, "task", int, where) < 1 or schema.entry(checkpoint, "epoch", int, where) < 0:
        raise UserError(f"{where}: 'task' and 'epoch' are out of range")
    schema.entry(checkpoint, "args", dict, where)
    schema.items(schema.entry(checkpoint, "history", list, where), dict, f"{where}: 'history'")
    optimizer = schema.entry(checkpoint, "optimizer", dict, where)
    schema.entry(optimizer, "state", dict, f"{where}: 'optimizer'")
    for name, entry in schema.entry(checkpoint, "reg_params", dict, where).items():
        for key in ("omega", "init_val"):
            schema.entry(entry, key, torch.Tensor, f"{where}: reg_params[{name!r}]")
    _check_rng(schema.entry(checkpoint, "rng", dict, where), f"{where}: 'rng'")
    per_rank = schema.entry(checkpoint, "rng_per_rank", list, where, default=[])
    for rank, state in enumerate(schema.items(per_rank, dict, f"{where}: 'rng_per_rank'")):
        _check_rng(state, f"{where}: 'rng_per_rank'[{rank}]")
    schema.entry(checkpoint, "scaler", dict, where, default={})


def _check_rng(state: dict[str, Any], where: str) -> None:
    """Restore every RNG state into a scratch generator: what they refuse is refused here."""
    try:
        torch.Generator().set_state(state["torch"])
        n = state["numpy"]
        np.random.RandomState().set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        random.Random().setstate(state["python"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise UserError(f"{where} is not a valid random number generator state ({type(err).__name__})") from None


def check_optimizer_state(state: dict[str, Any], params: list[torch.nn.Parameter], where: str) -> dict[str, Any]:
    """The per-parameter state of a LocalSgd checkpoint (momentum buffers, SI's path integral) for
    ``params`` in order: known keys only, each tensor of its parameter's shape and finite."""
    for index, entry in state.items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise UserError(f"{where}: state for parameter {index!r}, but the optimizer has {len(params)}")
        for key, tensor in schema.entry({"s": entry}, "s", dict, where).items():
            if key not in _STATE_KEYS or not isinstance(tensor, torch.Tensor):
                raise UserError(f"{where}: parameter {index} has an unknown state {key!r}")
            if tensor.shape != params[index].shape or not torch.isfinite(tensor).all():
                raise UserError(f"{where}: {key} of parameter {index} has the wrong shape or non-finite values")
    return state


def remove_checkpoint(models_dir: str | Path) -> None:
    (Path(models_dir) / CHECKPOINT).unlink(missing_ok=True)
