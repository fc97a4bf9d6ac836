"""Train a task sequence with Memory Aware Synapses and print the forgetting table.

Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars. Memory Aware Synapses: Learning
what (not) to forget. ECCV 2018. Each task is trained on  CE + reg_lambda * sum
Omega (theta - theta*)^2  (Eq. 3), with Omega measured after every task (Eq. 2, 4).

    python3 data_prep.py && python3 main.py --use_gpu --reg_lambda 0.01
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from config import RunConfig, parse_config
from mas import ForgettingRow, RunState, compute_forgetting, mas_train
from methods import method_class
from reg_params import REG_PARAMS
from utils import Diverged, UserError
from utils.checkpoint import CHECKPOINT, argument_differences, load_checkpoint, remove_checkpoint
from utils.data_utils import make_task_data, task_dirs
from utils.model_utils import SHARED_MODEL
from utils.results import MATRIX_CSV, RESULTS, format_pp, load_results, new_results, record_task, save_results

RUN_FILES = {RESULTS, MATRIX_CSV, CHECKPOINT, SHARED_MODEL, REG_PARAMS, "plots"}
TASK_DIR = re.compile(r"^Task_\d+$")


def select_device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            "--use_gpu was given but CUDA is not available on this machine; drop the flag to train on the CPU"
        )
    return torch.device("cuda")


def format_table(rows: list[ForgettingRow]) -> str:
    rule = "-----+--------------------+---------+----------------"
    lines = ["Task | after training (%) | now (%) | forgetting (pp)", rule]
    n = len(rows)
    mean = ForgettingRow(0, *(sum(getattr(r, k) for r in rows) / n for k in ("after_training", "now", "forgetting")))
    for label, row in [*((str(r.task), r) for r in rows), ("avg", mean)]:
        if label == "avg":
            lines.append(rule)
        after, now, forgetting = (format_pp(v) for v in (row.after_training, row.now, row.forgetting))
        lines.append(f"{label:>4} | {after:>18} | {now:>7} | {forgetting:>15}")
    return "\n".join(lines)


def _previous_run(models_dir: Path) -> list[str]:
    """Artefacts of an earlier run in ``models_dir``."""
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if p.name in RUN_FILES or TASK_DIR.match(p.name))


def _remove_previous_run(models_dir: Path) -> None:
    """--overwrite: delete the earlier run's artefacts (only files and folders this program writes)."""
    for name in _previous_run(models_dir):
        path = models_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_models_dir(models_dir: Path) -> None:
    if models_dir.exists() and not models_dir.is_dir():
        raise UserError(f"--models_dir {models_dir} exists and is not a folder")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        os.listdir(models_dir)
        with tempfile.TemporaryFile(dir=models_dir):
            pass
    except OSError as err:
        raise UserError(f"cannot use --models_dir {models_dir}: {err.strerror or err}") from err


def _remove_stale_temporaries(models_dir: Path) -> None:
    """Temporary files of writes that a crash interrupted (the files they would have replaced are intact)."""
    for path in [*models_dir.glob(".*.tmp"), *models_dir.glob("Task_*/.*.tmp")]:
        path.unlink(missing_ok=True)


def _resume_run(config: RunConfig, models_dir: Path) -> tuple[RunState, dict | None]:
    results = load_results(models_dir)
    checkpoint = load_checkpoint(models_dir)
    if results is None and checkpoint is None:
        raise UserError(f"nothing to resume in {models_dir}: it holds neither {RESULTS} nor {CHECKPOINT}")
    if results is not None and checkpoint is not None and argument_differences(checkpoint["args"], results["args"]):
        raise UserError(f"{models_dir / CHECKPOINT} belongs to another run than {models_dir / RESULTS}")
    stored = results["args"] if results is not None else checkpoint["args"]
    differences = argument_differences(stored, config.recorded())
    if differences:
        raise UserError(f"--resume with arguments that differ from the run in {models_dir}: " + "; ".join(differences))
    _remove_stale_temporaries(models_dir)
    state = RunState(config, results if results is not None else _new_results(config))
    state.load_finished(models_dir)
    if checkpoint is not None and checkpoint["task"] <= state.finished:
        checkpoint = None  # the task finished; only the checkpoint's removal was interrupted
    return state, checkpoint


def _new_results(config: RunConfig) -> dict:
    return new_results(config.recorded(), config.manifest, method_class(config.method)(config, None).label())


