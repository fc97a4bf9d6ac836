"""Continual-learning methods as plug-ins: one file per method (as FACIL's approaches).

Every method of this project is a quadratic regulariser in the form of Memory Aware Synapses
(Aljundi et al., ECCV 2018, Eq. 3): task t trains on  L_t(theta) + reg_lambda * sum Omega (theta - theta*)^2,
with theta* the weights after task t-1 and Omega the importance summed over tasks 1..t-1. A method
differs from another only in

- ``add_args(parser)``: its own flags; they are recorded in ``results.json`` and compared on ``--resume``;
- ``start_task(task_no, model, optimizer, reg_params)``: what it does before a task is trained; the default
  hands Omega and theta* to ``LocalSgd``, which adds the penalty's gradient locally (SI also starts its
  path integral; fine-tuning attaches nothing);
- ``importance(model, task)``: Omega of the task just trained, ``{param_name: tensor}`` over the trainable
  parameters of the shared trunk (called once, after training).

A module of this package that defines a ``Method`` subclass decorated with ``@register`` is a method:
``--method`` choices, the recorded flags and plot labels all come from here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

import importance
from importance import Importance  # noqa: F401 (the methods' type, from where estimators define it)
from model_class import trainable_parameters
from reg_params import RegParams, attach_importance, penalty_stiffness

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"two methods are called {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


class Method:
    """A continual-learning method: its flags, what it does at the start of a task, its importance."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help
    penalised: ClassVar[bool] = True  # False: no penalty is attached (fine-tuning)
    # The function of importance.py, (model, loader, device) -> Omega, that the default importance() runs.
    estimator: ClassVar[str | None] = None

    def __init__(self, config: Any, device: torch.device) -> None:
        self.config = config  # the run's RunConfig (config.py); method flags in config.method_options
        self.device = device

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Declare the method's own flags (``(default: %(default)s)`` in every help)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The destinations of the method's flags."""
        scratch = argparse.ArgumentParser(add_help=False)
        cls.add_args(scratch)
        return tuple(vars(scratch.parse_args([])))

    def option(self, name: str) -> Any:
        return self.config.method_options[name]

    def label(self) -> str:
        """How plots and tables name a run of this method."""
        return f"{self.name}, lambda={self.config.reg_lambda:g}"

    def start_task(self, task_no: int, model: nn.Module, optimizer: torch.optim.Optimizer, reg_params: RegParams):
        """Before training task ``task_no``: from task 2 on, penalise moving away from theta* (Eq. 3)."""
        if self.penalised and task_no > 1 and self.config.reg_lambda > 0:
            attach_importance(optimizer, model.shared, reg_params)
            self._warn_if_unstable(reg_params)

    def importance(self, model: nn.Module, task: Any) -> Importance:
        """Omega of the task just trained; ``model`` = shared trunk + that task's head, ``task`` its data
        (``task.importance``: the training images with the test transforms)."""
        if self.estimator is None:
            raise NotImplementedError(f"{type(self).__name__} names no estimator and defines no importance()")
        return getattr(importance, self.estimator)(model, task.importance, self.device)

    def zeros(self, model: nn.Module) -> Importance:
        """No importance for any trainable parameter of the trunk."""
        return {name: torch.zeros_like(p, device="cpu") for name, p in trainable_parameters(model.shared).items()}

    def _warn_if_unstable(self, reg_params: RegParams) -> None:
        """SGD with momentum m is stable on a quadratic of curvature h only while lr * h < 2 (1 + m)."""
        config = self.config
        if config.penalty_step != "explicit":
            return  # the proximal step is stable at any stiffness
        stiffness = penalty_stiffness(reg_params, config.init_lr, config.reg_lambda)
        limit = 2.0 * (1.0 + config.momentum)
        if stiffness >= limit:
            tqdm.write(
                f"warning: init_lr * 2 * reg_lambda * max(Omega) = {stiffness:.3g} exceeds {limit:.3g}, the "
                "stability limit of SGD on the penalty; training will likely diverge: use --penalty_step proximal "
                "(stable at any lambda) or lower --init_lr or --reg_lambda"
            )


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """Registered methods, ``mas`` first."""
    return tuple(sorted(REGISTRY, key=lambda name: (name != "mas", name)))


_discover()
