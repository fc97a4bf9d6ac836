"""Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars, ECCV 2018).

Omega is the sensitivity of the learned function F to each parameter, the mean over the task's
training samples of | d ||F(x_k)||_2^2 / d theta | (Eq. 2 and 4), measured without labels.
``--omega_estimator batch`` takes the absolute value of a whole batch's gradient (the authors'
code); ``per_sample`` is the paper's definition exactly (see importance.py).
"""

from __future__ import annotations

import argparse

from methods import Method, register


@register
class Mas(Method):
    """Omega of Eq. 2 and 4 by one of two estimators; the batch one depends on the batch size."""

    name, summary = "mas", "Memory Aware Synapses: Omega from the gradient of the output's squared L2 norm (Eq. 2, 4)"

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--omega_estimator",
            choices=("batch", "per_sample"),
            default="batch",
            help="for --method mas: batch = |gradient of a batch sum| (the authors' default), "
            "per_sample = the paper's exact per-sample definition (default: %(default)s)",
        )

    def label(self) -> str:
        return f"mas {self.option('omega_estimator')}, lambda={self.config.reg_lambda:g}"

    @property
    def estimator(self) -> str:
        return "mas_per_sample_importance" if self.option("omega_estimator") == "per_sample" else "mas_batch_importance"
