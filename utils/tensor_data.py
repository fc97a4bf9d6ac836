"""A split served from memory once the data cache decoded it (``utils/data_cache.py``), else from its files.

``SplitDataset`` fetches whole batches (``__getitems__``): from memory, one index into the uint8 tensor
and one transform of the batch; from the files, sample by sample, as the file path. The
DataLoader around it (``CachedLoader``) draws from the global RNG exactly as the file path's does (the
shuffle, the workers' base seed), so a run with the cache sees the same sample order.

Where the transforms run. By default inside the loader (its workers, or this process with
``--num_workers 0``). With ``transform_on`` a device (CUDA), the loader hands over the uint8 batch,
which is moved with ``non_blocking`` (from pinned memory) and transformed there, batch by batch; the
random crops draw their parameters from the global RNG in this process, in sample order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, default_collate

from utils.data_cache import SplitStore
from utils.image_decode import ImageFiles
from utils.interrupt import InterruptibleLoader
from utils.tensor_transforms import TensorTransform

Batch = tuple[torch.Tensor, torch.Tensor]


class SplitDataset(Dataset):
    """A split's (image, label) pairs, by batches: transformed from memory, or from ``files``."""

    def __init__(self, files: ImageFiles, store: SplitStore, transform: TensorTransform | None) -> None:
        self.files, self.store, self.transform = files, store, transform  # transform None: raw uint8

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
        images = decoded.images[index]
        return (images if self.transform is None else self.transform.batch(images)), decoded.labels[index]


def _collated(batch: Batch) -> Batch:
    return batch  # SplitDataset.__getitems__ returns whole batches


class CachedLoader(InterruptibleLoader):
    """A loader of a SplitDataset: iterating it first lets the cache decode what it needs
    (``prepare``); with ``transform_on``, batches held in memory are transformed on that device."""

    def __init__(
        self,
        dataset: SplitDataset,
        prepare: Callable[[], None],
        transform_on: torch.device | None = None,
        device_transform: TensorTransform | None = None,
        **kwargs,
    ) -> None:
        pin = transform_on is not None and transform_on.type == "cuda"
        super().__init__(dataset, collate_fn=_collated, pin_memory=pin, **kwargs)
        self.prepare, self.transform_on, self.device_transform = prepare, transform_on, device_transform

    def __iter__(self) -> Iterator[Batch]:
        self.prepare()
        batches = super().__iter__()
        if self.transform_on is None or self.dataset.store.decoded is None:
            return batches
        return self._on_device(batches)

    def _on_device(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for images, labels in batches:
            yield self.device_transform.batch(images.to(self.transform_on, non_blocking=True)), labels
