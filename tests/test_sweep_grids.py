"""sweep.py without training: per-method lambda grids, the forgetting columns, selection on validation or
test accuracy, and the identical-to-finetune warning, on run folders that a fake launcher writes.

The fake launcher stands in for ``python3 main.py``: it writes the results.json main.py would write
(the run's recorded arguments, a given accuracy matrix and, optionally, a validation matrix), so the
sweep's planning, resumability checks, tables and notes run for real in milliseconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

import sweep as sweep_module
from config import parse_config
from conftest import write_dataset
from sweep import choose_lambdas, grid, parse_sweep_args
from sweep import main as sweep
from utils.artefacts.results import summarize

# Three tasks, two seeds. acc[i][j]: after task i, on task j.
MATRIX = {
    0: [[90.0, None, None], [80.0, 85.0, None], [70.0, 75.0, 95.0]],
    1: [[80.0, None, None], [70.0, 90.0, None], [50.0, 86.0, 99.0]],
}
# By hand, from the last rows. Seed 0: accuracy (70+75+95)/3 = 80, forgetting over tasks 1..2
# ((90-70)+(85-75))/2 = 15, over all 3 tasks 30/3 = 10. Seed 1: accuracy 235/3, forgetting
# ((80-50)+(90-86))/2 = 17, over all 3 tasks 34/3.
ACCURACY = (80.0, 235 / 3)
FORGETTING_PREVIOUS = (15.0, 17.0)
FORGETTING_ALL = (10.0, 34 / 3)


def shifted(matrix: list[list[float | None]], delta: float) -> list[list[float | None]]:
    return [[None if a is None else a + delta for a in row] for row in matrix]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("grids") / "Data", num_tasks=3, n_train=1, n_test=1)


class FakeMain:
    """Writes each run's results.json; ``outcome(run)`` gives (test matrix, validation matrix or None)."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome
        self.ran: list[str] = []

    def __call__(self, sweep_, run, argv, state):
        with sweep_module._at_root():
            recorded = parse_config(argv).recorded()
        matrix, validation = self.outcome(run)
        results = {
            "format": 1,
            "args": recorded,
            "method": run.method.name,
            "seed": run.seed,
            "task_names": [f"Task_{t + 1}" for t in range(len(matrix))],
            "tasks": [{"task": t + 1, "test_accuracy": row[t]} for t, row in enumerate(matrix)],
            "accuracy_matrix": matrix,
            "eval_every_task": True,
            "complete": True,
            **summarize(matrix),
        }
        if validation is not None:
            results["validation_accuracy_matrix"] = validation
            results["validation_average_accuracy"] = sum(validation[-1]) / len(validation[-1])
        folder = sweep_.out / "runs" / run.slug
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results))
        self.ran.append(run.slug)
        return 0, "", 0.0


def run_sweep(monkeypatch, outcome, argv: list[str], data: Path, out: Path) -> FakeMain:
    fake = FakeMain(outcome)
    monkeypatch.setattr(sweep_module, "_execute", fake)
    sweep([*argv, "--out", str(out), "--", "--data_dir", str(data)])
    return fake


def csv_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(row["method"], row["reg_lambda"]): row for row in csv.DictReader(handle)}


def slugs(argv: list[str]) -> list[str]:
    args, methods, _ = parse_sweep_args(argv)
    return [run.slug for run in grid(methods, args.reg_lambda, args.seeds)]


# ---------------------------------------------------------------- per-method grids


def test_each_method_runs_its_own_lambdas_and_the_others_the_global_ones():
    argv = ["--methods", "mas --reg_lambda 0.1 1 10", "ewc --reg_lambda 1e3 1e4 1e5", "si", "finetune"]
    assert slugs([*argv, "--reg_lambda", "0.5", "--seeds", "0", "1"]) == [
        *(f"mas_lam{lam}_seed{seed}" for lam in ("0.1", "1.0", "10.0") for seed in (0, 1)),
        *(f"ewc_lam{lam}_seed{seed}" for lam in ("1000.0", "10000.0", "100000.0") for seed in (0, 1)),
        "si_lam0.5_seed0",
        "si_lam0.5_seed1",
        "finetune_seed0",
        "finetune_seed1",
    ]


