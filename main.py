"""Train a task sequence with Memory Aware Synapses and print the forgetting table.

Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars. Memory Aware Synapses: Learning
what (not) to forget. ECCV 2018. Each task is trained on  CE + reg_lambda * sum
Omega (theta - theta*)^2  (Eq. 3), with Omega measured after every task (Eq. 2, 4).

    python3 data_prep.py && python3 main.py --use_gpu --reg_lambda 0.01
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from config import RunConfig, parse_config
from hparam_search import choose_hparams
from mas import ForgettingRow, RunState, compute_forgetting, mas_train
from methods import method_class
from scenario import DESCRIPTIONS, class_counts, scenario_tasks
from task_agnostic import TAG_METRICS, record_task_agnostic, start_task_agnostic
from utils import Diverged, UserError
from utils.artefacts.checkpoint import CHECKPOINT, Checkpoint, argument_differences, load_checkpoint, remove_checkpoint
from utils.artefacts.model_files import pretrained_alexnet_state
from utils.artefacts.results import (
    RESULTS,
    format_pp,
    load_results,
    new_results,
    record_task,
    save_results,
    summarize,
)
from utils.artefacts.run_folder import (
    check_models_dir,
    is_run_folder,
    remove_previous_run,
    remove_stale_temporaries,
    run_artefacts,
)
from utils.data.cache import RunCache
from utils.data.fingerprint import check_data_files, record_data_files
from utils.data.tasks import make_task_data, task_dirs
from utils.runtime import distributed, interrupt
from utils.runtime.folder_lock import FolderLock
from validation_scores import record_validation, score_validation


def say(*args) -> None:
    """Progress and results on the terminal: printed by rank 0 only (errors by every rank)."""
    if distributed.is_writer():
        print(*args)


def _write(save, *args) -> None:
    """A file of the run, written by rank 0 while the others wait."""
    if distributed.is_writer():
        save(*args)
    distributed.barrier()


def format_table(rows: list[ForgettingRow], metrics: dict[str, float | None]) -> str:
    """The seed's forgetting table; its avg line shows the run's metrics (utils/artefacts/results.summarize)."""
    rule = "-----+--------------------+---------+----------------"
    lines = ["Task | after training (%) | now (%) | forgetting (pp)", rule]
    after = sum(r.after_training for r in rows) / len(rows)
    mean = ForgettingRow(0, after, metrics["average_accuracy"], metrics["average_forgetting"])
    for label, row in [*((str(r.task), r) for r in rows), ("avg", mean)]:
        if label == "avg":
            lines.append(rule)
        after, now, forgetting = (format_pp(v) for v in (row.after_training, row.now, row.forgetting))
        lines.append(f"{label:>4} | {after:>18} | {now:>7} | {forgetting:>15}")
    return "\n".join(lines)


def _resume_run(config: RunConfig, models_dir: Path) -> tuple[RunState, Checkpoint | None]:
    results = load_results(models_dir)
    checkpoint = load_checkpoint(models_dir)
    if results is None and checkpoint is None:
        raise UserError(f"nothing to resume in {models_dir}: it holds neither {RESULTS} nor {CHECKPOINT}")
    if results is not None and checkpoint is not None and argument_differences(checkpoint.args, results["args"]):
        raise UserError(f"{models_dir / CHECKPOINT} belongs to another run than {models_dir / RESULTS}")
    stored = results["args"] if results is not None else checkpoint.args
    differences = argument_differences(stored, config.recorded())
    if differences:
        raise UserError(f"--resume with arguments that differ from the run in {models_dir}: " + "; ".join(differences))
    distributed.on_writer(lambda: check_data_files(config.data_dir, config.manifest, models_dir))
    distributed.on_writer(lambda: remove_stale_temporaries(models_dir))
    if results is not None:
        results.setdefault("scenario", "task")  # a run recorded before --scenario existed
    state = RunState(config, results if results is not None else _new_results(config))
    state.load_finished(models_dir)
    if checkpoint is not None and checkpoint.task <= state.finished:
        checkpoint = None  # the task finished; only the checkpoint's removal was interrupted
    return state, checkpoint


def _new_results(config: RunConfig) -> dict:
    results = new_results(config.recorded(), config.manifest, method_class(config.method)(config, None).label())
    results["scenario"] = config.scenario
    if config.scenario == "task":  # domain and class score without the task: their matrix is task-agnostic
        start_task_agnostic(results)
    return results


def _prepare_models_dir(config: RunConfig, lock: FolderLock) -> None:
    """Checks of the models folder, its lock (one writer: refused before anything is read or removed),
    and --overwrite's removal of the earlier run (rank 0 only)."""
    models_dir = Path(config.models_dir)
    if config.resume and config.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    check_models_dir(models_dir, Path(config.data_dir))
    lock.acquire()
    if config.resume:
        return
    previous = run_artefacts(models_dir)
    if previous and not config.overwrite:
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise UserError(
            f"{models_dir} holds a previous run ({shown}); pass --resume to continue it or --overwrite to replace it"
        )
    if previous:
        remove_previous_run(models_dir)


