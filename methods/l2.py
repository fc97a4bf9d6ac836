"""L2 to the previous weights: the plainest quadratic regulariser, every parameter equally important.

In the MAS form (Eq. 3), task t trains on L_t + reg_lambda * sum Omega (theta - theta*)^2 with
Omega = 1 for every parameter of every finished task: after t-1 tasks Omega_total = t - 1, so the
pull towards the previous weights theta* grows with the number of tasks it protects.
"""

from __future__ import annotations

import torch

from methods import Importance, Method, register
from model_class import trainable_parameters


@register
class L2(Method):
    name, summary = "l2", "L2 baseline: Omega = 1, the squared distance to the previous task's weights"

    def importance(self, model, task) -> Importance:
        return {name: torch.ones_like(p, device="cpu") for name, p in trainable_parameters(model.shared).items()}
