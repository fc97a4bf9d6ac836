"""sweep.py: real main.py processes on a tiny generated sequence (2 tasks, 2 epochs).

The runs are shared: one sweep with --jobs 2 (mas at a stable and a diverging lambda, finetune),
reused by the table, rerun and selection tests, so the file stays within a few dozen runs' time.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, write_dataset
from sweep import choose_lambdas
from sweep import main as sweep

EPOCHS = ["--num_epochs", "2", "--batch_size", "4"]
STABLE, DIVERGING = 0.1, 1e30  # 1e30: the penalty's SGD step explodes in task 2 (checked below)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("sweep") / "Data")


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_run():
    """Two runs at a time on a shared machine: one thread each (the advice of the README)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def tail(data: Path) -> list[str]:
    return ["--", "--data_dir", str(data), *EPOCHS]


def s1_argv(data: Path, out: Path) -> list[str]:
    grid = ["--methods", "mas", "finetune", "--reg_lambda", str(STABLE), str(DIVERGING), "--seeds", "0", "1"]
    return [*grid, "--jobs", "2", "--out", str(out), *tail(data)]


@pytest.fixture(scope="module")
def s1(data, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("s1") / "sweep"
    return out, sweep(s1_argv(data, out))


def results(out: Path, slug: str) -> dict:
    return json.loads((out / "runs" / slug / "results.json").read_text())


def csv_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(row["method"], row["reg_lambda"]): row for row in csv.DictReader(handle)}


def test_table_is_the_mean_and_std_of_the_runs(s1):
    out, rows = s1
    table = csv_rows(out / "table.csv")
    assert list(table) == [("mas", "0.1"), ("mas", "1e+30"), ("finetune", "-")]
    md = (out / "table.md").read_text()
    for (method, reg_lambda), slug in (
        (("mas", "0.1"), "mas_lam0.1_seed{}"),
        (("finetune", "-"), "finetune_seed{}"),
    ):
        runs = [results(out, slug.format(seed)) for seed in (0, 1)]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["complete"] for r in runs)
        row = table[(method, reg_lambda)]
        assert (row["runs"], row["complete"], row["diverged"], row["failed"]) == ("2", "2", "0", "0")
        cells = []
        for key in ("average_accuracy", "average_forgetting_previous", "backward_transfer", "average_forgetting"):
            values = np.array([r[key] for r in runs])
            assert float(row[f"{key}_mean"]) == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(values.std(ddof=1), rel=1e-12, abs=1e-12)
            cells.append(f"{round(values.mean(), 2) + 0.0:.2f} ± {round(values.std(ddof=1), 2) + 0.0:.2f}")
        shown = "-" if reg_lambda == "-" else f"{float(reg_lambda):g}"
        assert f"| {method} | {shown} | 2 | 2 | 0 | 0 | {' | '.join(cells)} |" in md
    assert [(r["method"], r["reg_lambda"], r["runs"]) for r in rows] == [
        ("mas", STABLE, 2),
        ("mas", DIVERGING, 2),
        ("finetune", None, 2),
    ]
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_runs_once_per_seed_whatever_the_lambdas(s1):
    out, _ = s1
    assert sorted(p.name for p in (out / "runs").iterdir() if p.name.startswith("finetune")) == [
        "finetune_seed0",
        "finetune_seed1",
    ]
    assert sorted(p.name for p in (out / "logs").iterdir() if p.name.startswith("finetune")) == [
        "finetune_seed0.log",
        "finetune_seed1.log",
    ]
    assert results(out, "finetune_seed0")["method"] == "finetune"


def test_a_diverged_run_is_reported_not_dropped(s1):
    out, _ = s1
    for seed in (0, 1):
        diverged = results(out, f"mas_lam1e+30_seed{seed}")["diverged"]
        assert diverged["task"] == 2 and "the training loss became" in diverged["message"]
    row = csv_rows(out / "table.csv")[("mas", "1e+30")]
    assert (row["runs"], row["complete"], row["diverged"], row["failed"]) == ("2", "0", "2", "0")
    assert row["average_accuracy_mean"] == ""
    record = json.loads((out / "sweep.json").read_text())
    assert record["runs"]["mas_lam1e+30_seed0"]["status"] == "diverged"
    assert record["runs"]["mas_lam0.1_seed0"]["status"] == "complete"


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def test_a_rerun_skips_finished_and_diverged_runs(s1, data, capsys):
    out, rows = s1
    before = {name: _snapshot(out / name) for name in ("runs", "logs")}
    again = sweep(s1_argv(data, out))
    assert {name: _snapshot(out / name) for name in ("runs", "logs")} == before
    assert again == rows
    printed = capsys.readouterr().out
    assert "report: 6 runs, 6 finished earlier, 0 to run" in printed
    record = json.loads((out / "sweep.json").read_text())
    assert {e["action"] for e in record["runs"].values()} == {"skipped"}
    assert len(record["invocations"]) == 2


