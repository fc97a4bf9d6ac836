"""A split served from memory once the data cache decoded it (``utils/data/cache.py``), else from its files.

``SplitDataset`` fetches whole batches (``__getitems__``): from memory, one index into the uint8 tensor
and the file path's transform of each image (``utils/data/transforms.py``); from the files, sample by
sample, as the file path. The DataLoader around it (``CachedLoader``) draws from the global RNG exactly
as the file path's does (the shuffle, the workers' base seed), and the transforms run where the file
path's run (its workers, or this process with ``--num_workers 0``), so a run with the cache sees the same
samples in the same order with the same random crops: the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, default_collate

from utils.data.cache import SplitStore
from utils.data.decode import ImageFiles
from utils.data.transforms import BatchTransform
from utils.runtime.interrupt import InterruptibleLoader

Batch = tuple[torch.Tensor, torch.Tensor]


class SplitDataset(Dataset):
    """A split's (image, label) pairs, by batches: transformed from memory, or from ``files``."""

    def __init__(self, files: ImageFiles, store: SplitStore, transform: BatchTransform) -> None:
        self.files, self.store, self.transform = files, store, transform

    def __len__(self) -> int:
        return len(self.files)

    @property
    def root(self) -> str:
        return self.files.root

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: list[int]) -> Batch:
        decoded = self.store.decoded
        if decoded is None:
            return default_collate([self.files[i] for i in indices])
        index = torch.tensor(indices, dtype=torch.int64)
        return self.transform(decoded.images[index]), decoded.labels[index]


def _collated(batch: Batch) -> Batch:
    return batch  # SplitDataset.__getitems__ returns whole batches


class CachedLoader(InterruptibleLoader):
    """A loader of a SplitDataset: iterating it first lets the cache decode what it needs (``prepare``)."""

    def __init__(self, dataset: SplitDataset, prepare: Callable[[], None], **kwargs) -> None:
        super().__init__(dataset, collate_fn=_collated, **kwargs)
        self.prepare = prepare

    def __iter__(self) -> Iterator[Batch]:
        self.prepare()
        return super().__iter__()
