"""Ctrl-C and SIGTERM during a run: a request to stop at the next safe point.

A terminal delivers Ctrl-C to the whole process group, DataLoader workers included, and a
cluster scheduler sends SIGTERM before it kills a job. Raising KeyboardInterrupt wherever the
signal lands races with everything that is not written for it: a worker killed mid-batch makes
the DataLoader fail with "worker exited unexpectedly", an iterator interrupted while it starts its
workers fails in its own cleanup, and an exception raised inside a library's callback can be
swallowed. So, while a run is in progress (``stop_at_safe_points``):

- the signal handler only records the request;
- the run checks for it at safe points (``check``): after every batch of every loader
  (``InterruptibleLoader``) and between tasks, where everything on disk is consistent (the last
  epoch's checkpoint, the finished tasks);
- DataLoader workers ignore both signals: they are started with the signals blocked (so one that
  arrives while they start waits) and ignore them once running (``worker_init``); the main process
  stops them when it stops.

Since workers ignore SIGTERM, ``Process.terminate`` cannot stop them, and multiprocessing's exit
handler, which terminates and then joins every daemon child, would wait forever for the workers of a
loader that an error left open (its iterator is kept alive by the error's traceback). So every loader
iterator is recorded while it lives, and ``stop_workers`` (run by ``main.py`` when it ends, and at
exit before multiprocessing's handler) shuts their workers down, and kills those that do not stop.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util  # noqa: F401 (registers its exit handler before ours: handlers run last-registered first)
import signal
import threading
import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from utils.runtime import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: list[int] = []  # the signals received while stop_at_safe_points is active
_active = False
_open_iterators: weakref.WeakSet = weakref.WeakSet()  # loader iterators that may hold workers


class Interrupted(KeyboardInterrupt):
    """Raised at a safe point after SIGINT or SIGTERM."""


def _record(signum: int, frame) -> None:
    _requested.append(signum)


def active() -> bool:
    """True while signals are recorded rather than raised (see stop_at_safe_points)."""
    return _active


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Record SIGINT and SIGTERM instead of raising; ``check`` raises ``Interrupted`` at safe points."""
    global _active
    if threading.current_thread() is not threading.main_thread() or _active:
        yield
        return
    previous = {s: signal.signal(s, _record) for s in SIGNALS}
    _requested.clear()
    _active = True
    try:
        yield
    finally:
        _active = False
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    check()  # a signal after the last safe point still stops the run: it is never swallowed


@contextlib.contextmanager
def raise_at_once() -> Iterator[None]:
    """For work that has no safe points and writes nothing of the run (a download into a cache):
    Ctrl-C and SIGTERM raise at once, as without stop_at_safe_points."""
    if not _active:
        yield
        return
    previous = {s: signal.signal(s, signal.default_int_handler) for s in SIGNALS}
    try:
        check()
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check() -> None:
    """Raise ``Interrupted`` if a stop was requested."""
    if _requested:
        raise Interrupted(signal.Signals(_requested[0]).name)


def check_everywhere(extra: list[float] | None = None) -> list[float]:
    """``check`` at a point every rank reaches in step (an optimizer step, between tasks): with several
    ranks the request is summed over them, so that they all stop at the same step. ``extra`` values
    ride along in the same all-reduce (the step's loss); their sums are returned."""
    values = [*(extra or []), float(len(_requested))]
    if distributed.active():
        summed = torch.tensor(values, dtype=torch.float64)
        distributed.sum_([summed])
        values = summed.tolist()
    if values[-1]:
        raise Interrupted(signal.Signals(_requested[0]).name if _requested else "a signal to another rank")
    return values[:-1]


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGINT and SIGTERM in this thread and in the processes it starts meanwhile."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_init(worker_id: int) -> None:
    """A DataLoader worker ignores the signals meant for the run: the main process stops it."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _stop_iterator(iterator) -> None:
    """Shut down the workers of a DataLoader iterator (torch asks them to finish, joins them for a few
    seconds, then sends SIGTERM, which they ignore) and kill any that is still running."""
    shutdown = getattr(iterator, "_shutdown_workers", None)  # multiprocessing iterators only
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()


def stop_workers() -> None:
    """Stop the workers of every loader iterator still open (an error left it so): the process can exit."""
    for iterator in list(_open_iterators):
        _stop_iterator(iterator)


atexit.register(stop_workers)  # before multiprocessing's handler, which would join the workers forever


class InterruptibleLoader(DataLoader):
    """A DataLoader that starts its workers with the signals held and stops at a requested interrupt
    after any batch."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("worker_init_fn", worker_init)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        with signals_blocked():
            iterator = super().__iter__()
        _open_iterators.add(iterator)
        try:
            for batch in iterator:
                if not distributed.active():  # ranks stop together at a step instead (check_everywhere)
                    check()
                yield batch
        finally:
            _stop_iterator(iterator)  # now, not at garbage collection (a traceback may hold the iterator)
            del iterator