def test_an_old_style_command_plans_the_runs_it_planned_before():
    # The slugs of the sweep.py before per-method grids, for this command (its run folders and logs).
    argv = ["--methods", "mas", "mas --omega_estimator per_sample", "finetune", "--reg_lambda", "0.1", "1"]
    label = "mas_omega_estimator_per_sample-" + hashlib.sha1(b"mas --omega_estimator per_sample").hexdigest()[:6]
    assert label == "mas_omega_estimator_per_sample-d6106c"
    assert slugs([*argv, "--seeds", "0", "1"]) == [
        "mas_lam0.1_seed0",
        "mas_lam0.1_seed1",
        "mas_lam1.0_seed0",
        "mas_lam1.0_seed1",
        f"{label}_lam0.1_seed0",
        f"{label}_lam0.1_seed1",
        f"{label}_lam1.0_seed0",
        f"{label}_lam1.0_seed1",
        "finetune_seed0",
        "finetune_seed1",
    ]


def test_a_methods_own_lambdas_leave_its_label_and_run_folders_as_without_them(tmp_path):
    argv = ["--methods", "mas --reg_lambda 2 --omega_estimator per_sample", "--seeds", "3"]
    args, methods, _ = parse_sweep_args(argv)
    assert methods[0].label == "mas --omega_estimator per_sample" and methods[0].lambdas == (2.0,)
    (run,) = grid(methods, args.reg_lambda, args.seeds)
    assert run.slug == slugs(["--methods", "mas --omega_estimator per_sample", "--reg_lambda", "2", "--seeds", "3"])[0]
    assert run.main_argv(["--num_epochs", "1"], tmp_path) == [
        "--num_epochs",
        "1",
        "--omega_estimator",
        "per_sample",
        "--method",
        "mas",
        "--reg_lambda",
        "2.0",
        "--seed",
        "3",
        "--models_dir",
        str(tmp_path / "runs" / run.slug),
    ]
    assert parse_sweep_args(["--methods", "ewc --reg_lambda=5"])[1][0].lambdas == (5.0,)


def test_an_old_sweep_folder_is_continued_without_running_anything(data, tmp_path, monkeypatch):
    """A folder of the sweep.py before this change: results.json without the T-1 forgetting, an old
    sweep.json and the tables it wrote. The same command skips every run and rewrites the tables."""
    out = tmp_path / "sweep"
    argv = ["--methods", "mas", "finetune", "--reg_lambda", "0.1", "--seeds", "0"]
    run_sweep(monkeypatch, lambda run: (MATRIX[run.seed], None), argv, data, out)
    record = json.loads((out / "sweep.json").read_text())
    for slug in ("mas_lam0.1_seed0", "finetune_seed0"):  # written before the T-1 column was kept
        results = json.loads((out / "runs" / slug / "results.json").read_text())
        del results["average_forgetting_previous"]
        (out / "runs" / slug / "results.json").write_text(json.dumps(results))
    old_table = "method,reg_lambda,runs\nmas,0.1,1\nfinetune,-,1\n"
    (out / "table.csv").write_text(old_table)
    record["written"]["table.csv"] = hashlib.sha256(old_table.encode()).hexdigest()
    record["grid"] = {k: record["grid"][k] for k in ("methods", "reg_lambda", "seeds", "select_seeds", "main_flags")}
    for entry in record["runs"].values():
        del entry["accuracy_matrix"], entry["metrics"]["average_forgetting_previous"]
    (out / "sweep.json").write_text(json.dumps(record))

    fake = run_sweep(monkeypatch, lambda run: pytest.fail("nothing should run"), argv, data, out)
    assert fake.ran == []
    row = csv_rows(out / "table.csv")[("mas", "0.1")]
    assert float(row["average_forgetting_previous_mean"]) == FORGETTING_PREVIOUS[0]
    assert len(json.loads((out / "sweep.json").read_text())["invocations"]) == 2


# ---------------------------------------------------------------- forgetting columns


