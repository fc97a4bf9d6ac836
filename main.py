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

from mas import METHODS, OMEGA_ESTIMATORS, ForgettingRow, compute_forgetting, mas_train
from model_class import ARCHS
from utils import Diverged, UserError
from utils.checkpoint import CHECKPOINT, argument_differences, load_checkpoint, remove_checkpoint, run_arguments
from utils.data_utils import data_fingerprint, make_task_data, read_manifest, task_dirs
from utils.mas_utils import REG_PARAMS
from utils.model_utils import SHARED_MODEL
from utils.results import MATRIX_CSV, RESULTS, load_results, new_results, record_task, save_results

RUN_FILES = {RESULTS, MATRIX_CSV, CHECKPOINT, SHARED_MODEL, REG_PARAMS, "plots"}
TASK_DIR = re.compile(r"^Task_\d+$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _at_least(minimum: float, kind=float):
    def check(text: str):
        value = kind(text)
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return check


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _momentum(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--use_gpu", action="store_true", help="train on CUDA; an error if CUDA is absent (default: %(default)s)"
    )
    p.add_argument("--batch_size", type=_at_least(1, int), default=8, help="batch size (default: %(default)s)")
    p.add_argument(
        "--num_freeze_layers",
        type=_at_least(0, int),
        default=2,
        help="freeze the first k layers of the trunk in every task: AlexNet convolutions, "
        "or MLP Linear layers, from the input (default: %(default)s)",
    )
    p.add_argument("--num_epochs", type=_at_least(1, int), default=10, help="epochs per task (default: %(default)s)")
    p.add_argument(
        "--init_lr",
        type=_positive_float,
        default=0.001,
        help="initial learning rate, x0.1 every 20 epochs (default: %(default)s)",
    )
    p.add_argument(
        "--reg_lambda",
        type=_at_least(0.0),
        default=0.01,
        help="weight of the MAS penalty sum Omega (theta - theta*)^2 (default: %(default)s)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="mas",
        help="mas, local_mas (Hebbian), the baselines ewc and si, or finetune (no penalty) (default: %(default)s)",
    )
    p.add_argument(
        "--omega_estimator",
        choices=tuple(OMEGA_ESTIMATORS),
        default="batch",
        help="for --method mas: batch = |gradient of a batch sum| (the authors' default), "
        "per_sample = the paper's exact per-sample definition (default: %(default)s)",
    )
    p.add_argument("--si_xi", type=_positive_float, default=0.1, help="SI's damping xi (default: %(default)s)")
    p.add_argument(
        "--data_dir", default="Data", help="task folders and manifest from data_prep.py (default: %(default)s)"
    )
    p.add_argument("--models_dir", default="models", help="where the artefacts of every task go (default: %(default)s)")
    p.add_argument(
        "--arch", choices=ARCHS, default=None, help="trunk (default: %(default)s, i.e. the manifest's default_arch)"
    )
    p.add_argument("--momentum", type=_momentum, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight_decay", type=_at_least(0.0), default=0.0, help="L2 weight decay (default: %(default)s)")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start AlexNet from torchvision's ImageNet weights (default: %(default)s)",
    )
    p.add_argument(
        "--image_size",
        type=_at_least(1, int),
        default=None,
        help="input size in pixels (default: %(default)s, i.e. 224 for alexnet as the seed, the stored size for mlp)",
    )
    p.add_argument(
        "--num_workers", type=_at_least(0, int), default=2, help="data loading processes (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random number generator (default: %(default)s)")
    p.add_argument(
        "--eval_every_task",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after every task, score all tasks seen so far (the full accuracy matrix); "
        "without it only the diagonal and the last row (default: %(default)s)",
    )
    p.add_argument(
        "--plot",
        action="store_true",
        help="write the accuracy-matrix heatmap and the before/after bar chart to <models_dir>/plots "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --models_dir (default: %(default)s)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the artefacts of an earlier run in --models_dir (default: %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")
    return p


def _given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations the user set on the command line."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _check_manifest_defaults(parser: argparse.ArgumentParser, defaults: dict, path: Path) -> None:
    """The manifest's defaults pass the same checks as the flags they stand for."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in defaults.items():
        action = actions.get(key)
        if action is None:
            raise UserError(f"{path}: unknown default {key!r}")
        try:
            if action.type is not None:
                action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise UserError(f"{path}: default {key}={value!r}: {err}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{path}: default {key}={value!r} is not one of {list(action.choices)}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """Command-line flags win over the manifest's ``defaults``, which win over the built-in defaults.

    Returns the arguments and the manifest; ``manifest["applied_defaults"]`` lists what it set.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and malformed flags stop here
    manifest = read_manifest(args.data_dir)
    defaults = dict(manifest.get("defaults", {}))
    defaults.setdefault("arch", manifest.get("default_arch", "alexnet"))
    _check_manifest_defaults(parser, defaults, Path(args.data_dir) / "manifest.json")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    given = _given_flags(build_parser(), argv)
    manifest["applied_defaults"] = {k: v for k, v in defaults.items() if k not in given}
    if args.image_size is None:
        args.image_size = 224 if args.arch == "alexnet" else manifest["image_size"]
    args.channels = 3 if args.arch == "alexnet" else manifest["channels"]
    args.data_fingerprint = data_fingerprint(manifest)
    return args, manifest


def select_device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            "--use_gpu was given but CUDA is not available on this machine; drop the flag to train on the CPU"
        )
    return torch.device("cuda")


def _pp(value: float) -> str:
    return f"{round(value, 2) + 0.0:.2f}"  # + 0.0: never print -0.00


def format_table(rows: list[ForgettingRow]) -> str:
    rule = "-----+--------------------+---------+----------------"
    lines = ["Task | after training (%) | now (%) | forgetting (pp)", rule]
    n = len(rows)
    mean = ForgettingRow(0, *(sum(getattr(r, k) for r in rows) / n for k in ("after_training", "now", "forgetting")))
    for label, row in [*((str(r.task), r) for r in rows), ("avg", mean)]:
        if label == "avg":
            lines.append(rule)
        lines.append(f"{label:>4} | {_pp(row.after_training):>18} | {_pp(row.now):>7} | {_pp(row.forgetting):>15}")
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


def _resume_run(args: argparse.Namespace, manifest: dict, models_dir: Path) -> tuple[dict, dict | None]:
    results = load_results(models_dir)
    checkpoint = load_checkpoint(models_dir)
    if results is None and checkpoint is None:
        raise UserError(f"nothing to resume in {models_dir}: it holds neither {RESULTS} nor {CHECKPOINT}")
    if results is not None and checkpoint is not None and argument_differences(checkpoint["args"], results["args"]):
        raise UserError(f"{models_dir / CHECKPOINT} belongs to another run than {models_dir / RESULTS}")
    stored = results["args"] if results is not None else checkpoint["args"]
    differences = argument_differences(stored, run_arguments(args))
    if differences:
        raise UserError(f"--resume with arguments that differ from the run in {models_dir}: " + "; ".join(differences))
    _remove_stale_temporaries(models_dir)
    results = results if results is not None else new_results(args, manifest)
    if checkpoint is not None and checkpoint["task"] <= len(results["tasks"]):
        checkpoint = None  # the task finished; only the checkpoint's removal was interrupted
    return results, checkpoint


def open_run(args: argparse.Namespace, manifest: dict) -> tuple[dict, dict | None]:
    """The run's results so far and the checkpoint of an unfinished task (``--resume``), or a fresh run."""
    models_dir = Path(args.models_dir)
    previous = _previous_run(models_dir)
    _check_models_dir(models_dir)
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    if args.resume:
        return _resume_run(args, manifest, models_dir)
    if previous:
        if not args.overwrite:
            shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
            raise UserError(
                f"{models_dir} holds a previous run ({shown}); "
                "pass --resume to continue it or --overwrite to replace it"
            )
        _remove_previous_run(models_dir)
    return new_results(args, manifest), None


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


def run(args: argparse.Namespace, manifest: dict) -> dict:
    device = select_device(args.use_gpu)
    applied = ", ".join(f"{k}={v}" for k, v in manifest["applied_defaults"].items())
    print(f"{manifest['dataset']}: {len(manifest['tasks'])} tasks; defaults from the manifest: {applied or 'none'}")
    folders = task_dirs(args.data_dir, manifest)
    tasks = [
        make_task_data(f, manifest, args.channels, args.image_size, args.batch_size, args.num_workers) for f in folders
    ]
    results, checkpoint = open_run(args, manifest)
    rows = None
    for task_no, task in enumerate(tasks, start=1):
        if task_no <= len(results["tasks"]):
            print(f"== {task.name}: finished in the interrupted run, kept ==")
            continue
        resume = checkpoint if checkpoint is not None and checkpoint["task"] == task_no else None
        resumed = f", resuming after epoch {resume['epoch'] + 1}" if resume else ""
        print(f"== {task.name}: {len(task.classes)} classes, {len(task.train.dataset)} training images{resumed} ==")
        tic = time.perf_counter()
        try:
            result = mas_train(task_no, task, args, device, resume)
        except Diverged as err:
            results["diverged"] = {"task": task_no, "message": str(err)}
            save_results(results, args.models_dir)
            raise
        evaluate_now = args.eval_every_task or task_no == len(tasks)
        rows = compute_forgetting(args.models_dir, tasks[:task_no], args, device) if evaluate_now else None
        entry = _task_entry(task_no, task, result, time.perf_counter() - tic, resume is not None)
        record_task(results, entry, [r.now for r in rows] if rows else None)
        save_results(results, args.models_dir)
        remove_checkpoint(args.models_dir)
    if rows is None:  # every task finished in an earlier run: only score them
        rows = compute_forgetting(args.models_dir, tasks, args, device)
        save_results(results, args.models_dir)  # mends a CSV that a crash left behind results.json
    print(format_table(rows))
    print(f"average accuracy: {_pp(sum(r.now for r in rows) / len(rows))} %")
    if args.plot:
        from utils.plot import run_label, write_plots  # matplotlib only when asked for

        for path in write_plots([(run_label(results), results)], Path(args.models_dir) / "plots"):
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
        args, manifest = parse_args(argv)
        return run(args, manifest)
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
