"""The MAS regularisation state ``reg_params`` and its life cycle across tasks
(Memory Aware Synapses, Aljundi et al., ECCV 2018, Eq. 3: the penalty
reg_lambda * sum_ij Omega_ij (theta_ij - theta*_ij)^2 needs Omega and theta* of every parameter).

``reg_params`` maps the NAME of every trainable parameter of the shared model
(``features.3.weight``, ...) to ``{'omega', 'init_val', 'prev_omega'}`` CPU tensors:

- ``omega``: the importance Omega used by the penalty lambda * Omega (theta - theta*)^2 (Eq. 3);
- ``init_val``: theta*, the weights the penalty pulls towards (the seed's name, kept in this
  seed-compatible format; the code calls it ``theta_star`` everywhere else);
- ``prev_omega``: Omega accumulated over the tasks before the current one.

It is keyed by name, never by Parameter object: the seed implementation keyed it by
Parameter objects, which hash by identity, so after pickling and rebuilding the model
no key matched and the penalty silently never applied.

Life cycle (the authors' code, with the consolidation done before saving):

    task 1:    init_reg_params               omega = prev_omega = 0, init_val = theta
    task t>1:  init_reg_params_across_tasks  prev_omega <- omega, init_val <- theta (= theta*_{t-1})
               train with the penalty on omega (= Omega_total of tasks 1..t-1)
    any task:  consolidate_reg_params        omega <- prev_omega + Omega_t, init_val <- theta*_t
               save reg_params.pickle (it holds Omega_total of tasks 1..t)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model_class import trainable_parameters
from utils import UserError
from utils.artefacts.files import load_tensor_pickle, save_pickle
from utils.artefacts.model_files import REG_PARAMS, check_tensors

REG_KEYS = ("omega", "init_val", "prev_omega")
RegParams = dict[str, dict[str, torch.Tensor]]


def _snapshot(param: torch.Tensor) -> torch.Tensor:
    return param.detach().to("cpu", copy=True)


def init_reg_params(shared: nn.Module) -> RegParams:
    """Task 1: zero importance, theta* = the current weights."""
    return {
        name: {
            "omega": torch.zeros_like(_snapshot(p)),
            "init_val": _snapshot(p),
            "prev_omega": torch.zeros_like(_snapshot(p)),
        }
        for name, p in trainable_parameters(shared).items()
    }


def init_reg_params_across_tasks(reg_params: RegParams, shared: nn.Module) -> RegParams:
    """Task t > 1: remember Omega so far, anchor the penalty at the current weights."""
    check_reg_params(reg_params, shared, "reg_params")
    return {
        name: {
            "omega": reg_params[name]["omega"].clone(),
            "init_val": _snapshot(p),
            "prev_omega": reg_params[name]["omega"].clone(),
        }
        for name, p in trainable_parameters(shared).items()
    }


def consolidate_reg_params(reg_params: RegParams, omega_new: dict[str, torch.Tensor], shared: nn.Module) -> RegParams:
    """Omega_total = Omega_prev + Omega_new (a plain sum, as the authors' code); theta* = current weights."""
    params = trainable_parameters(shared)
    check_tensors(omega_new, params, "the importance of this task")
    return {
        name: {
            "omega": reg_params[name]["prev_omega"] + omega_new[name].detach().cpu(),
            "init_val": _snapshot(p),
            "prev_omega": reg_params[name]["prev_omega"].clone(),
        }
        for name, p in params.items()
    }


def theta_star(reg_params: RegParams) -> dict[str, torch.Tensor]:
    """theta*, the anchor of the penalty (stored as ``init_val``)."""
    return {name: entry["init_val"] for name, entry in reg_params.items()}


def attach_importance(optimizer, shared: nn.Module, reg_params: RegParams) -> None:
    """Hand Omega and theta* of every trainable parameter to a ``LocalSgd``."""
    anchor = theta_star(reg_params)
    for name, param in trainable_parameters(shared).items():
        optimizer.set_importance(param, reg_params[name]["omega"], anchor[name])


def penalty_stiffness(reg_params: RegParams, lr: float, reg_lambda: float) -> float:
    """lr * 2 * reg_lambda * max(Omega): the largest curvature of the penalty times the step size.

    SGD with momentum m on a quadratic of curvature h is stable only while lr * h < 2 (1 + m);
    above that the penalty itself makes the weights oscillate and the loss diverge.
    """
    largest = max((float(e["omega"].max()) for e in reg_params.values() if e["omega"].numel()), default=0.0)
    return lr * 2.0 * reg_lambda * largest


def at_task_start(stored: dict[str, dict[str, torch.Tensor]]) -> RegParams:
    """reg_params as a task starts, from the Omega and theta* a checkpoint stores: at a task's start
    prev_omega == omega (see init_reg_params_across_tasks), so a checkpoint stores Omega once."""
    return {name: {**entry, "prev_omega": entry["omega"].clone()} for name, entry in stored.items()}


def check_reg_params(reg_params: object, shared: nn.Module, what: str) -> None:
    """Names, keys and shapes must match the trainable parameters of ``shared``."""
    if not isinstance(reg_params, dict) or not all(isinstance(k, str) for k in reg_params):
        raise UserError(f"{what} is not a dict keyed by parameter name")
    for key in REG_KEYS:
        entries = {}
        for name, entry in reg_params.items():
            if not isinstance(entry, dict) or key not in entry:
                raise UserError(f"{what}: parameter {name!r} has no {key!r}")
            entries[name] = entry[key]
        check_tensors(entries, trainable_parameters(shared), what)


def save_reg_params(reg_params: RegParams, models_dir: str | Path) -> None:
    save_pickle(reg_params, Path(models_dir) / REG_PARAMS)


def load_reg_params(models_dir: str | Path, shared: nn.Module) -> RegParams:
    path = Path(models_dir) / REG_PARAMS
    reg_params = load_tensor_pickle(path)
    check_reg_params(reg_params, shared, str(path))
    return reg_params