def open_run(config: RunConfig, lock: FolderLock) -> tuple[RunState, Checkpoint | None]:
    """The run so far and the checkpoint of an unfinished task (``--resume``), or a fresh run; rank 0
    holds ``lock`` on the models folder from here on."""
    distributed.on_writer(lambda: _prepare_models_dir(config, lock))  # an error reaches every rank
    if config.resume:
        return _resume_run(config, Path(config.models_dir))
    distributed.on_writer(lambda: record_data_files(config.data_dir, config.manifest, config.models_dir))
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


def _load_tasks(config: RunConfig, device: torch.device) -> list:
    manifest = config.manifest
    applied = ", ".join(f"{k}={v}" for k, v in config.applied_defaults.items())
    say(f"{manifest['dataset']}: {len(manifest['tasks'])} tasks; presets for this data: {applied or 'none'}")
    cache = RunCache(config.cache, config.num_workers)  # decodes each task's images when it first needs them
    loaders = {
        "importance_batch_size": config.importance_batch_size,
        "cache": cache,
        "pin_memory": device.type == "cuda",  # batches copied to the GPU with non_blocking (model_train.py)
        "val_fraction": config.val_fraction,  # held out of every task's training images (utils/data/validation.py)
        "seed": config.seed,
    }
    tasks = [
        make_task_data(
            f, manifest, config.channels, config.image_size, config.batch_size, config.num_workers, **loaders
        )
        for f in task_dirs(config.data_dir, manifest)
    ]
    return scenario_tasks(config.scenario, tasks, class_counts(manifest))


def _train_task(state: RunState, task_no: int, task, device: torch.device, checkpoint: Checkpoint | None):
    """Train one task (with the learning rate and lambda --hparam_search chooses); a run that diverges
    says so in results.json before it stops."""
    try:
        hyper = choose_hparams(state, task_no, task, device)
        return mas_train(state, task_no, task, device, checkpoint, hyper)
    except Diverged as err:
        state.results["diverged"] = {"task": task_no, "message": str(err)}
        _write(save_results, state.results, state.config.models_dir)
        raise


def _task_line(task, result, seconds: float, resumed: str) -> str:
    """The one line a task prints by default (--verbose adds every epoch's)."""
    last = result.history[-1] if result.history else None
    trained = f"train loss {last['loss']:.4f}, train acc {last['accuracy']:.2f} %, " if last else ""
    return (
        f"{task.name} ({len(task.classes)} classes, {len(task.train.dataset)} images{resumed}): "
        f"{len(result.history)} epochs, {trained}test acc {result.test_accuracy:.2f} %, {seconds:.1f} s"
    )


