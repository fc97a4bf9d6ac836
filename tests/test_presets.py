"""Training presets live on the training side (presets.py), keyed by the manifest's data set; manifests
written before that (which carry ``defaults``/``default_arch``) load with the same effective flags."""

from __future__ import annotations

import json

from conftest import make_test_config, write_dataset
from presets import PRESETS, presets_for


def _with_dataset(data, dataset: str, carry_old_presets: bool) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["dataset"] = dataset
    manifest.pop("defaults")
    manifest.pop("default_arch")
    if carry_old_presets:  # what data_prep.py wrote for digits before the presets moved
        manifest |= {"default_arch": "mlp", "defaults": {k: v for k, v in PRESETS["digits"].items() if k != "arch"}}
    (data / "manifest.json").write_text(json.dumps(manifest))


def test_an_old_manifest_with_presets_gives_the_same_run_as_a_new_one(tmp_path):
    old, new = (write_dataset(tmp_path / name, size=8) for name in ("old", "new"))
    _with_dataset(old, "digits", carry_old_presets=True)
    _with_dataset(new, "digits", carry_old_presets=False)
    configs = [make_test_config(d, tmp_path / "m").recorded() for d in (old, new)]
    for config in configs:
        config.pop("data_dir")
    assert configs[0] == configs[1]
    assert (configs[1]["arch"], configs[1]["init_lr"], configs[1]["num_epochs"]) == ("mlp", 0.02, 30)


def test_what_a_manifest_carries_wins_over_the_table():
    manifest = {"dataset": "digits", "defaults": {"num_epochs": 3}, "default_arch": "convnet"}
    assert presets_for(manifest) == {**PRESETS["digits"], "num_epochs": 3, "arch": "convnet"}


def test_data_of_no_known_data_set_gets_alexnet_and_the_built_in_defaults():
    assert presets_for({"dataset": "my-own-images"}) == {"arch": "alexnet"}


def test_a_flag_on_the_command_line_wins_over_the_preset(tmp_path):
    data = write_dataset(tmp_path / "Data", size=8)
    _with_dataset(data, "digits", carry_old_presets=False)
    assert make_test_config(data, tmp_path / "m", num_epochs=2).num_epochs == 2
