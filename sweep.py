"""Sweeps: a grid of ``main.py`` runs (method x reg_lambda x seed), resumable, tabulated and plotted.

    python3 sweep.py --methods "mas --reg_lambda 0.1 1 10" "ewc --reg_lambda 1e3 1e4 1e5" si finetune \\
        --reg_lambda 0.01 0.1 1 10 --seeds 0 1 2 -- --num_epochs 30

Every run is its own ``python3 main.py`` process (run from the repository root) with the flags after
``--``, then the method's own flags, ``--method``, ``--reg_lambda``, ``--seed`` and
``--models_dir <out>/runs/<run>``; its output goes to ``<out>/logs/<run>.log``; relative paths
in the flags after ``--`` are relative to the repository root. A ``--methods`` entry may carry its
own lambdas (``"ewc --reg_lambda 1e3 1e4"``); the others run the global ``--reg_lambda``.
``finetune`` has no penalty, so it runs once per seed whatever the lambdas. At the end ``<out>``
holds ``table.csv``, ``table.md``, ``plot.png`` (average accuracy against average forgetting over
tasks 1..T-1) and ``sweep.json`` (the grid and every run's status and metrics; a sweep with another
grid into the same folder adds to it).

A run whose ``results.json`` is complete is skipped; one that diverged (``results.json`` holds
``"diverged"``: the training loss became NaN or infinite) is final and reported as such; an
unfinished one (an incomplete ``results.json`` or a ``checkpoint.pth``) continues with
``--resume``. A finished run made with other arguments (say, other flags after ``--``) stops the
sweep before anything runs, so runs are never mixed.

With ``--select_seeds``, every (method, lambda) first runs on the selection seeds; per method the
lambda with the best mean average accuracy is kept (ties: lower mean forgetting over tasks 1..T-1,
then the smaller lambda; a lambda that diverged on a selection seed is excluded) and only that one
runs on ``--seeds``. The accuracy is the validation accuracy when every selection run of the method
has one (``main.py --val_fraction``), else the selection seeds' test accuracy; ``--select_on``
forces either, and ``--select_on validation`` without ``--select_seeds`` chooses on the reported
seeds' validation accuracy. The rule used is written under the tables. Tables report, per
(method, lambda), the mean and sample standard deviation over seeds of the metrics of
``results.json`` (average accuracy, forgetting over tasks 1..T-1, backward transfer, and forgetting
over all T tasks; see utils/artefacts/results.py), over the runs that finished without diverging, and warn
about a regulariser whose accuracy matrices are those of finetune on the same seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import io
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import build_parser, given_flags, parse_config
from methods import method_class, method_names
from utils import UserError
from utils.artefacts.checkpoint import CHECKPOINT, argument_differences
from utils.artefacts.files import load_json, save_json, save_text
from utils.artefacts.results import format_pp, load_results, summarize
from utils.cli import OneLineParser, at_least
from utils.runtime.folder_lock import LOCK_FILE, FolderLock, locked_by

ROOT = Path(__file__).resolve().parent  # the folder that holds main.py: the runs' working directory
MAIN = ROOT / "main.py"
# The table's columns. Forgetting is the mean over tasks 1..T-1, the figure papers report (the last task is
# never forgotten: the mean over all T tasks is (T-1)/T of it); the all-task mean is an extra, labelled column.
METRICS = ("average_accuracy", "average_forgetting_previous", "backward_transfer", "average_forgetting")
METRIC_TITLES = (
    "average accuracy (%)",
    "average forgetting (pp), tasks 1..T-1",
    "backward transfer (pp)",
    "forgetting incl. last task (pp)",
)
# From main.py --val_fraction runs only: what a selection on validation reads.
VALIDATION = ("validation_average_accuracy", "validation_average_forgetting_previous")
VALIDATION_TITLE = "validation accuracy (%)"
RECORD = "sweep.json"
SET_BY_THE_SWEEP = {
    "models_dir": "every run gets its own folder <out>/runs/<run>",
    "resume": "the sweep resumes unfinished runs by itself",
    "overwrite": "the sweep decides when a run folder starts afresh; delete <out>/runs/<run> to redo a run",
    "method": "give methods with --methods",
    "reg_lambda": 'give values with --reg_lambda, or per method as in --methods "ewc --reg_lambda 100 1000"',
    "seed": "give seeds with --seeds (and --select_seeds)",
}
FINAL = ("complete", "diverged")
SELECT_ON = ("auto", "validation", "test")
# The sweep's own outputs: it overwrites one only while its content is what the sweep wrote there
# (its sha256 is recorded in sweep.json, whose format tag is checked).
OUTPUTS = ("table.csv", "table.md", "plot.png", "selection_table.csv", "selection_table.md")


class FlagError(UserError):
    """A malformed or forbidden flag: exit code 2, as argparse."""


@dataclass(frozen=True)
class Method:
    """One --methods entry: a method name, extra main.py flags and its own lambda grid (None: the global
    --reg_lambda); ``label`` is the entry as given, less its --reg_lambda values."""

    label: str
    name: str
    flags: tuple[str, ...]
    lambdas: tuple[float, ...] | None = None

    @property
    def uses_lambda(self) -> bool:
        return method_class(self.name).penalised  # no penalty (finetune): reg_lambda changes nothing

    def lambda_grid(self, default: list[float]) -> list[float | None]:
        """The lambdas this method runs with: its own, else ``default``; [None] without a penalty."""
        if not self.uses_lambda:
            return [None]
        return list(self.lambdas if self.lambdas is not None else default)


@dataclass(frozen=True)
class Run:
    method: Method
    reg_lambda: float | None  # None: finetune
    seed: int

    @property
    def slug(self) -> str:
        """The run's folder and log name, e.g. ``mas_lam0.1_seed0``."""
        label = re.sub(r"[^A-Za-z0-9.]+", "_", self.method.label).strip("_")
        if label != self.method.label:  # keep labels that differ only in punctuation apart
            label += "-" + hashlib.sha1(self.method.label.encode()).hexdigest()[:6]
        lam = "" if self.reg_lambda is None else f"_lam{self.reg_lambda!r}"
        return f"{label}{lam}_seed{self.seed}"

    def main_argv(self, tail: list[str], out: Path) -> list[str]:
        """main.py's flags: the common ones, the method's own (which win), then what the grid sets."""
        lam = [] if self.reg_lambda is None else ["--reg_lambda", repr(self.reg_lambda)]
        models_dir = str(out / "runs" / self.slug)
        return [*tail, *self.method.flags, "--method", self.method.name, *lam, "--seed", str(self.seed)] + [
            "--models_dir",
            models_dir,
        ]


