"""Run ``main.main(argv)`` as one rank of a torchrun job and keep what each rank holds after each task.

    torchrun ... tests/ddp_driver.py OUT ARGV...

After every task, each rank saves its trunk, head and reg_params to ``OUT/rank<r>_task<t>.pt``, so
that a test can check that the ranks hold the same model (rank 0 alone writes the run's files).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import main
import mas
from utils import distributed


def _keep_per_rank(out: Path) -> None:
    real = mas.RunState.finish_task

    def finish_task(self, task_no, task, model, reg_params, accuracy):
        real(self, task_no, task, model, reg_params, accuracy)
        state = {"model": model.state_dict(), "reg_params": reg_params, "accuracy": accuracy}
        torch.save(state, out / f"rank{distributed.rank()}_task{task_no}.pt")

    mas.RunState.finish_task = finish_task


if __name__ == "__main__":
    out, *argv = sys.argv[1:]
    Path(out).mkdir(parents=True, exist_ok=True)
    _keep_per_rank(Path(out))
    main.main(argv)
