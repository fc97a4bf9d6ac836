"""Run ``main.main(argv)`` and send a signal to this process group at a chosen moment.

    python3 -c "import runpy; runpy.run_path('tests/interrupt_driver.py', run_name='__main__')" MOMENT SIGNAL ARGV...

The driver is started as the leader of its own process group (tests use ``start_new_session``),
so ``os.killpg`` reaches it and its DataLoader workers, as a terminal's Ctrl-C reaches a job.
MOMENT is ``<what>:<n>``: the n-th (1-based) occurrence of
  worker    a DataLoader worker starting (sent from inside the worker, before it is set up)
  step      an optimizer step
  importance  the start of an importance pass
  evaluate  the start of a test evaluation
  save      the start of an atomic file write
"""

from __future__ import annotations

import os
import signal
import sys

import importance
import main
import mas
import optimizer_lib
import utils.artefacts.files
import utils.runtime.interrupt


def _fire_on(counter: dict, n: int, signum: int) -> None:
    counter["seen"] += 1
    if counter["seen"] == n:
        os.killpg(os.getpgrp(), signum)


def _wrap(owner, name: str, counter: dict, n: int, signum: int) -> None:
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        _fire_on(counter, n, signum)
        return real(*args, **kwargs)

    setattr(owner, name, wrapped)


def install(moment: str, signum: int) -> None:
    what, n = moment.split(":")
    counter = {"seen": 0}
    targets = {
        "worker": (utils.runtime.interrupt, "worker_init"),
        "step": (optimizer_lib.LocalSgd, "step"),
        "importance": (importance, "mas_batch_importance"),
        "evaluate": (mas, "evaluate"),
        "save": (utils.artefacts.files, "atomic_open"),
    }
    owner, name = targets[what]
    if what == "worker":  # in the worker: counts per process, so fire in the n-th loader's first worker
        real = utils.runtime.interrupt.worker_init
        starts = {"loader": 0}

        def loader_iter(self, _real=utils.runtime.interrupt.InterruptibleLoader.__iter__):
            starts["loader"] += 1
            return _real(self)

        utils.runtime.interrupt.InterruptibleLoader.__iter__ = loader_iter

        def worker_init(worker_id: int) -> None:
            if starts["loader"] == int(n) and worker_id == 0:
                os.killpg(os.getpgrp(), signum)
            real(worker_id)

        utils.runtime.interrupt.worker_init = worker_init
        return
    _wrap(owner, name, counter, int(n), signum)


if __name__ == "__main__":
    moment, signame, *argv = sys.argv[1:]
    if moment != "none":
        install(moment, getattr(signal, signame))
    main.main(argv)