def grid(methods: list[Method], lambdas: list[float], seeds: list[int]) -> list[Run]:
    """Every (method, lambda, seed): each method's own lambdas, else ``lambdas``."""
    return [
        Run(method, reg_lambda, seed)
        for method in methods
        for reg_lambda in method.lambda_grid(lambdas)
        for seed in seeds
    ]


# ---------------------------------------------------------------- flags


def check_main_flags(words: list[str], where: str) -> None:
    """``words`` must be valid main.py flags that leave the sweep's own flags alone."""
    if "-h" in words or "--help" in words:
        raise FlagError(f"{where}: --help is not a run flag; see python3 main.py --help")
    parser = build_parser()

    def refuse(message: str):
        raise FlagError(f"{where}: {message}")

    parser.error = refuse  # one line through the sweep, not main.py's usage exit
    given = given_flags(words, parser)
    for dest, reason in SET_BY_THE_SWEEP.items():
        if dest in given:
            raise FlagError(f"{where}: --{dest} is set by the sweep ({reason}); remove it")


def parse_method(entry: str) -> Method:
    """A --methods entry: the method, its main.py flags, and its own ``--reg_lambda v1 v2 ...`` grid if any."""
    where = f"--methods {entry!r}"
    try:
        words = shlex.split(entry)
    except ValueError as err:
        raise FlagError(f"{where}: {err}") from None
    if not words or words[0] not in method_names():
        raise FlagError(f"{where}: the first word must be a method, one of {', '.join(method_names())}")
    flags, lambdas = split_lambdas(words[1:], where)
    check_main_flags(flags, where)
    if lambdas is None:
        return Method(entry.strip(), words[0], tuple(flags))  # the label (and run folders) of before
    if not method_class(words[0]).penalised:
        raise FlagError(f"{where}: {words[0]} has no penalty, so --reg_lambda changes nothing for it; remove it")
    return Method(shlex.join(words[0:1] + flags), words[0], tuple(flags), lambdas)


def split_lambdas(words: list[str], where: str) -> tuple[list[str], tuple[float, ...] | None]:
    """``words`` less an entry's ``--reg_lambda v1 v2 ...`` (values up to the next --flag), and those values.
    Abbreviations of --reg_lambda stay in the flags, where check_main_flags refuses them."""
    flags: list[str] = []
    lambdas: tuple[float, ...] | None = None
    i = 0
    while i < len(words):
        word = words[i]
        if word != "--reg_lambda" and not word.startswith("--reg_lambda="):
            flags.append(word)
            i += 1
            continue
        if lambdas is not None:
            raise FlagError(f"{where}: --reg_lambda is given twice")
        end = i + 1
        while end < len(words) and not words[end].startswith("--"):
            end += 1
        values = [word.partition("=")[2]] if "=" in word else words[i + 1 : end]
        i = i + 1 if "=" in word else end
        if not values:
            raise FlagError(f"{where}: --reg_lambda needs at least one value")
        lambdas = tuple(_entry_lambda(value, where) for value in values)
        _no_repeats(list(lambdas), f"{where}: --reg_lambda")
    return flags, lambdas


