"""A training sampler and DataLoader whose position inside an epoch survives a checkpoint.

Why not torch's RandomSampler: it draws its seed from the global RNG when an epoch starts, so
after a resume the order differs, and Lightning restarts an interrupted epoch from its first
batch unless the DataLoader is *stateful*. Here the order of epoch e is a pure function of
(seed, e), each DDP rank takes its own shard, and the DataLoader reports how many batches it
handed out, which Lightning stores in the checkpoint (`fit_loop.combined_loader`) and gives back
through ``load_state_dict`` before the first batch of the resumed run is drawn.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, sharded across ``num_replicas`` ranks, that can start at an offset.

    Each rank sees ``ceil(n / num_replicas)`` indices per epoch (the permutation is padded by
    wrapping around, as DistributedSampler does, so every rank runs the same number of steps).
    """

    def __init__(
        self, num_samples: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.shuffle = num_samples, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start = 0  # indices of this epoch (on this rank) already consumed before a resume

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning when an epoch starts."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.num_replicas
        order = (order * math.ceil(total / self.n))[:total]
        shard = order[self.rank :: self.num_replicas]
        start, self.start = self.start, 0  # the offset applies to this pass only
        return iter(shard[start:])


class ResumableDataLoader(DataLoader):
    """DataLoader that counts the batches it handed out this epoch, and can skip them after a resume.

    Lightning sees ``state_dict``/``load_state_dict`` and saves the state in every checkpoint. The
    count is exact because Lightning fetches sized loaders lazily (no prefetch), and the counter sits
    after the worker queue, so it counts batches delivered to the training loop, not indices drawn.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch = sampler.epoch
        self._delivered = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):  # Lightning swapped it (e.g. overfit_batches)
            yield from super().__iter__()
            return
        if sampler.epoch != self._epoch:  # a fresh epoch (Lightning called set_epoch)
            self._epoch, self._delivered = sampler.epoch, 0
        delivered = self._delivered
        sampler.start = delivered * self.batch_size
        for batch in super().__iter__():
            delivered += 1
            self._delivered = delivered
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_delivered": self._delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._delivered = int(state["epoch"]), int(state["batches_delivered"])
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(self._epoch)
