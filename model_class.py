"""Shared trunk and per-task classification heads.

Memory Aware Synapses (Aljundi et al., ECCV 2018) is evaluated in the multi-head
setting (Sec. 5.1): one network F = head_t o shared is trained per task t, the
shared trunk carries over from task to task and is what MAS protects, and each
task keeps its own head. The function whose sensitivity MAS measures (Eq. 4) is
this composition, F(x) = head_t(shared(x)).

Three trunks:
- ``alexnet``: torchvision's AlexNet without its last Linear layer, so its output
  is the 4096-d fc7 activation; the head is ``Linear(4096, n_classes)``.
- ``mlp``: flatten -> Linear(d, 256) -> ReLU -> Linear(256, 256) -> ReLU, for
  small grey-scale digits; the head is ``Linear(256, n_classes)``.
- ``convnet``: the 4-conv + 2-FC network of Split CIFAR in the continual-learning literature (the
  CIFAR network of Zenke et al., ICML 2017, after Keras' CIFAR-10 example): conv 3x3 32 (same) ->
  ReLU -> conv 3x3 32 (valid) -> ReLU -> max-pool 2 -> dropout 0.25 -> conv 3x3 64 (same) -> ReLU ->
  conv 3x3 64 (valid) -> ReLU -> max-pool 2 -> dropout 0.25 -> flatten -> Linear(64*6*6, 512) -> ReLU
  -> dropout 0.5 (at 32x32); the head is ``Linear(512, n_classes)``, the second FC layer.

Freezing (``create_freeze_layers``) and the parameters that train (``trainable_parameters``)
belong to the trunk too: frozen parameters carry no importance and no penalty.
"""

from __future__ import annotations

import torch
from torch import nn

from utils import UserError
from utils.artefacts.model_files import check_tensors, pretrained_alexnet_state

ARCHS = ("alexnet", "mlp", "convnet")
MLP_HIDDEN = 256
CONVNET_FEATURES = 512


class AlexNetTrunk(nn.Module):
    """AlexNet up to fc7 + ReLU; parameter names are torchvision's (``features.0.weight``, ...)."""

    out_features = 4096
    # Three max-pools of 3x3/2 after the 11x11/4 convolution: below 63 pixels the last one has no input.
    min_image_size = 63

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import alexnet  # torchvision costs two seconds of start-up: only for AlexNet

        full = alexnet(weights=None)
        self.features = full.features
        self.avgpool = full.avgpool
        # Drop the last Linear (classifier.6): it becomes the per-task head.
        self.classifier = nn.Sequential(*list(full.classifier.children())[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def freezable_layers(self) -> list[str]:
        """Names of the convolution layers of ``features``, from the input."""
        return [f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]


class MlpTrunk(nn.Module):
    """Two hidden layers of 256 ReLU units over the flattened image."""

    out_features = MLP_HIDDEN
    min_image_size = 1

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def freezable_layers(self) -> list[str]:
        """Names of the Linear layers, from the input."""
        return [f"net.{i}" for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]


class ConvNetTrunk(nn.Module):
    """Four 3x3 convolutions in two blocks, then one 512-unit layer (see the module docstring)."""

    out_features = CONVNET_FEATURES
    # Each block: a valid 3x3 convolution (-2 pixels), then a 2x2 max-pool: 10 pixels leave 1x1.
    min_image_size = 10

    def __init__(self, channels: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *self._block(channels, 32),
            *self._block(32, 64),
        )
        side = ((image_size - 2) // 2 - 2) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, CONVNET_FEATURES),
            nn.ReLU(),
            nn.Dropout(0.5),
        )

    @staticmethod
    def _block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def freezable_layers(self) -> list[str]:
        """The convolutions of ``features``, from the input, then the Linear layer."""
        convs = [f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        return [*convs, "classifier.1"]


class TaskModel(nn.Module):
    """F = head(shared(x)): the network used while training, scoring and testing one task."""

    def __init__(self, shared: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.shared = shared
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(x))


TRUNKS = {"alexnet": AlexNetTrunk, "mlp": MlpTrunk, "convnet": ConvNetTrunk}


def check_image_size(arch: str, image_size: int) -> None:
    """The smallest input the trunk accepts, checked before anything runs."""
    smallest = TRUNKS[arch].min_image_size
    if image_size < smallest:
        raise UserError(
            f"--image_size {image_size} is too small for --arch {arch}: it takes at least {smallest} pixels"
        )


def build_trunk(arch: str, channels: int, image_size: int) -> nn.Module:
    """A freshly initialised trunk (its initialisation draws from torch's global RNG)."""
    if arch == "alexnet":
        return AlexNetTrunk()
    if arch == "mlp":
        return MlpTrunk(channels * image_size * image_size)
    if arch == "convnet":
        return ConvNetTrunk(channels, image_size)
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def build_head(trunk: nn.Module, n_classes: int) -> nn.Linear:
    """A new classification head for a task with ``n_classes`` classes."""
    return nn.Linear(trunk.out_features, n_classes)


def build_shared_model(arch: str, channels: int, image_size: int, pretrained: bool) -> nn.Module:
    """The trunk for task 1: random, or AlexNet with ImageNet weights (minus the last Linear)."""
    trunk = build_trunk(arch, channels, image_size)
    if pretrained:
        if arch != "alexnet":
            raise UserError(f"--pretrained needs --arch alexnet (there are no pretrained {arch} weights)")
        state = {k: v for k, v in pretrained_alexnet_state().items() if not k.startswith("classifier.6.")}
        check_tensors(state, trunk.state_dict(), "the ImageNet AlexNet weights")
        trunk.load_state_dict(state)
    return trunk


def create_freeze_layers(shared: nn.Module, num_freeze_layers: int) -> list[str]:
    """Freeze the first ``num_freeze_layers`` layers of the trunk (AlexNet: convolutions
    of ``features``; MLP: Linear layers, from the input). Returns the frozen parameter names.
    Frozen parameters are not trained, carry no importance and no penalty."""
    layers = shared.freezable_layers()
    if not 0 <= num_freeze_layers <= len(layers):
        raise UserError(
            f"--num_freeze_layers must be between 0 and {len(layers)} "
            f"(the trunk has {len(layers)} such layers), got {num_freeze_layers}"
        )
    frozen = []
    for layer in layers[:num_freeze_layers]:
        for name, param in shared.get_submodule(layer).named_parameters():
            param.requires_grad_(False)
            frozen.append(f"{layer}.{name}")
    return frozen


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name: what importance, theta* and the penalty are keyed by."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}