def _train_tasks(state: RunState, tasks: list, device: torch.device, checkpoint: Checkpoint | None) -> list | None:
    """Train the unfinished tasks; the last forgetting rows computed (None if no task ran)."""
    config, rows = state.config, None
    for task_no, task in enumerate(tasks, start=1):
        if task_no <= state.finished:
            say(f"== {task.name}: finished in the interrupted run, kept ==")
            continue
        interrupt.check_everywhere()
        resume = checkpoint if checkpoint is not None and checkpoint.task == task_no else None
        resumed = f", resuming after epoch {resume.epoch + 1}" if resume else ""
        if config.verbose:
            say(f"== {task.name}: {len(task.classes)} classes, {len(task.train.dataset)} training images{resumed} ==")
        tic = time.perf_counter()
        result = _train_task(state, task_no, task, device, resume)
        say(_task_line(task, result, time.perf_counter() - tic, resumed))
        evaluate_now = config.eval_every_task or task_no == len(tasks)
        rows = compute_forgetting(state, tasks[:task_no], device) if evaluate_now else None
        entry = _task_entry(task_no, task, result, time.perf_counter() - tic, resume is not None)
        record_task(state.results, entry, [r.now for r in rows] if rows else None)
        record_task_agnostic(state.results, state.shared, state.heads, tasks[:task_no], evaluate_now, device)
        if task.validation is not None:
            row = score_validation(state, tasks[:task_no], len(tasks), device, evaluate_now)
            record_validation(state.results, row)
        _write(save_results, state.results, config.models_dir)
        _write(remove_checkpoint, config.models_dir)
    return rows


def _report(config: RunConfig, results: dict, rows: list[ForgettingRow]) -> dict:
    """Print the table and the averages, write the plots; the results with the forgetting rows."""
    say(f"scenario: {DESCRIPTIONS[config.scenario]}")
    metrics = summarize(results["accuracy_matrix"])  # the one place the run's averages are computed
    say(format_table(rows, metrics))
    say(f"average accuracy: {format_pp(metrics['average_accuracy'])} %")
    tag = results.get(TAG_METRICS, {}).get("average_accuracy")
    if tag is not None:
        say(f"task-agnostic average accuracy (argmax over all heads, no task given): {format_pp(tag)} %")
    if len(rows) > 1:
        say(
            f"average forgetting of tasks 1-{len(rows) - 1} (the avg line counts the last task too): "
            f"{format_pp(metrics['average_forgetting_previous'])} pp"
        )
    if config.plot and distributed.is_writer():
        from utils.artefacts.plot import run_label, write_plots  # matplotlib only when asked for

        for path in write_plots([(run_label(results), results)], Path(config.models_dir) / "plots"):
            say(f"wrote {path}")
    say(
        f"artefacts of the run in {config.models_dir}: results.json, accuracy_matrix.csv, shared_model.pth, "
        "reg_params.pickle, Task_<n>/"
    )
    return {**results, "forgetting": [vars(r) for r in rows], **metrics}


def _fetch_pretrained_weights(config: RunConfig) -> None:
    """ImageNet weights into torch.hub's cache before anything is created (rank 0 first, then the
    others, which find them in the cache of their node)."""
    if not (config.pretrained and config.arch == "alexnet" and not config.resume):
        return
    with interrupt.raise_at_once():  # nothing is saved yet: stop the download at once
        distributed.on_writer(lambda: pretrained_alexnet_state() and None)
        if not distributed.is_writer():
            pretrained_alexnet_state()


def run(config: RunConfig, device: torch.device) -> dict:
    tasks = _load_tasks(config, device)
    _fetch_pretrained_weights(config)
    interrupt.check_everywhere()
    with FolderLock(Path(config.models_dir), "main.py") as lock:  # the kernel releases it if the process dies
        state, checkpoint = open_run(config, lock)
        rows = _train_tasks(state, tasks, device, checkpoint)
        if rows is None:  # every task finished in an earlier run: only score them
            rows = compute_forgetting(state, tasks, device)
            _write(save_results, state.results, config.models_dir)  # mends a CSV a crash left behind results.json
        return _report(config, state.results, rows)