def _entry_lambda(text: str, where: str) -> float:
    try:
        return _lambda(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise FlagError(f"{where}: --reg_lambda {text}: must be a finite number >= 0") from None


_lambda = at_least(0.0)  # what main.py's --reg_lambda takes
_jobs = at_least(1, int)


def build_sweep_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        error_prefix="error:",
        hint="see python3 sweep.py --help; main.py's flags go after --",
        prog="python3 sweep.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["mas"],
        help="method names, each optionally with its own main.py flags and its own lambdas in one quoted "
        'word, e.g. "mas --omega_estimator per_sample" or "ewc --reg_lambda 1e3 1e4"; the word less its '
        "--reg_lambda values is the row label (default: %(default)s)",
    )
    p.add_argument(
        "--reg_lambda",
        nargs="+",
        type=_lambda,
        default=[0.01],
        help="the lambdas of the methods that give none of their own (default: %(default)s)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="seeds of the reported runs (default: %(default)s)"
    )
    p.add_argument(
        "--select_seeds",
        nargs="+",
        type=int,
        default=None,
        help="choose each method's lambda on these seeds first, then run only that lambda on --seeds "
        "(default: %(default)s, i.e. report every lambda)",
    )
    p.add_argument(
        "--select_on",
        choices=SELECT_ON,
        default="auto",
        help="what chooses the lambda: validation (the runs' validation accuracy, main.py --val_fraction; "
        "without --select_seeds it chooses on the --seeds runs, whose test accuracy it never reads), test "
        "(the selection seeds' test accuracy; needs --select_seeds) or auto (validation when every "
        "selection run has it, else test) (default: %(default)s)",
    )
    p.add_argument(
        "--jobs",
        type=_jobs,
        default=1,
        help="runs at a time, each its own process; give each fewer threads, e.g. OMP_NUM_THREADS "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="the sweep's folder (default: %(default)s, i.e. sweeps/<hash of the main.py flags>, so that "
        "the same command continues the same sweep)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")
    return p


def _no_repeats(values: list, flag: str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise FlagError(f"{flag} lists {value} twice")
        seen.add(value)


def parse_sweep_args(argv: list[str]) -> tuple[argparse.Namespace, list[Method], list[str]]:
    """The sweep's flags, its methods, and the main.py flags after ``--``."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_sweep_parser().parse_args(argv[:cut])
    tail = argv[cut + 1 :]
    check_main_flags(tail, "the main.py flags after --")
    methods = [parse_method(entry) for entry in args.methods]
    _no_repeats([m.label for m in methods], "--methods")
    _no_repeats(args.reg_lambda, "--reg_lambda")
    _no_repeats(args.seeds, "--seeds")
    _no_repeats(args.select_seeds or [], "--select_seeds")
    if args.select_on == "test" and not args.select_seeds:
        raise FlagError(
            "--select_on test needs --select_seeds: choosing lambda on the test accuracy of the reported "
            "seeds would report a figure tuned on its own test set"
        )
    if args.out is None:
        args.out = str(Path("sweeps") / hashlib.sha1(shlex.join(tail).encode()).hexdigest()[:10])
    return args, methods, tail


# ---------------------------------------------------------------- runs


@contextlib.contextmanager
def _at_root() -> Iterator[None]:
    """main.py reads its paths (--data_dir) from the repository root, where the runs start."""
    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(previous)


def run_state(folder: Path, expected_args: dict[str, Any]) -> str:
    """complete, diverged, resume (an unfinished run), overwrite (leftovers, nothing to resume) or fresh."""
    results = load_results(folder)
    if results is not None:
        differences = argument_differences(results["args"], expected_args)
        if differences:
            raise UserError(
                f"{folder} holds a run made with other arguments ({'; '.join(differences)}); "
                "give another --out, or delete that folder to redo the run"
            )
        if "diverged" in results:
            return "diverged"
        return "complete" if results.get("complete") else "resume"
    if (folder / CHECKPOINT).exists():
        return "resume"  # main.py --resume compares the checkpoint's arguments itself
    leftovers = folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())
    return "overwrite" if leftovers else "fresh"


class Launcher:
    """Starts main.py processes (from several threads) and interrupts them all on Ctrl-C."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, command: list[str], log_path: Path) -> tuple[int | None, str]:
        """Exit code and last stderr line; (None, "") if the sweep was interrupted before the start."""
        with open(log_path, "a", encoding="utf-8") as log:
            with self._lock:
                if self.stopping:
                    return None, ""
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stdout and stderr interleave in the log as printed
                # A session of its own: Ctrl-C reaches the sweep only, which passes it on once (stop()).
                process = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.PIPE,
                    text=True,
                    errors="replace",
                    start_new_session=True,
                )
                self._running.add(process)
            try:
                return self._follow(process, log)
            finally:
                with self._lock:
                    self._running.discard(process)

    @staticmethod
    def _follow(process: subprocess.Popen, log) -> tuple[int, str]:
        """Copy the process's stderr into its log; its exit code and last non-empty stderr line."""
        last = ""
        for line in process.stderr:
            log.write(line)
            log.flush()
            shown = [part.strip() for part in line.split("\r") if part.strip()]  # tqdm redraws with \r
            last = shown[-1] if shown else last
        return process.wait(), last

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            for process in self._running:
                process.send_signal(signal.SIGINT)  # main.py saves what it has and exits with 130


