"""``--hparam_search chf``: each task's learning rate and lambda chosen on its validation set by the
Continual Hyperparameter Framework (De Lange, Aljundi, Masana, Parisot, Jia, Leonardis, Slabaugh,
Tuytelaars. A continual learning survey: defying forgetting in classification tasks. TPAMI 2021).

Per task, with the new task's data only (its validation images, never the test set nor earlier tasks):

1. maximal plasticity: fine-tune (no penalty) the task's starting model for every learning rate of
   ``--chf_lrs``; the best validation accuracy A* and its learning rate are kept (the first on ties);
2. stability decay: train the method with that learning rate and lambda = ``--chf_lambda``; while the
   validation accuracy is below (1 - ``--chf_p``) A*, multiply lambda by ``--chf_decay`` and train
   again, at most ``--chf_max_tries`` times; the last lambda tried is kept if none reaches it.

Methods without a penalty (``penalised = False`` in methods/: fine-tuning) and the first task (no
earlier task to protect) only search the learning rate. Every trial is a real training
(``mas.train_task``, ``--chf_epochs`` epochs) of a copy of the task's starting state, with the task's
seed, in memory; a trial that diverges scores 0. Each finished trial is appended to ``results.json``
(``hparam_search``, one entry per task), so an interrupted search resumes (``--resume``) without
redoing one. Then the task is trained for real with the chosen values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
from tqdm import tqdm

from config import RunConfig
from mas import RunState, train_task
from methods import method_class
from model_train import evaluate
from utils import Diverged, UserError
from utils.artefacts.results import save_results
from utils.data.tasks import TaskData
from utils.runtime import distributed

PLASTICITY, STABILITY = "plasticity", "stability"
Trial = Callable[[str, float, float | None], float]  # (stage, lr, lambda or None) -> validation accuracy (%)


def chf_rule(trial: Trial, options: dict[str, Any], search_lambda: bool) -> tuple[float, float | None]:
    """The learning rate and lambda (None when ``search_lambda`` is False) that CHF chooses, calling
    ``trial`` in the rule's order; ``options`` holds the --chf_ flags."""
    best_lr, best = None, -1.0
    for lr in options["chf_lrs"]:
        accuracy = trial(PLASTICITY, lr, None)
        if accuracy > best:
            best_lr, best = lr, accuracy
    if not search_lambda:
        return best_lr, None
    reg_lambda, threshold = options["chf_lambda"], (1.0 - options["chf_p"]) * best
    for attempt in range(1, options["chf_max_tries"] + 1):
        if trial(STABILITY, best_lr, reg_lambda) >= threshold or attempt == options["chf_max_tries"]:
            break
        reg_lambda *= options["chf_decay"]
    return best_lr, reg_lambda


def trial_config(config: RunConfig, lr: float, reg_lambda: float | None) -> RunConfig:
    """The run's config for one trial: fine-tuning (``reg_lambda`` None) or the method, --chf_epochs."""
    changes: dict[str, Any] = {"init_lr": lr, "num_epochs": config.search_options["chf_epochs"]}
    if reg_lambda is None:
        changes.update(method="finetune", method_options=MappingProxyType({}), reg_lambda=0.0)
    else:
        changes["reg_lambda"] = reg_lambda
    return dataclasses.replace(config, **changes)


def run_trial(state: RunState, task_no: int, task: TaskData, device: torch.device, hyper: RunConfig) -> dict:
    """Train a copy of the task's starting state with ``hyper`` and score it on the validation set."""
    try:
        trained = train_task(state, task_no, task, device, hyper=hyper, checkpoints=False)
    except Diverged:
        return {"validation_accuracy": 0.0, "diverged": True}
    accuracy = evaluate(trained.model, task.validation, device, desc=f"{task.name} validation")
    return {"validation_accuracy": accuracy, "diverged": False}


class TrialLog:
    """The trials of one task in results.json: a trial already there is read back, not trained again
    (the rule asks for the same trials in the same order); a new one is trained, appended and saved."""

    def __init__(self, state: RunState, task_no: int, task: TaskData, device: torch.device, entry: dict) -> None:
        self.state, self.task_no, self.task, self.device, self.entry = state, task_no, task, device, entry
        self.asked = 0

    def __call__(self, stage: str, lr: float, reg_lambda: float | None) -> float:
        done, self.asked = self.entry["trials"], self.asked + 1
        if self.asked <= len(done):
            known = done[self.asked - 1]
            if (known["stage"], known["lr"], known["reg_lambda"]) != (stage, lr, reg_lambda):
                raise UserError(f"results.json: the hparam_search trials of {self.task.name} are not this search's")
            return known["validation_accuracy"]
        hyper = trial_config(self.state.config, lr, reg_lambda)
        found = {"stage": stage, "lr": lr, "reg_lambda": reg_lambda}
        found.update(run_trial(self.state, self.task_no, self.task, self.device, hyper))
        done.append(found)
        _save(self.state)
        _say(f"{self.task.name} chf trial {self.asked}: {_describe(found)}")
        return found["validation_accuracy"]


def choose_hparams(state: RunState, task_no: int, task: TaskData, device: torch.device) -> RunConfig | None:
    """The run's config with task ``task_no``'s chosen learning rate and lambda (searched now, or read
    back from results.json); None without --hparam_search."""
    config = state.config
    if config.hparam_search == "off":
        return None
    entry = _task_entry(state.results, task_no)
    if entry["chosen"] is None:
        search_lambda = method_class(config.method).penalised and task_no > 1
        lr, reg_lambda = chf_rule(TrialLog(state, task_no, task, device, entry), config.search_options, search_lambda)
        entry["chosen"] = {"lr": lr, "reg_lambda": reg_lambda}
        _save(state)
        shown = "no penalty" if reg_lambda is None else f"reg_lambda {reg_lambda:g}"
        _say(f"{task.name} chf chose lr {lr:g}, {shown} ({len(entry['trials'])} trials)")
    chosen = entry["chosen"]
    lam = config.reg_lambda if chosen["reg_lambda"] is None else chosen["reg_lambda"]
    return dataclasses.replace(config, init_lr=chosen["lr"], reg_lambda=lam)


def _task_entry(results: dict, task_no: int) -> dict:
    """Task ``task_no``'s entry of results.json's ``hparam_search`` (created when the search starts)."""
    entries = results.setdefault("hparam_search", [])
    found = [e for e in entries if e.get("task") == task_no]
    if found:
        return found[0]
    entries.append({"task": task_no, "trials": [], "chosen": None})
    return entries[-1]


def _describe(trial: dict) -> str:
    penalty = "fine-tuning" if trial["reg_lambda"] is None else f"reg_lambda {trial['reg_lambda']:g}"
    diverged = " (diverged)" if trial["diverged"] else ""
    return f"{trial['stage']}, lr {trial['lr']:g}, {penalty}: validation {trial['validation_accuracy']:.2f} %{diverged}"


def _save(state: RunState) -> None:
    """results.json with the trials so far, written by rank 0 while the others wait."""
    if distributed.is_writer():
        save_results(state.results, state.config.models_dir)
    distributed.barrier()


def _say(line: str) -> None:
    if distributed.is_writer():
        tqdm.write(line)
