"""Synaptic Intelligence (Zenke, Poole, Ganguli, ICML 2017) in the MAS framework: all of SI in one file.

During training ``LocalSgd`` accumulates the path integral omega = -sum_steps g * delta_theta of every
trainable parameter that has one (g the data gradient; inside the optimizer's fused step, since it needs
each step's delta theta), started here at the beginning of each task; the checkpoint keeps it with the
optimizer's state. After the task Omega = max(omega, 0) / ((delta theta)^2 + xi) (Eq. 5), ``si_importance``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from methods import Importance, Method, register
from model_class import trainable_parameters
from reg_params import theta_star
from utils.cli import positive_float


def si_importance(optimizer, shared: nn.Module, theta_start: dict[str, torch.Tensor], xi: float) -> Importance:
    """SI (Zenke et al. 2017, Eq. 5): Omega = max(omega, 0) / ((theta_end - theta_start)^2 + xi), with
    omega the path integral -sum_steps g * delta_theta that ``LocalSgd`` accumulated over the task."""
    importance = {}
    for name, p in trainable_parameters(shared).items():
        path = optimizer.state[p].get("path_integral")
        if path is None:
            raise ValueError(f"no path integral for {name}: call LocalSgd.start_path_integral before training")
        drift = p.detach().cpu() - theta_start[name]
        # A negative path integral (moves that raised the loss on balance) would make the quadratic
        # penalty push the parameter away from theta* without bound: such entries get no importance.
        importance[name] = path.detach().cpu().clamp(min=0) / (drift.square() + xi)  # Eq. 5
    return importance


@register
class Si(Method):
    """The importance comes from the optimizer's path integral, started at the beginning of each task."""

    name, summary = "si", "SI baseline: the path integral of the loss along the training trajectory"

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--si_xi", type=positive_float, default=0.1, help="SI's damping xi (default: %(default)s)")

    def start_task(self, task_no, model, optimizer, reg_params) -> None:
        super().start_task(task_no, model, optimizer, reg_params)
        self.optimizer = optimizer
        self.theta_start = theta_star(reg_params)  # the weights at the start of the task
        for param in trainable_parameters(model.shared).values():
            if "path_integral" not in optimizer.state[param]:  # a resumed task keeps its integral
                optimizer.start_path_integral(param)

    def importance(self, model, task) -> Importance:
        return si_importance(self.optimizer, model.shared, self.theta_start, self.option("si_xi"))