def open_run(config: RunConfig) -> tuple[RunState, dict | None]:
    """The run so far and the checkpoint of an unfinished task (``--resume``), or a fresh run."""
    models_dir = Path(config.models_dir)
    previous = _previous_run(models_dir)
    _check_models_dir(models_dir)
    if config.resume and config.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    if config.resume:
        return _resume_run(config, models_dir)
    if previous:
        if not config.overwrite:
            shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
            raise UserError(
                f"{models_dir} holds a previous run ({shown}); "
                "pass --resume to continue it or --overwrite to replace it"
            )
        _remove_previous_run(models_dir)
    return RunState(config, _new_results(config)), None


def _task_entry(task_no: int, task, result, wall_seconds: float, resumed: bool) -> dict:
    return {
        "task": task_no,
        "name": task.name,
        "classes": task.classes,
        "test_accuracy": result.test_accuracy,
        "history": result.history,
        "train_seconds": result.train_seconds,
        "importance_seconds": result.importance_seconds,
        "wall_seconds": wall_seconds,
        "resumed": resumed,
    }


def _load_tasks(config: RunConfig) -> list:
    manifest = config.manifest
    applied = ", ".join(f"{k}={v}" for k, v in config.applied_defaults.items())
    print(f"{manifest['dataset']}: {len(manifest['tasks'])} tasks; defaults from the manifest: {applied or 'none'}")
    return [
        make_task_data(f, manifest, config.channels, config.image_size, config.batch_size, config.num_workers)
        for f in task_dirs(config.data_dir, manifest)
    ]


def _train_task(state: RunState, task_no: int, task, device: torch.device, checkpoint: dict | None):
    """Train one task; a run that diverges says so in results.json before it stops."""
    try:
        return mas_train(state, task_no, task, device, checkpoint)
    except Diverged as err:
        state.results["diverged"] = {"task": task_no, "message": str(err)}
        save_results(state.results, state.config.models_dir)
        raise


def run(config: RunConfig) -> dict:
    device = select_device(config.use_gpu)
    tasks = _load_tasks(config)
    state, checkpoint = open_run(config)
    results, rows = state.results, None
    for task_no, task in enumerate(tasks, start=1):
        if task_no <= state.finished:
            print(f"== {task.name}: finished in the interrupted run, kept ==")
            continue
        resume = checkpoint if checkpoint is not None and checkpoint["task"] == task_no else None
        resumed = f", resuming after epoch {resume['epoch'] + 1}" if resume else ""
        print(f"== {task.name}: {len(task.classes)} classes, {len(task.train.dataset)} training images{resumed} ==")
        tic = time.perf_counter()
        result = _train_task(state, task_no, task, device, resume)
        evaluate_now = config.eval_every_task or task_no == len(tasks)
        rows = compute_forgetting(state, tasks[:task_no], device) if evaluate_now else None
        entry = _task_entry(task_no, task, result, time.perf_counter() - tic, resume is not None)
        record_task(results, entry, [r.now for r in rows] if rows else None)
        save_results(results, config.models_dir)
        remove_checkpoint(config.models_dir)
    if rows is None:  # every task finished in an earlier run: only score them
        rows = compute_forgetting(state, tasks, device)
        save_results(results, config.models_dir)  # mends a CSV that a crash left behind results.json
    print(format_table(rows))
    print(f"average accuracy: {format_pp(sum(r.now for r in rows) / len(rows))} %")
    if config.plot:
        from utils.plot import run_label, write_plots  # matplotlib only when asked for

        for path in write_plots([(run_label(results), results)], Path(config.models_dir) / "plots"):
            print(f"wrote {path}")
    return {
        **results,
        "forgetting": [vars(r) for r in rows],
        "average_forgetting": sum(r.forgetting for r in rows) / len(rows),
        "average_accuracy": sum(r.now for r in rows) / len(rows),
    }


def _one_line(err: Exception) -> str:
    """The message of a UserError; a DataLoader worker wraps it in its traceback, whose last line it is."""
    text = str(err)
    if "\n" not in text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if text.startswith("Caught ") and "Traceback" in text:
        return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")
    return " ".join(lines)


def _interrupted_message(argv: list[str]) -> str:
    """What Ctrl-C leaves, and the command that continues from it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--models_dir", default="models")
    models_dir = Path(pre.parse_known_args(argv)[0].models_dir)
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    if not ((models_dir / RESULTS).exists() or (models_dir / CHECKPOINT).exists()):
        return "interrupted before anything was saved; start again with\n  " + " ".join(
            ["python3 main.py", *map(shlex.quote, argv)]
        )
    command = " ".join(["python3 main.py", *map(shlex.quote, kept), "--resume"])
    return f"interrupted: finished tasks and the last epoch's checkpoint are intact; continue with\n  {command}"


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train every task, print and return the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return run(parse_config(argv))
    except UserError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("\n" + _interrupted_message(argv), file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
