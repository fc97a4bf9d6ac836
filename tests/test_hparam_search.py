"""--hparam_search chf (hparam_search.py): the rule with a stubbed trainer, real searches, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_run, write_dataset
from hparam_search import PLASTICITY, STABILITY, chf_rule
from main import main

OPTIONS = {"chf_lrs": (0.1, 0.01, 0.001), "chf_lambda": 1e3, "chf_p": 0.2, "chf_decay": 0.5, "chf_max_tries": 7}
PLASTIC = {0.1: 70.0, 0.01: 90.0, 0.001: 60.0}  # peaks at 0.01: A* = 90, the threshold 72
DRIVER = "import runpy; runpy.run_path('tests/interrupt_driver.py', run_name='__main__')"
FLAGS = ["--num_epochs", "2", "--batch_size", "4", "--val_fraction", "0.25", "--hparam_search", "chf"]
CHF = ["--chf_lrs", "0.05", "0.01", "--chf_lambda", "8", "--chf_max_tries", "3", "--chf_epochs", "1"]


def _stub(calls: list):
    """Validation accuracy as a known function: PLASTIC[lr] fine-tuned, 90 * min(1, 80 / lambda) with a penalty."""

    def trial(stage: str, lr: float, reg_lambda: float | None) -> float:
        calls.append((stage, lr, reg_lambda))
        return PLASTIC[lr] if reg_lambda is None else 90.0 * min(1.0, 80.0 / reg_lambda)

    return trial


def test_the_rule_picks_the_best_lr_then_decays_lambda_until_the_threshold():
    calls = []
    assert chf_rule(_stub(calls), OPTIONS, search_lambda=True) == (0.01, 62.5)
    lambdas = [1000.0, 500.0, 250.0, 125.0, 62.5]  # 7.2, 14.4, 28.8, 57.6 % < 72 %; then 90 %
    assert calls == [(PLASTICITY, lr, None) for lr in (0.1, 0.01, 0.001)] + [(STABILITY, 0.01, x) for x in lambdas]


def test_the_rule_keeps_the_last_lambda_when_no_try_reaches_the_threshold():
    calls = []
    assert chf_rule(_stub(calls), {**OPTIONS, "chf_max_tries": 3}, search_lambda=True) == (0.01, 250.0)
    assert len(calls) == 6


def test_the_rule_accepts_the_first_lambda_that_reaches_the_threshold():
    calls = []
    assert chf_rule(_stub(calls), {**OPTIONS, "chf_lambda": 80.0}, search_lambda=True) == (0.01, 80.0)
    assert len(calls) == 4


def test_without_a_penalty_only_the_learning_rate_is_searched():
    calls = []
    assert chf_rule(_stub(calls), OPTIONS, search_lambda=False) == (0.01, None)
    assert [c[0] for c in calls] == [PLASTICITY] * 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("chf") / "Data", num_tasks=2, n_train=8, n_test=4)


def _argv(data: Path, models: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data), "--models_dir", str(models), *FLAGS, *CHF, *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("ref") / "models"
    main(_argv(data, models))
    return models


def _search(models: Path) -> list[dict]:
    return json.loads((models / "results.json").read_text())["hparam_search"]


def _check_search(entries: list[dict], penalised: bool) -> None:
    assert [e["task"] for e in entries] == [1, 2]
    for entry in entries:
        trials = entry["trials"]
        assert [(t["stage"], t["lr"], t["reg_lambda"]) for t in trials[:2]] == [
            (PLASTICITY, 0.05, None),
            (PLASTICITY, 0.01, None),
        ]
        best = max(trials[:2], key=lambda t: t["validation_accuracy"])  # max() keeps the first on ties
        assert entry["chosen"]["lr"] == best["lr"]
        if entry["task"] == 1 or not penalised:
            assert len(trials) == 2 and entry["chosen"]["reg_lambda"] is None
            continue
        lambdas = [t["reg_lambda"] for t in trials[2:]]
        assert lambdas == [8.0, 4.0, 2.0][: len(lambdas)] and entry["chosen"]["reg_lambda"] == lambdas[-1]
        threshold = 0.8 * best["validation_accuracy"]
        assert all(t["validation_accuracy"] < threshold for t in trials[2:-1])
        assert len(lambdas) == 3 or trials[-1]["validation_accuracy"] >= threshold


def test_a_real_search_finishes_and_records_its_trials(reference, capsys):
    entries = _search(reference)
    _check_search(entries, penalised=True)
    results = json.loads((reference / "results.json").read_text())
    assert results["complete"] and len(results["validation_accuracy_matrix"]) == 2
    assert results["args"]["chf_lrs"] == [0.05, 0.01] and results["args"]["chf_epochs"] == 1


def test_finetune_searches_only_the_learning_rate(data, tmp_path, capsys):
    main(_argv(data, tmp_path / "m", "--method", "finetune"))
    _check_search(_search(tmp_path / "m"), penalised=False)
    out = capsys.readouterr().out
    assert out.count("chf trial") == 4 and out.count("chf chose") == 2


def test_a_search_killed_after_its_first_trial_resumes_to_the_same_run(data, reference, tmp_path):
    models = tmp_path / "models"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the atomic writes: data_files.json (the run's record of its images), results.json holding the first trial,
    # then accuracy_matrix.csv: killed as the third begins
    killed = subprocess.run(
        [sys.executable, "-c", DRIVER, "save:3", "SIGKILL", *_argv(data, models)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, start_new_session=True,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [len(e["trials"]) for e in _search(models)] == [1]
    resumed = subprocess.run(
        [sys.executable, "main.py", *_argv(data, models), "--resume"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(models, reference)
    assert _search(models) == _search(reference)
    trials = sum(len(e["trials"]) for e in _search(reference))
    assert resumed.stdout.count("chf trial") == trials - 1  # the persisted trial is not trained again


def test_under_torchrun_every_rank_searches_and_the_choice_is_one_process_s(data, reference, tmp_path):
    models = tmp_path / "models"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, *_argv(data, models)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("chf chose") == 2  # rank 0 speaks
    ours, ref = _search(models), _search(reference)
    assert [e["chosen"] for e in ours] == [e["chosen"] for e in ref]
    assert [[t["validation_accuracy"] for t in e["trials"]] for e in ours] == [
        [t["validation_accuracy"] for t in e["trials"]] for e in ref
    ]
    results = [json.loads((m / "results.json").read_text()) for m in (models, reference)]
    assert results[0]["validation_accuracy_matrix"] == results[1]["validation_accuracy_matrix"]