def for_world(config: RunConfig, world: distributed.World) -> RunConfig:
    """The run as one rank of ``world`` sees it (--batch_size is the global batch, of any size: each rank
    weights its share, see utils/runtime/distributed.py); after torchrun restarted the workers (a worker died),
    the run continues from its last checkpoint."""
    config = dataclasses.replace(config, world_size=world.size)
    if world.restart and not config.resume and is_run_folder(Path(config.models_dir)):
        say(f"torchrun restarted the workers (restart {world.restart}): resuming from the last checkpoint")
        config = dataclasses.replace(config, resume=True, overwrite=False)
    return config


def _one_line(err: Exception) -> str:
    """The message of a UserError; a DataLoader worker wraps it in its traceback, whose last line it is."""
    text = str(err)
    if "\n" not in text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if text.startswith("Caught ") and "Traceback" in text:
        return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")
    return " ".join(lines)


def _without_resume_flags(argv: list[str]) -> list[str]:
    """argv without --resume and --overwrite (or the prefixes of them that argparse accepts)."""
    return [a for a in argv if not (len(a) >= 5 and ("--resume".startswith(a) or "--overwrite".startswith(a)))]


def _launcher(environ: dict[str, str]) -> tuple[str, str]:
    """How this process was started: ``python3``, or the torchrun line that starts the same ranks again
    (a resume must have the run's --world_size), rebuilt from what torchrun sets in the environment;
    and a note for several nodes, whose rendezvous flags the environment does not tell."""
    if "LOCAL_WORLD_SIZE" not in environ or "WORLD_SIZE" not in environ:
        return "python3", ""
    nproc, nodes = environ["LOCAL_WORLD_SIZE"], environ.get("GROUP_WORLD_SIZE", "1")
    if nodes == "1":
        return f"torchrun --standalone --nproc_per_node {nproc}", ""
    note = f" (on each of the {nodes} nodes, with the rendezvous flags you gave torchrun there)"
    return f"torchrun --nnodes {nodes} --nproc_per_node {nproc}", note


def _interrupted_message(argv: list[str], config: RunConfig | None) -> str:
    """What Ctrl-C (or SIGTERM) leaves, and the command that continues from it (under torchrun, the
    same torchrun line: a resume needs the run's number of ranks)."""
    launcher, note = _launcher(dict(os.environ))
    models_dir = Path(config.models_dir) if config is not None else None
    if models_dir is None or not ((models_dir / RESULTS).exists() or (models_dir / CHECKPOINT).exists()):
        return f"interrupted before anything was saved; start again with{note}\n  " + " ".join(
            [launcher, "main.py", *map(shlex.quote, argv)]
        )
    command = " ".join([launcher, "main.py", *map(shlex.quote, _without_resume_flags(argv)), "--resume"])
    return f"interrupted: finished tasks and the last epoch's checkpoint are intact; continue with{note}\n  {command}"


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train every task, print and return the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    config = None
    try:
        world = distributed.from_environment()
        config = for_world(parse_config(argv), world)
        device = distributed.start(world, config.use_gpu)
        with interrupt.stop_at_safe_points():
            return run(config, device)
    except UserError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        distributed.linger_after_error()  # every rank's line is printed before torchrun stops the group
        raise SystemExit(1) from None
    except SystemExit as stop:  # a flag refused by argparse (its one line is printed), or --help
        if stop.code not in (0, None):
            distributed.linger_after_error()
        raise
    except Exception as err:
        if debug or not distributed.lost_a_rank(err):
            raise
        print(f"error: rank {distributed.rank()} lost the other ranks: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM, at a safe point (utils/runtime/interrupt.py)
        if distributed.is_writer():
            print("\n" + _interrupted_message(argv, config), file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