@dataclass
class Sweep:
    out: Path
    tail: list[str]
    jobs: int
    record: dict[str, Any]
    launcher: Launcher
    entries: list[dict[str, Any]]  # the entries of the runs of this invocation

    def save(self) -> None:
        save_json(self.record, self.out / RECORD)


def _metrics(results: dict[str, Any]) -> dict[str, float | None]:
    """The run's metrics (from its accuracy matrix where results.json lacks one) and validation metrics."""
    computed = summarize(results["accuracy_matrix"])
    metrics = {key: results.get(key, computed[key]) for key in (*METRICS, "average_forgetting_max")}
    return {**metrics, **validation_metrics(results)}


def validation_metrics(results: dict[str, Any]) -> dict[str, float | None]:
    """Validation accuracy (results.json's, else the mean of the validation matrix's last row) and
    validation forgetting over tasks 1..T-1; None where the run has no (fully scored) validation matrix."""
    matrix = results.get("validation_accuracy_matrix") or []
    last = matrix[-1] if matrix else []
    scored = bool(last) and all(a is not None for a in last)
    accuracy = results.get("validation_average_accuracy")
    if accuracy is None and scored:
        accuracy = sum(last) / len(last)
    diagonal = [row[j] if j < len(row) else None for j, row in enumerate(matrix)]
    earlier = [(diagonal[j], last[j]) for j in range(len(matrix) - 1)]
    forgetting = None
    if scored and all(d is not None for d, _ in earlier):
        forgetting = sum(d - a for d, a in earlier) / len(earlier) if earlier else 0.0
    return {"validation_average_accuracy": accuracy, "validation_average_forgetting_previous": forgetting}


def run_entry(run: Run, status: str, action: str, results: dict | None, **extra: Any) -> dict[str, Any]:
    """What sweep.json keeps of a run."""
    return {
        "method": run.method.label,
        "reg_lambda": run.reg_lambda,
        "seed": run.seed,
        "status": status,
        "action": action,
        "metrics": _metrics(results) if status == "complete" else None,
        "accuracy_matrix": results["accuracy_matrix"] if status == "complete" else None,
        "diverged": results.get("diverged") if results else None,
        "models_dir": f"runs/{run.slug}",
        "log": f"logs/{run.slug}.log",
        **extra,
    }


def finished_entry(sweep: Sweep, run: Run, action: str, returncode: int | None, last_line: str, seconds: float):
    results = load_results(sweep.out / "runs" / run.slug)
    if results is not None and "diverged" in results:
        status, error = "diverged", None
    elif results is not None and results.get("complete"):  # final, even if a signal came at the exit
        status, error = "complete", None
    elif sweep.launcher.stopping:
        status, error = "interrupted", "the sweep was interrupted"
        action = action if returncode is not None else "not started"
    else:
        status, error = "failed", last_line or f"main.py exited with code {returncode}"
    return run_entry(run, status, action, results, returncode=returncode, error=error, seconds=round(seconds, 3))


def _summary(entry: dict[str, Any]) -> str:
    if entry["status"] == "complete":
        m = entry["metrics"]
        forgetting = m["average_forgetting_previous"]
        text = f"complete: accuracy {m['average_accuracy']:.2f} %, forgetting (tasks 1..T-1) {forgetting:.2f} pp"
    elif entry["status"] == "diverged":
        text = f"diverged in task {entry['diverged']['task']}"
    else:
        text = f"{entry['status']}: {entry['error']} (log: {entry['log']})"
    if entry["action"] == "skipped":
        return f"{text} (finished earlier, skipped)"
    return f"{text} ({entry['action']}, {entry['seconds']:.1f} s)"


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def line(self, run: Run, entry: dict[str, Any]) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {run.slug}: {_summary(entry)}", flush=True)


def plan_runs(sweep: Sweep, runs: list[Run]) -> list[tuple[Run, list[str], str]]:
    """Each run's main.py flags and state; refuses before anything runs if a stored run differs."""
    plans = []
    with _at_root():
        for run in runs:
            argv = run.main_argv(sweep.tail, sweep.out)
            expected = parse_config(argv).recorded()
            plans.append((run, argv, run_state(sweep.out / "runs" / run.slug, expected)))
    return plans


def _execute(sweep: Sweep, run: Run, argv: list[str], state: str) -> tuple[int | None, str, float]:
    flag = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(state, [])
    tic = time.perf_counter()
    returncode, last_line = sweep.launcher.run(
        [sys.executable, str(MAIN), *argv, *flag], sweep.out / "logs" / f"{run.slug}.log"
    )
    return returncode, last_line, time.perf_counter() - tic


