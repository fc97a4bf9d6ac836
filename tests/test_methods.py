"""Every method runs the digits sequence through the same pipeline and writes the same artefacts."""

from __future__ import annotations

import pytest
import torch

from data_prep import main as data_prep
from main import main
from utils.artefacts.files import load_tensor_pickle

TREE = {"data_files.json", "reg_params.pickle", "shared_model.pth", "results.json", "accuracy_matrix.csv"} | {
    f"Task_{t}/{f}" for t in range(1, 6) for f in ("head.pth", "performance.txt", "classes.txt")
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "Data"
    data_prep(["--dataset", "digits", "--data_dir", str(out)])
    return out


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "mas"],
        ["--method", "mas", "--omega_estimator", "per_sample"],
        ["--method", "local_mas"],
        ["--method", "ewc"],
        ["--method", "si", "--si_xi", "0.5"],
        ["--method", "finetune"],
    ],
    ids=lambda f: "-".join(f[1::2]),
)
def test_every_method_writes_the_same_artefact_tree(digits, tmp_path, flags):
    models = tmp_path / "models"
    results = main(["--data_dir", str(digits), "--models_dir", str(models), "--num_epochs", "1", *flags])
    assert {str(p.relative_to(models)) for p in models.rglob("*") if p.is_file()} == TREE
    assert [r["task"] for r in results["forgetting"]] == [1, 2, 3, 4, 5]
    reg_params = load_tensor_pickle(models / "reg_params.pickle")
    assert sorted(reg_params) == ["net.1.bias", "net.1.weight", "net.3.bias", "net.3.weight"]
    total = sum(float(e["omega"].abs().sum()) for e in reg_params.values())
    if flags[1] == "finetune":
        assert total == 0.0
    else:
        assert total > 0.0 and all(torch.isfinite(e["omega"]).all() for e in reg_params.values())


@pytest.mark.parametrize(
    "flags,called",
    [
        (["--method", "mas"], "mas_batch_importance"),
        (["--method", "mas", "--omega_estimator", "per_sample"], "mas_per_sample_importance"),
        (["--method", "local_mas"], "local_mas_importance"),
        (["--method", "ewc"], "ewc_fisher"),
        (["--method", "si"], "si_importance"),
    ],
)
def test_each_method_runs_its_own_estimator_once_per_task(digits, tmp_path, monkeypatch, flags, called):
    import importance
    from methods import si

    calls = []
    names = ["mas_batch_importance", "mas_per_sample_importance", "local_mas_importance", "ewc_fisher", "si_importance"]
    for name in names:
        module = si if name == "si_importance" else importance  # SI's estimator lives with its method
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    main(["--data_dir", str(digits), "--models_dir", str(tmp_path / "m"), "--num_epochs", "1", *flags])
    assert calls == [called] * 5
