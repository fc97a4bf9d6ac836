"""The convnet trunk of Split CIFAR: its layers, its smallest input, and a run through main.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import write_dataset
from main import main
from model_class import ConvNetTrunk, create_freeze_layers


def test_the_layers_are_the_documented_ones_at_32x32():
    trunk = ConvNetTrunk(3, 32)
    convs = [m for m in trunk.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1)),
        (32, 32, (3, 3), (0, 0)),
        (32, 64, (3, 3), (1, 1)),
        (64, 64, (3, 3), (0, 0)),
    ]
    linear = trunk.classifier[1]
    assert (linear.in_features, linear.out_features) == (64 * 6 * 6, 512)
    assert trunk.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_the_smallest_input_is_10_pixels():
    assert ConvNetTrunk(1, 10).eval()(torch.zeros(1, 1, 10, 10)).shape == (1, 512)
    with pytest.raises(RuntimeError):
        ConvNetTrunk(1, 9)(torch.zeros(1, 1, 9, 9))


def test_freezing_goes_from_the_input():
    trunk = ConvNetTrunk(3, 16)
    assert create_freeze_layers(trunk, 2) == [
        "features.0.weight",
        "features.0.bias",
        "features.2.weight",
        "features.2.bias",
    ]
    assert not trunk.features[2].weight.requires_grad and trunk.features[6].weight.requires_grad


def test_a_split_cifar_shaped_run(tmp_path, capsys):
    defaults = {"pretrained": False, "num_freeze_layers": 0, "num_workers": 0}
    data = write_dataset(tmp_path / "Data", channels=3, size=12, defaults=defaults)
    manifest = (data / "manifest.json").read_text().replace('"mlp"', '"convnet"')
    (data / "manifest.json").write_text(manifest)
    results = main(
        ["--data_dir", str(data), "--models_dir", str(tmp_path / "m"), "--num_epochs", "2", "--batch_size", "4"]
    )
    assert results["args"]["arch"] == "convnet" and results["args"]["image_size"] == 12
    assert len(results["accuracy_matrix"]) == 2
    with pytest.raises(SystemExit):
        main(["--data_dir", str(data), "--models_dir", str(tmp_path / "n"), "--image_size", "9"])
    assert "too small for --arch convnet: it takes at least 10 pixels" in capsys.readouterr().err