def launch(sweep: Sweep, plans: list[tuple[Run, list[str], str]], progress: Progress) -> dict[str, dict]:
    """Run ``plans`` ``sweep.jobs`` at a time; on Ctrl-C interrupt them, record them, and re-raise."""
    entries: dict[str, dict] = {}

    def record(future: concurrent.futures.Future, run: Run, state: str) -> None:
        action = "resumed" if state == "resume" else "ran"
        entries[run.slug] = entry = finished_entry(sweep, run, action, *future.result())
        sweep.record["runs"][run.slug] = entry
        sweep.save()
        progress.line(run, entry)

    with concurrent.futures.ThreadPoolExecutor(max_workers=sweep.jobs) as pool:
        futures = {pool.submit(_execute, sweep, run, argv, state): (run, state) for run, argv, state in plans}
        try:
            for future in concurrent.futures.as_completed(futures):
                record(future, *futures[future])
        except KeyboardInterrupt:
            sweep.launcher.stop()
            for future, (run, state) in futures.items():
                if run.slug not in entries:
                    concurrent.futures.wait([future])
                    record(future, run, state)
            raise
    return entries


def run_phase(sweep: Sweep, phase: str, runs: list[Run]) -> list[dict[str, Any]]:
    """Every run of ``runs``, skipping the finished ones; their sweep.json entries, in order."""
    plans = plan_runs(sweep, runs)
    todo = [plan for plan in plans if plan[2] not in FINAL]
    print(f"{phase}: {len(runs)} runs, {len(runs) - len(todo)} finished earlier, {len(todo)} to run", flush=True)
    progress = Progress(len(runs))
    entries = {}
    for run, _, state in plans:
        if state in FINAL:
            results = load_results(sweep.out / "runs" / run.slug)
            entries[run.slug] = sweep.record["runs"][run.slug] = run_entry(run, state, "skipped", results)
            progress.line(run, entries[run.slug])
    entries.update(launch(sweep, todo, progress))
    sweep.save()
    sweep.entries += [entries[run.slug] for run in runs]
    return [entries[run.slug] for run in runs]


# ---------------------------------------------------------------- tables


def table_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method label, lambda): counts, and mean and sample std over the complete runs."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for entry in entries:
        groups.setdefault((entry["method"], entry["reg_lambda"]), []).append(entry)
    rows = []
    for (label, reg_lambda), group in groups.items():
        complete = [e for e in group if e["status"] == "complete"]
        diverged = sum(e["status"] == "diverged" for e in group)
        row = {"method": label, "reg_lambda": reg_lambda, "runs": len(group), "complete": len(complete)}
        row.update(diverged=diverged, failed=len(group) - len(complete) - diverged)
        for key in (*METRICS, *VALIDATION):
            values = [e["metrics"].get(key) for e in complete]
            known = bool(values) and None not in values  # validation: only when every run has it
            row[f"{key}_mean"] = statistics.mean(values) if known else None
            row[f"{key}_std"] = statistics.stdev(values) if known and len(values) > 1 else None
        rows.append(row)
    return rows


