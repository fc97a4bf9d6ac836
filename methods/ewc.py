"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) in the MAS framework.

Omega is the diagonal empirical Fisher information, (1/N) sum_k (d log p(y_k | x_k) / d theta)^2 with
the true labels, computed per sample exactly; the penalty is MAS's reg_lambda * sum Omega (theta - theta*)^2
(EWC's lambda/2 convention differs by a factor 2 absorbed in reg_lambda).
"""

from __future__ import annotations

from methods import Method, register


@register
class Ewc(Method):
    name, summary = "ewc", "EWC baseline: diagonal empirical Fisher information"
    estimator = "ewc_fisher"
