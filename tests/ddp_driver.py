"""Run ``main.main(argv)`` as one rank of a torchrun job, once for each ARGV, and keep what each rank
holds after each task.

    torchrun ... tests/ddp_driver.py OUT ARGV... [--then ARGV...]...

The runs share one process group (torchrun's start-up is what takes the time), one after the other.
After task t of run i (from 0), each rank saves its trunk, head and reg_params to
``OUT/<i>/rank<r>_task<t>.pt``, so that a test can check that the ranks hold the same model (rank 0
alone writes the run's files).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import main
import mas
from utils.runtime import distributed

SEPARATOR = "--then"


def _keep_per_rank(out: Path, run: list[int]) -> None:
    """Wrap RunState.finish_task: after every task, save this rank's state under OUT/<run[0]>/."""
    real = mas.RunState.finish_task

    def finish_task(self, task_no, task, model, reg_params, accuracy):
        real(self, task_no, task, model, reg_params, accuracy)
        state = {"model": model.state_dict(), "reg_params": reg_params, "accuracy": accuracy}
        torch.save(state, out / str(run[0]) / f"rank{distributed.rank()}_task{task_no}.pt")

    mas.RunState.finish_task = finish_task


def _runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


if __name__ == "__main__":
    out, *argv = sys.argv[1:]
    current = [0]
    _keep_per_rank(Path(out), current)
    stop = distributed.stop
    distributed.stop = lambda: None  # main.main leaves the process group to the next run
    try:
        for index, run_argv in enumerate(_runs(argv)):
            current[0] = index
            (Path(out) / str(index)).mkdir(parents=True, exist_ok=True)
            main.main(run_argv)
    finally:
        stop()
