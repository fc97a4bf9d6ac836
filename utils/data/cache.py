"""``--cache``: each split of a task decoded once per run into memory, or read from its files every epoch.

Modes:

- ``ram``: every split is decoded into a uint8 tensor N x C x H x W (and its int64 labels);
- ``auto`` (the default): as ``ram`` while the task fits the memory budget, a quarter of the machine's
  RAM (``os.sysconf``); a task that does not fit, or a split whose images differ in size, is read from
  its files every epoch, and one line says so;
- ``off``: the files every epoch (torchvision ImageFolder), as before the cache existed.

When. A split is decoded when one of its loaders is first iterated (``RunCache.prepare``). The
training or importance loader of a task decodes the task's train and test splits together, before
its first epoch, so that a bad image anywhere in the task stops the run before the task trains, and
releases the train splits of the other tasks: those tasks are finished (or not started) and a
task's training images serve only its epochs and its importance pass. Test splits stay, since the
accuracy matrix scores every task seen so far after every task. At task t the cache holds the train
split of task t and the test splits of tasks 1..t. A released split that is needed again is decoded
again.

Decoding runs in DataLoader workers (``--num_workers``) with its own torch.Generator: the run's
results depend on the global RNG stream (every task seeds it, checkpoints restore it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tqdm import tqdm

from utils import UserError
from utils.data.decode import DecodedSplit, MixedSizes, PilTransform, Samples, decode_split, first_image

CACHE_MODES = ("auto", "ram", "off")
SPLITS_TO_DECODE = {
    "train": ("train", "test"),
    "test": ("test",),
    "validation": ("validation",),
}  # what a loader of each split decodes


def memory_budget() -> int | None:
    """A quarter of the machine's physical memory, in bytes; None where os.sysconf cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(nbytes: int) -> str:
    """1536 -> "1.5 kB"; binary units."""
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


@dataclass(eq=False)
class SplitStore:
    """One split of a task: its files in ImageFolder's order, and its tensors while they are decoded."""

    name: str  # e.g. "Task_2 train"
    samples: Samples
    mode: str  # "L" or "RGB"
    pil_transform: PilTransform | None  # a deterministic resize that the file path applies, done once
    decoded: DecodedSplit | None = None
    from_files: bool = False  # not held in memory: read from the files every epoch

    def estimated_bytes(self) -> int:
        """What decoding will take: the first image's size times the number of images."""
        return len(self.samples) * (first_image(self.samples, self.mode, self.pil_transform).numel() + 8)


@dataclass
class RunCache:
    """The splits of a run's tasks: which are held, and when they are decoded and released."""

    mode: str
    num_workers: int
    budget: int | None = field(default_factory=lambda: memory_budget())  # looked up when called
    tasks: dict[str, dict[str, SplitStore]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise UserError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {self.mode!r}")

    def add(self, task: str, splits: dict[str, SplitStore]) -> None:
        self.tasks[task] = splits

    def held_bytes(self) -> int:
        return sum(s.decoded.nbytes for splits in self.tasks.values() for s in splits.values() if s.decoded)

    def prepare(self, task: str, split: str) -> None:
        """Before a loader of ``task``'s ``split`` is iterated: decode what it needs (see above)."""
        wanted = [self.tasks[task][s] for s in SPLITS_TO_DECODE[split]]
        missing = [s for s in wanted if s.decoded is None and not s.from_files]
        if not missing:
            return
        if split == "train":
            self._release_train_splits(but=task)
        if self._fits(task, missing):
            for store in missing:
                self._decode(store)

    def _release_train_splits(self, but: str) -> None:
        for name, splits in self.tasks.items():
            if name != but:
                splits["train"].decoded = None

    def _fits(self, task: str, stores: list[SplitStore]) -> bool:
        """ram: always; auto: if the held splits and these fit the budget (else they read their files)."""
        if self.mode == "ram":
            return True
        needed, held = sum(s.estimated_bytes() for s in stores), self.held_bytes()
        if self.budget is not None and held + needed <= self.budget:
            return True
        budget = "unknown" if self.budget is None else format_bytes(self.budget)
        tqdm.write(
            f"--cache auto: {task} ({format_bytes(needed)}, with {format_bytes(held)} held) does not fit the memory "
            f"budget ({budget}, a quarter of the RAM); reading its files every epoch"
        )
        for store in stores:
            store.from_files = True
        return False

    def _decode(self, store: SplitStore) -> None:
        try:
            store.decoded = decode_split(store.samples, store.mode, store.pil_transform, self.num_workers, store.name)
        except MixedSizes as err:
            if self.mode == "ram":
                raise UserError(f"--cache ram: {err}; resize them, or run with --cache auto or off") from None
            tqdm.write(f"--cache auto: {err}; reading its files every epoch")
            store.from_files = True