def candidates_by_method(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per method label, its lambdas whose selection runs all finished without diverging."""
    labels = dict.fromkeys(row["method"] for row in rows)
    return {label: [r for r in rows if r["method"] == label and r["complete"] == r["runs"]] for label in labels}


def selection_basis(candidates: list[dict[str, Any]], select_on: str = "auto") -> str:
    """ "validation" or "test": auto means validation when every candidate's runs all recorded one."""
    if select_on != "auto":
        return select_on
    has_validation = all(r.get("validation_average_accuracy_mean") is not None for r in candidates)
    return "validation" if candidates and has_validation else "test"


def choose_lambdas(rows: list[dict[str, Any]], select_on: str = "auto") -> dict[str, float | None]:
    """Per method: the best mean average accuracy (validation or test, see selection_basis), then the lower
    mean forgetting over tasks 1..T-1 (same basis), then the smaller lambda, among the lambdas whose
    selection runs all finished without diverging. A basis's metric a candidate lacks ranks it last."""
    chosen: dict[str, float | None] = {}
    for label, candidates in candidates_by_method(rows).items():
        prefix = "validation_" if selection_basis(candidates, select_on) == "validation" else ""

        def rank(row: dict[str, Any], prefix: str = prefix) -> tuple[float, float, float]:
            accuracy, forgetting = (
                row.get(f"{prefix}{key}_mean") for key in ("average_accuracy", "average_forgetting_previous")
            )
            worst = float("inf")
            return (
                worst if accuracy is None else -accuracy,
                worst if forgetting is None else forgetting,
                row["reg_lambda"],
            )

        best = min(candidates, key=rank, default=None)
        chosen[label] = None if best is None else best["reg_lambda"]
    return chosen


def selection_rule(rows: list[dict[str, Any]], select_on: str, seeds: list[int], own_seeds: bool) -> list[str]:
    """The line(s) under the tables that say how each method's lambda was chosen."""
    by_basis: dict[str, list[str]] = {}
    for label, candidates in candidates_by_method(rows).items():
        by_basis.setdefault(selection_basis(candidates, select_on), []).append(label)
    seed_text = " ".join(map(str, seeds))
    if own_seeds:
        seed_text += " (the reported seeds; their test accuracy is not read by the choice)"
    lines = []
    for basis, labels in by_basis.items():
        who = "lambda chosen per method" if len(by_basis) == 1 else f"{', '.join(labels)}: lambda chosen"
        lines.append(
            f"{who} by mean {basis} accuracy over seeds {seed_text} "
            f"(ties: lower {basis} forgetting over tasks 1..T-1, then the smaller lambda)"
        )
    return lines


def identical_to_finetune(entries: list[dict[str, Any]], methods: list[Method]) -> list[str]:
    """A warning per (regulariser, lambda) whose finished runs all have the accuracy matrix of an
    unpenalised method's (finetune's) run on the same seed: at that lambda the penalty changes nothing."""
    penalised = {m.label: m.uses_lambda for m in methods}
    matrices: dict[tuple[str, float | None], dict[int, list]] = {}
    for entry in entries:
        if entry["status"] == "complete" and entry["method"] in penalised:
            matrices.setdefault((entry["method"], entry["reg_lambda"]), {})[entry["seed"]] = entry["accuracy_matrix"]
    baselines = [(label, runs) for (label, _), runs in matrices.items() if not penalised[label]]
    warnings = []
    for (label, reg_lambda), runs in matrices.items():
        for baseline, baseline_runs in baselines if penalised[label] else []:
            if all(baseline_runs.get(seed) == matrix for seed, matrix in runs.items()):
                warnings.append(
                    f"warning: {label}, lambda={reg_lambda:g}: identical to {baseline} on seeds "
                    f"{' '.join(map(str, runs))}: its lambda does nothing here; try larger values"
                )
                break
    return warnings


def _lambda_text(reg_lambda: float | None, exact: bool = False) -> str:
    if reg_lambda is None:
        return "-"
    return repr(reg_lambda) if exact else f"{reg_lambda:g}"


def table_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["method"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in row.items()}
        writer.writerow({**cells, "reg_lambda": _lambda_text(row["reg_lambda"], exact=True)})
    return buffer.getvalue()


def _mean_std(row: dict[str, Any], key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if mean is None:
        return ""
    return format_pp(mean) if std is None else f"{format_pp(mean)} ± {format_pp(std)}"


def table_md(rows: list[dict[str, Any]], notes: list[str]) -> str:
    """The table in Markdown, the notes (selection rule, warnings) under it; a validation accuracy column
    when some row has one."""
    metrics = list(METRICS) + (
        ["validation_average_accuracy"]
        if any(r.get("validation_average_accuracy_mean") is not None for r in rows)
        else []
    )
    titles = list(METRIC_TITLES) + ([VALIDATION_TITLE] if len(metrics) > len(METRICS) else [])
    extra = ["chosen"] if rows and "chosen" in rows[0] else []
    header = ["method", "reg_lambda", "runs", "complete", "diverged", "failed", *titles, *extra]
    align = ["---", *["---:"] * (5 + len(titles)), *["---"] * len(extra)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        cells = [row["method"].replace("|", "\\|"), _lambda_text(row["reg_lambda"])]
        cells += [str(row[k]) for k in ("runs", "complete", "diverged", "failed")]
        cells += [_mean_std(row, key) for key in metrics] + (["yes" if row["chosen"] else ""] if extra else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, *(f"\n{note}" for note in notes)]) + "\n"


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Average accuracy against average forgetting over tasks 1..T-1, one labelled point per row, error bars = std."""
    from utils.artefacts.plot import plt, save_figure  # matplotlib (Agg) only here

    fig, ax = plt.subplots(figsize=(9.6, 6))
    markers = "osD^v<>ph*"
    shown = [r for r in rows if r["average_accuracy_mean"] is not None]
    for k, row in enumerate(shown):
        x, y = row["average_forgetting_previous_mean"], row["average_accuracy_mean"]
        label = row["method"] if row["reg_lambda"] is None else f"{row['method']}, lambda={row['reg_lambda']:g}"
        xerr, yerr = row["average_forgetting_previous_std"] or 0, row["average_accuracy_std"] or 0
        # Hollow markers, each later one smaller: runs that land on one point show as nested rings, none hidden.
        size = 6 + 2.5 * (len(shown) - 1 - k)
        ax.errorbar(
            x,
            y,
            xerr=xerr,
            yerr=yerr,
            fmt=markers[k % len(markers)],
            markersize=size,
            mfc="none",
            mew=1.5,
            capsize=3,
            label=label,
        )
    ax.set_xlabel("average forgetting (pp), tasks 1..T-1")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("mean ± std over seeds")
    ax.grid(alpha=0.3)
    # A legend under the axes, not labels beside the points: good methods crowd into one corner
    # (low forgetting, high accuracy) where labels would cover each other, and long labels fit below.
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    legend_rows = (len(handles) + 1) // 2
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.13 + 0.035 * legend_rows, top=0.93)
    return save_figure(fig, path)


def write_table(sweep: Sweep, name: str, rows: list[dict[str, Any]], notes: list[str]) -> list[Path]:
    paths = [sweep.out / f"{name}.csv", sweep.out / f"{name}.md"]
    write_own(sweep, paths[0], lambda path: save_text(table_csv(rows), path))
    write_own(sweep, paths[1], lambda path: save_text(table_md(rows, notes), path))
    return paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def foreign_output(out: Path, record: dict[str, Any]) -> Path | None:
    """The first of the sweep's output files in ``out`` that the sweep did not write (or that was changed)."""
    written = record.get("written", {})
    for name in OUTPUTS:
        path = out / name
        if path.exists() and (not path.is_file() or written.get(name) != _sha256(path)):
            return path
    return None


def write_own(sweep: Sweep, path: Path, write) -> None:
    """``write(path)`` for one of the sweep's outputs, never over a file the sweep did not write; its
    sha256 goes to sweep.json, which recognises it as the sweep's own next time."""
    if path.exists() and (not path.is_file() or sweep.record.get("written", {}).get(path.name) != _sha256(path)):
        raise UserError(_foreign_message(path))
    write(path)
    sweep.record.setdefault("written", {})[path.name] = _sha256(path)
    sweep.save()


def _foreign_message(path: Path) -> str:
    return (
        f"{path} was not written by sweep.py (or was changed since), and the sweep never overwrites such a file; "
        "move it away or give another --out"
    )


# ---------------------------------------------------------------- the sweep


def load_record(out: Path) -> dict[str, Any]:
    path = out / RECORD
    if not path.exists():
        return {"format": 1, "invocations": [], "runs": {}}
    record = load_json(path)
    if not isinstance(record, dict) or record.get("format") != 1 or not isinstance(record.get("runs"), dict):
        raise UserError(f"{path} is not a sweep record of this program; give another --out")
    return record


def sweep_folder(args: argparse.Namespace) -> Path:
    """The --out folder, created (nothing inside it yet: its lock comes first)."""
    out = Path(args.out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot use --out {args.out}: {err.strerror or err}") from err
    return out


def check_no_live_runs(out: Path) -> None:
    """A run folder whose lock is held (a main.py that a killed sweep left running) is refused: the
    sweep would start a twin of it. The user waits for it or stops it, then reruns."""
    runs = out / "runs"
    for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
        pid = locked_by(folder) if folder.is_dir() else None
        if pid is not None:
            who = f"PID {pid}" if pid else "another process"
            raise UserError(
                f"{folder} is in use by {who} (a main.py still running, started by an earlier sweep?); "
                "wait for it to end or stop it, then rerun the same command"
            )


def open_sweep(args: argparse.Namespace, methods: list[Method], tail: list[str], argv: list[str]) -> Sweep:
    """The sweep in ``args.out``, whose lock the caller holds: refused before anything is written if a
    run folder is still being written or an output file is not the sweep's own."""
    out = Path(args.out).absolute()
    record = load_record(out)
    foreign = foreign_output(out, record)
    if foreign is not None:
        raise UserError(_foreign_message(foreign))
    check_no_live_runs(out)
    try:
        for folder in (out / "runs", out / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot use --out {args.out}: {err.strerror or err}") from err
    record["grid"] = {
        "methods": [m.label for m in methods],
        "reg_lambda": args.reg_lambda,
        "method_reg_lambda": {m.label: list(m.lambdas) for m in methods if m.lambdas is not None},
        "seeds": args.seeds,
        "select_seeds": args.select_seeds,
        "select_on": args.select_on,
        "main_flags": tail,
    }
    record["invocations"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": argv, "jobs": args.jobs})
    return Sweep(out, tail, args.jobs, record, Launcher(), [])


def select(sweep: Sweep, args: argparse.Namespace, methods: list[Method]) -> tuple[list[Run], list[str]]:
    """The selection phase on --select_seeds; the runs of the report, and the notes for under its table."""
    tuned = [m for m in methods if m.uses_lambda]
    entries = run_phase(sweep, "selection", grid(tuned, args.reg_lambda, args.select_seeds))
    chosen, notes = choose_and_record(sweep, args, table_rows(entries), own_seeds=False)
    runs = [
        Run(method, chosen.get(method.label), seed)
        for method in methods
        if not method.uses_lambda or chosen[method.label] is not None
        for seed in args.seeds
    ]
    return runs, notes


def choose_and_record(
    sweep: Sweep, args: argparse.Namespace, rows: list[dict[str, Any]], own_seeds: bool, warnings: list[str] = ()
) -> tuple[dict[str, float | None], list[str]]:
    """Each penalised method's lambda from ``rows``, written to sweep.json and selection_table.* (with
    ``warnings`` under it); the choice and the notes (the rule used, methods left without a lambda) for
    under the report's table."""
    rows = [dict(row) for row in rows if row["reg_lambda"] is not None]  # finetune has nothing to choose
    if args.select_on == "validation":
        check_validation(rows)
    chosen = choose_lambdas(rows, args.select_on)
    for row in rows:
        row["chosen"] = row["reg_lambda"] == chosen[row["method"]]
    seeds = args.seeds if own_seeds else args.select_seeds
    rule = selection_rule(rows, args.select_on, seeds, own_seeds)
    notes = rule + [
        f"{label}: no lambda chosen: every lambda diverged or failed on the selection seeds"
        for label, reg_lambda in chosen.items()
        if reg_lambda is None
    ]
    sweep.record["selection"] = {"seeds": seeds, "select_on": args.select_on, "chosen": chosen, "rule": rule}
    sweep.record["selection"]["table"] = rows
    write_table(sweep, "selection_table", rows, [*notes, *warnings])
    return chosen, notes


def select_on_own_seeds(
    sweep: Sweep, args: argparse.Namespace, methods: list[Method], entries: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """--select_on validation without --select_seeds: each method's lambda chosen on the validation
    accuracy of the reported runs; the entries of the chosen lambdas (and finetune), and the notes."""
    warnings = identical_to_finetune(entries, methods)
    chosen, notes = choose_and_record(sweep, args, table_rows(entries), own_seeds=True, warnings=warnings)
    kept = [e for e in entries if e["reg_lambda"] is None or e["reg_lambda"] == chosen[e["method"]]]
    return kept, notes


def check_validation(rows: list[dict[str, Any]]) -> None:
    """--select_on validation: every finished selection run must have recorded a validation accuracy."""
    lacking = [
        f"{r['method']} lambda={r['reg_lambda']:g}"
        for r in rows
        if r["complete"] and r["validation_average_accuracy_mean"] is None
    ]
    if lacking:
        raise UserError(
            f"--select_on validation: runs of {', '.join(lacking)} have no validation accuracy; give main.py "
            "--val_fraction F (F > 0) after -- (and another --out), or select with --select_on test"
        )


def _thread_advice(jobs: int) -> None:
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        share = max(1, (os.cpu_count() or 1) // jobs)
        print(
            f"note: {jobs} runs at a time, each with PyTorch's default number of threads (all cores); "
            f"consider OMP_NUM_THREADS={share} python3 sweep.py ...",
            flush=True,
        )


def check_data(args: argparse.Namespace, methods: list[Method], tail: list[str]) -> None:
    """main.py's own checks of the flags against the data (missing data, bad manifest), before any folder
    is made; and that --select_on validation runs get a validation split (where main.py has the flag)."""
    with _at_root():
        for method in methods:
            run = Run(method, method.lambda_grid(args.reg_lambda)[0], args.seeds[0])
            recorded = parse_config(run.main_argv(tail, Path(args.out))).recorded()
            if args.select_on == "validation" and method.uses_lambda and not recorded.get("val_fraction", 1):
                raise UserError(
                    f"--select_on validation: the runs of {method.label} have no validation split; "
                    "give main.py --val_fraction F (F > 0) after --"
                )


def sweep_main(argv: list[str]) -> list[dict[str, Any]]:
    args, methods, tail = parse_sweep_args(argv)
    check_data(args, methods, tail)
    with FolderLock(sweep_folder(args), "sweep.py --out") as lock:  # one sweep per folder; gone if it dies
        lock.acquire()
        return run_sweep(args, methods, tail, argv)


def run_sweep(args: argparse.Namespace, methods: list[Method], tail: list[str], argv: list[str]) -> list[dict]:
    """The sweep of ``args``, whose --out folder's lock is held."""
    sweep = open_sweep(args, methods, tail, argv)
    print(f"sweep folder: {args.out}", flush=True)
    _thread_advice(args.jobs)
    notes: list[str] = []
    if args.select_seeds:
        runs, notes = select(sweep, args, methods)
    else:
        runs = grid(methods, args.reg_lambda, args.seeds)
    entries = run_phase(sweep, "report", runs)
    if args.select_on == "validation" and not args.select_seeds:
        entries, notes = select_on_own_seeds(sweep, args, methods, entries)
    rows = table_rows(entries)
    warnings = identical_to_finetune(entries, methods)
    notes += warnings
    sweep.record["warnings"] = warnings
    sweep.record["table"] = rows
    sweep.save()
    written = write_table(sweep, "table", rows, notes) + [sweep.out / "plot.png"]
    write_own(sweep, written[-1], lambda path: write_plot(rows, path))
    print(table_md(rows, notes), end="")
    print(f"wrote {', '.join(p.name for p in written)}, {RECORD} in {args.out}")
    failed = [entry for entry in sweep.entries if entry["status"] not in FINAL]
    if failed:
        raise UserError(
            f"{len(failed)} of {len(sweep.entries)} runs failed ({failed[0]['log']}: {failed[0]['error']}); "
            "rerun the same command to retry them"
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep of ``argv`` and return the rows of its table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]
    try:
        return sweep_main(argv)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, FlagError) else 1) from None
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished runs are kept and unfinished ones resume: rerun the same command", file=sys.stderr
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
