"""Training presets: what ``main.py`` defaults to for each data set that ``data_prep.py`` prepares.

They live on the training side, keyed by the manifest's ``dataset``, so that the data folder holds
data only: renaming a ``main.py`` flag changes this table, not every prepared folder. Precedence
(``config.py``): a flag given on the command line > the manifest's own ``defaults``/``default_arch``
(older manifests carry them, and hand-made data may) > this table > main.py's built-in defaults
(the seed's AlexNet settings).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

_GREY_DIGITS = {"arch": "mlp", "pretrained": False, "num_freeze_layers": 0, "num_workers": 0}
_CIFAR = {"arch": "convnet", "pretrained": False, "num_freeze_layers": 0, "init_lr": 0.01, "num_epochs": 30}

PRESETS: MappingProxyType[str, dict[str, Any]] = MappingProxyType(
    {
        # Binary digit tasks are easy: with the seed's lr 0.001 and 10 epochs fine-tuning forgets
        # nothing, so these make forgetting (and what MAS prevents) visible.
        "digits": {**_GREY_DIGITS, "init_lr": 0.02, "num_epochs": 30},
        # main.py's learning rate and epochs (0.001, 10) are kept: not tuned on the real MNIST.
        "mnist": dict(_GREY_DIGITS),
        "cifar10": {**_CIFAR, "batch_size": 64},
        "cifar100": {**_CIFAR, "batch_size": 64},
        "tiny-imagenet": {"arch": "alexnet"},  # the seed's settings are main.py's built-in defaults
    }
)


def presets_for(manifest: dict[str, Any]) -> dict[str, Any]:
    """The flags' defaults for this data: the table's for its data set, overridden by what the manifest
    itself carries (``defaults``, ``default_arch``); ``arch`` is always set (AlexNet, as the seed)."""
    defaults = dict(PRESETS.get(manifest.get("dataset"), {}))
    defaults.update(manifest.get("defaults", {}))
    if "default_arch" in manifest:
        defaults["arch"] = manifest["default_arch"]
    defaults.setdefault("arch", "alexnet")
    return defaults
