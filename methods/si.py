"""Synaptic Intelligence (Zenke, Poole, Ganguli, ICML 2017) in the MAS framework.

During training ``LocalSgd`` accumulates the path integral omega = -sum_steps g * delta_theta of every
trainable parameter (g the data gradient); after the task Omega = max(omega, 0) / ((delta theta)^2 + xi)
(Eq. 5; see importance.si_importance for the clamp).
"""

from __future__ import annotations

import argparse

import importance
from methods import Importance, Method, register
from model_class import trainable_parameters
from reg_params import theta_star
from utils.cli import positive_float


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
        return importance.si_importance(self.optimizer, model.shared, self.theta_start, self.option("si_xi"))
