"""Local (Hebbian) Memory Aware Synapses (Aljundi et al., ECCV 2018, Sec. 4).

Each layer is a function of its own input: Omega_ij is the mean over samples of
| d ||y_l||_2^2 / d W_ij |, which for a Linear+ReLU layer is 2 |y_i x_j|, the Hebbian product of
the activities of the two neurons the weight connects (see importance.local_mas_importance).
"""

from __future__ import annotations

from methods import Method, register


@register
class LocalMas(Method):
    name, summary = "local_mas", "local (Hebbian) MAS: each layer's own output norm (Sec. 4)"
    estimator = "local_mas_importance"