def test_forgetting_is_over_tasks_1_to_t_minus_1_and_the_all_task_mean_is_a_labelled_extra(
    data, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sweep"
    figures = []

    def keep_figure(fig, path):
        figures.append(fig)
        Path(path).write_bytes(b"figure")
        return Path(path)

    import utils.artefacts.plot

    monkeypatch.setattr(utils.artefacts.plot, "save_figure", keep_figure)
    argv = ["--methods", "finetune", "--seeds", "0", "1"]
    run_sweep(monkeypatch, lambda run: (MATRIX[run.seed], None), argv, data, out)
    row = csv_rows(out / "table.csv")[("finetune", "-")]
    assert float(row["average_forgetting_previous_mean"]) == pytest.approx(16.0, abs=1e-12)
    assert float(row["average_forgetting_previous_std"]) == pytest.approx(2**0.5, abs=1e-12)
    assert float(row["average_forgetting_mean"]) == pytest.approx(sum(FORGETTING_ALL) / 2, abs=1e-12)
    assert float(row["average_accuracy_mean"]) == pytest.approx(sum(ACCURACY) / 2, abs=1e-12)
    md = (out / "table.md").read_text()
    header = (
        "| method | reg_lambda | runs | complete | diverged | failed | average accuracy (%) | "
        "average forgetting (pp), tasks 1..T-1 | backward transfer (pp) | forgetting incl. last task (pp) |"
    )
    assert md.splitlines()[0] == header
    # accuracy 79.17 ± 1.18; forgetting 16 ± sqrt(2); backward transfer -16 ± sqrt(2); all tasks 10.67 ± 0.94
    assert (
        md.splitlines()[2]
        == "| finetune | - | 2 | 2 | 0 | 0 | 79.17 ± 1.18 | 16.00 ± 1.41 | -16.00 ± 1.41 | 10.67 ± 0.94 |"
    )
    assert header in capsys.readouterr().out
    (ax,) = figures[0].axes
    assert ax.get_xlabel() == "average forgetting (pp), tasks 1..T-1"
    assert list(ax.lines[0].get_xdata()) == pytest.approx([16.0])


# ---------------------------------------------------------------- selection

# mas at lambda 0.1 has the better test accuracy, at lambda 1 the better validation accuracy.
TEST_BETTER, VALIDATION_BETTER = 0.1, 1.0


def validated(run):
    better_on_test = run.reg_lambda == TEST_BETTER
    test = shifted(MATRIX[0], 2.0 if better_on_test else 0.0)
    return test, shifted(MATRIX[0], -2.0 if better_on_test else 0.0)


def unvalidated(run):
    return validated(run)[0], None


SELECT = ["--methods", "mas --reg_lambda 0.1 1", "--select_seeds", "100", "--seeds", "0"]


@pytest.mark.parametrize(
    "outcome, extra, chosen, basis",
    [
        (validated, [], VALIDATION_BETTER, "validation"),
        (unvalidated, [], TEST_BETTER, "test"),
        (validated, ["--select_on", "test"], TEST_BETTER, "test"),
        (validated, ["--select_on", "validation"], VALIDATION_BETTER, "validation"),
    ],
)
def test_selection_reads_validation_accuracy_when_every_run_has_it(
    outcome, extra, chosen, basis, data, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sweep"
    fake = run_sweep(monkeypatch, outcome, [*SELECT, *extra], data, out)
    assert fake.ran == ["mas_lam0.1_seed100", "mas_lam1.0_seed100", f"mas_lam{chosen!r}_seed0"]
    assert list(csv_rows(out / "table.csv")) == [("mas", repr(chosen))]
    rule = (
        f"lambda chosen per method by mean {basis} accuracy over seeds 100 "
        f"(ties: lower {basis} forgetting over tasks 1..T-1, then the smaller lambda)"
    )
    for name in ("table.md", "selection_table.md"):
        assert f"\n\n{rule}\n" in (out / name).read_text()
    assert rule in capsys.readouterr().out
    record = json.loads((out / "sweep.json").read_text())
    assert record["selection"]["chosen"] == {"mas": chosen} and record["selection"]["rule"] == [rule]


def test_validation_selection_on_the_reported_seeds_reports_the_chosen_lambda_only(data, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["--methods", "mas --reg_lambda 0.1 1", "finetune", "--seeds", "0", "1", "--select_on", "validation"]
    fake = run_sweep(monkeypatch, validated, argv, data, out)
    assert len(fake.ran) == 6  # every lambda on the reported seeds: no selection seeds
    assert list(csv_rows(out / "table.csv")) == [("mas", "1.0"), ("finetune", "-")]
    selection = csv_rows(out / "selection_table.csv")
    assert {k: row["chosen"] for k, row in selection.items()} == {("mas", "0.1"): "False", ("mas", "1.0"): "True"}
    assert float(selection[("mas", "1.0")]["validation_average_accuracy_mean"]) == pytest.approx(80.0)
    rule = (
        "lambda chosen per method by mean validation accuracy over seeds 0 1 (the reported seeds; their test "
        "accuracy is not read by the choice) (ties: lower validation forgetting over tasks 1..T-1, then the "
        "smaller lambda)"
    )
    md = (out / "table.md").read_text()
    assert f"\n\n{rule}\n" in md and "| validation accuracy (%) |" in md.splitlines()[0]


def test_validation_selection_without_validation_accuracy_is_one_error_line(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_:
        run_sweep(monkeypatch, unvalidated, [*SELECT, "--select_on", "validation"], data, out)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --select_on validation: runs of mas lambda=0.1, mas lambda=1 have no validation accuracy; give "
        "main.py --val_fraction F (F > 0) after -- (and another --out), or select with --select_on test"
    )
    assert not (out / "table.csv").exists()


def test_validation_selection_refuses_runs_without_a_validation_split_before_any_run(
    data, tmp_path, monkeypatch, capsys
):
    """Where main.py records --val_fraction, 0 (no split) is refused before the sweep folder is made."""
    real = sweep_module.parse_config

    class WithoutSplit:
        def __init__(self, argv: list[str]) -> None:
            self.config = real(argv)

        def recorded(self) -> dict:
            return {**self.config.recorded(), "val_fraction": 0.0}

    monkeypatch.setattr(sweep_module, "parse_config", WithoutSplit)
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_:
        run_sweep(monkeypatch, validated, [*SELECT, "--select_on", "validation"], data, out)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "error: --select_on validation: the runs of mas have no validation split; "
        "give main.py --val_fraction F (F > 0) after --"
    )
    assert not out.exists()


def _row(reg_lambda, accuracy, validation=None, runs=2):
    return {
        "method": "m",
        "reg_lambda": reg_lambda,
        "runs": runs,
        "complete": 2,
        "average_accuracy_mean": accuracy,
        "average_forgetting_previous_mean": 0.0,
        "validation_average_accuracy_mean": validation,
        "validation_average_forgetting_previous_mean": None if validation is None else 0.0,
    }


def test_auto_selection_falls_back_to_test_when_one_lambda_lacks_validation():
    both = [_row(0.1, 90.0, 70.0), _row(1.0, 80.0, 75.0)]
    assert choose_lambdas(both) == {"m": 1.0}
    assert choose_lambdas([both[0], _row(1.0, 80.0, None)]) == {"m": 0.1}
    assert choose_lambdas(both, "test") == {"m": 0.1}
    assert choose_lambdas([*both, _row(10.0, 50.0, 99.0, runs=3)]) == {"m": 1.0}  # a failed run: not a candidate


# ---------------------------------------------------------------- identical to finetune


def test_a_lambda_identical_to_finetune_is_warned_and_a_different_one_is_not(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"

    def outcome(run):  # lambda 0.1 changes nothing; lambda 10 changes seed 1 only
        return shifted(MATRIX[run.seed % 2], 1.0 if run.reg_lambda == 10.0 and run.seed == 1 else 0.0), None

    argv = ["--methods", "ewc --reg_lambda 0.1 10", "finetune", "--seeds", "0", "1", "2"]
    run_sweep(monkeypatch, outcome, argv, data, out)
    warning = (
        "warning: ewc, lambda=0.1: identical to finetune on seeds 0 1 2: its lambda does nothing here; "
        "try larger values"
    )
    md = (out / "table.md").read_text()
    assert md.endswith(f"\n\n{warning}\n") and md.count("warning:") == 1
    assert warning in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text())["warnings"] == [warning]


def test_no_warning_without_finetune_runs_on_the_same_seeds(data, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    run_sweep(
        monkeypatch, lambda run: (MATRIX[0], None), ["--methods", "ewc --reg_lambda 0.1", "--seeds", "0"], data, out
    )
    assert "warning" not in (out / "table.md").read_text()