def _kill_at_first_checkpoint(command: list[str], models_dir: Path) -> None:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (models_dir / "checkpoint.pth").exists():
        assert process.poll() is None, "main.py ended before writing a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def test_an_interrupted_run_is_resumed_and_jobs_1_gives_the_table_of_jobs_2(s1, data, tmp_path):
    out = tmp_path / "sweep"
    models = out / "runs" / "mas_lam0.1_seed0"
    flags = ["--data_dir", str(data), *EPOCHS, "--method", "mas", "--reg_lambda", "0.1", "--seed", "0"]
    _kill_at_first_checkpoint([sys.executable, str(ROOT / "main.py"), *flags, "--models_dir", str(models)], models)
    partial = json.loads((models / "results.json").read_text()) if (models / "results.json").exists() else None
    assert partial is None or not partial["complete"]
    rows = sweep(["--methods", "mas", "--reg_lambda", "0.1", "--seeds", "0", "1", "--out", str(out), *tail(data)])
    record = json.loads((out / "sweep.json").read_text())
    assert record["runs"]["mas_lam0.1_seed0"]["action"] == "resumed"
    assert record["runs"]["mas_lam0.1_seed1"]["action"] == "ran"
    assert "resuming after epoch" in (out / "logs" / "mas_lam0.1_seed0.log").read_text()
    reference = s1[0] / "runs" / "mas_lam0.1_seed0"
    assert (
        results(out, "mas_lam0.1_seed0")["accuracy_matrix"]
        == json.loads((reference / "results.json").read_text())["accuracy_matrix"]
    )
    ours, theirs = (torch.load(m / "shared_model.pth", weights_only=True) for m in (models, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert rows == [r for r in s1[1] if r["reg_lambda"] == STABLE]  # jobs 1 here, jobs 2 in s1
    assert csv_rows(out / "table.csv")[("mas", "0.1")] == csv_rows(s1[0] / "table.csv")[("mas", "0.1")]


def test_selection_picks_the_lambda_the_runs_say_and_a_failed_run_exits_1(s1, data, tmp_path, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(s1[0], out)  # the runs of s1 are finished: only the new ones run
    failing = "finetune --use_gpu"  # fails in the run, not in the sweep's checks, on a machine without CUDA
    if torch.cuda.is_available():
        pytest.skip("--use_gpu does not fail here")
    grid = ["--methods", "mas", failing, "--reg_lambda", "0", str(STABLE), str(DIVERGING)]
    with pytest.raises(SystemExit) as exit_:
        sweep([*grid, "--select_seeds", "1", "--seeds", "0", "--jobs", "2", "--out", str(out), *tail(data)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: 1 of 5 runs failed (logs/finetune_use_gpu-")
    assert "--use_gpu was given but CUDA is not available" in err

    # The expected choice, from the runs' own results: best accuracy, then lower forgetting, then smaller lambda.
    candidates = [(lam, results(out, f"mas_lam{lam!r}_seed1")) for lam in (0.0, STABLE)]
    assert "diverged" in results(out, "mas_lam1e+30_seed1")
    best = min(candidates, key=lambda c: (-c[1]["average_accuracy"], c[1]["average_forgetting_previous"], c[0]))[0]
    selection = csv_rows(out / "selection_table.csv")
    assert [k for k, row in selection.items() if row["chosen"] == "True"] == [("mas", repr(best))]
    assert selection[("mas", "1e+30")]["diverged"] == "1"
    report = csv_rows(out / "table.csv")
    assert list(report) == [("mas", repr(best)), (failing, "-")]
    assert report[("mas", repr(best))]["average_accuracy_mean"] == repr(
        results(out, f"mas_lam{best!r}_seed0")["average_accuracy"]
    )
    assert report[(failing, "-")]["failed"] == "1"
    record = json.loads((out / "sweep.json").read_text())
    assert record["selection"]["chosen"] == {"mas": best}
    rule = "lambda chosen per method by mean test accuracy over seeds 1 (ties: lower test forgetting over tasks 1..T-1"
    assert record["selection"]["rule"][0].startswith(rule) and rule in (out / "table.md").read_text()
    assert "finetune_seed1" in record["runs"]  # a sweep with another grid keeps the earlier runs
    assert (out / "runs" / "finetune_seed1" / "results.json").exists()


def _row(reg_lambda, accuracy, forgetting, complete=2):
    return {
        "method": "m",
        "reg_lambda": reg_lambda,
        "runs": 2,
        "complete": complete,
        "average_accuracy_mean": accuracy,
        "average_forgetting_previous_mean": forgetting,
    }


def test_choose_lambdas_orders_by_accuracy_then_forgetting_then_lambda():
    assert choose_lambdas([_row(1.0, 90.0, 5.0), _row(0.1, 95.0, 9.0)]) == {"m": 0.1}
    assert choose_lambdas([_row(0.1, 95.0, 3.0), _row(1.0, 95.0, 1.0)]) == {"m": 1.0}
    assert choose_lambdas([_row(1.0, 95.0, 1.0), _row(0.1, 95.0, 1.0)]) == {"m": 0.1}
    assert choose_lambdas([_row(1.0, 99.0, 0.0, complete=1), _row(0.1, 50.0, 9.0)]) == {"m": 0.1}
    assert choose_lambdas([_row(1.0, None, None, complete=0)]) == {"m": None}


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--", "--models_dir", "x"], "--models_dir"),
        (["--", "--resume"], "--resume"),
        (["--", "--overwrite"], "--overwrite"),
        (["--", "--models", "x"], "--models_dir"),  # an abbreviation main.py would accept
        (["--", "--seed", "3"], "--seed"),
        (["--methods", "mas --reg_l 2"], "--reg_lambda"),  # an abbreviation: the grid takes --reg_lambda only
        (["--methods", "finetune --reg_lambda 2"], "finetune has no penalty"),
        (["--methods", "mas --reg_lambda"], "--reg_lambda needs at least one value"),
        (["--methods", "mas --reg_lambda 1 x"], "--reg_lambda x: must be a finite number >= 0"),
        (["--methods", "mas --reg_lambda 1 -1"], "--reg_lambda -1: must be a finite number >= 0"),
        (["--methods", "mas --reg_lambda 1 1"], "lists 1.0 twice"),
        (["--methods", "mas --reg_lambda 1 --lr 0.1 --reg_lambda 2"], "--reg_lambda is given twice"),
        (["--methods", "mas --reg_lambda 1", "mas --reg_lambda 2"], "--methods lists mas twice"),
        (["--select_on", "test"], "--select_on test needs --select_seeds"),
        (["--select_on", "bogus"], "--select_on"),
        (["--", "--num_epochs", "0"], "--num_epochs"),
        (["--", "--bogus"], "--bogus"),
        (["--methods", "bogus"], "bogus"),
        (["--reg_lambda", "-1"], "--reg_lambda"),
        (["--seeds", "0", "0"], "--seeds"),
        (["--num_epochs", "2"], "--num_epochs"),  # main.py's flag before --
    ],
)
def test_bad_flags_are_refused_in_one_line_with_exit_2(argv, named, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        sweep(["--out", str(out), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and named in err
    assert not out.exists()


def test_missing_data_is_one_error_line_with_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep(["--out", str(tmp_path / "out"), "--", "--data_dir", str(tmp_path / "nothing")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data folder" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_the_default_folder_depends_on_the_main_py_flags_only(tmp_path, monkeypatch):
    from sweep import parse_sweep_args

    monkeypatch.chdir(tmp_path)
    first = parse_sweep_args(["--seeds", "0", "--", "--num_epochs", "2"])[0].out
    assert first == parse_sweep_args(["--seeds", "0", "1", "--", "--num_epochs", "2"])[0].out
    assert first != parse_sweep_args(["--", "--num_epochs", "3"])[0].out
    assert first.startswith(os.path.join("sweeps", ""))
