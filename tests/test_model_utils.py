"""Pretrained AlexNet weights through the real download code, from a server on 127.0.0.1."""

from __future__ import annotations

import hashlib

import pytest
import torch

from model_class import AlexNetTrunk, build_shared_model
from utils import UserError
from utils.artefacts import model_files


def _fake_imagenet_alexnet(path) -> dict[str, torch.Tensor]:
    """A full-shape AlexNet state_dict (ImageNet head included) in float16 to keep it small."""
    torch.manual_seed(0)
    trunk = AlexNetTrunk()
    state = {k: torch.randn_like(v).half() for k, v in trunk.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(1000, 4096, dtype=torch.half)
    state["classifier.6.bias"] = torch.zeros(1000, dtype=torch.half)
    torch.save(state, path)
    return state


def test_pretrained_weights_download_once_and_load(http_server, tmp_path, monkeypatch):
    root, base_url = http_server
    tmp = root / "weights.pth"
    state = _fake_imagenet_alexnet(tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"alexnet-test-{digest[:8]}.pth"  # torch.hub checks this hash prefix
    tmp.rename(root / name)
    monkeypatch.setattr(model_files, "ALEXNET_WEIGHTS_URL", f"{base_url}/{name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    trunk = build_shared_model("alexnet", 3, 64, pretrained=True)
    assert torch.equal(trunk.features[0].weight, state["features.0.weight"].float())
    assert torch.equal(trunk.classifier[4].bias, state["classifier.4.bias"].float())
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / name).is_file()
    (root / name).unlink()  # the second build must come from the cache, not the server
    again = build_shared_model("alexnet", 3, 64, pretrained=True)
    assert torch.equal(again.features[0].weight, trunk.features[0].weight)


def test_offline_without_cached_weights_names_the_file_and_the_way_out(closed_port_url, tmp_path, monkeypatch):
    monkeypatch.setattr(model_files, "ALEXNET_WEIGHTS_URL", f"{closed_port_url}/alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(UserError) as err:
        build_shared_model("alexnet", 3, 64, pretrained=True)
    message = str(err.value)
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "--no-pretrained" in message
    assert "\n" not in message


def test_pretrained_needs_alexnet():
    with pytest.raises(UserError, match="--pretrained needs --arch alexnet"):
        build_shared_model("mlp", 1, 8, pretrained=True)
