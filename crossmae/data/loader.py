"""Pretraining data pipeline: a resumable, rank-sharded sampler whose items carry their own seed,
and a dataset wrapper that skips (and reports) unreadable files.

Every sample's crop, flip and mask are drawn from a generator seeded by (run seed, epoch, index),
so a batch is a pure function of (epoch, step): resuming mid-epoch replays nothing and skips
nothing, and 1 process with global batch B sees the same batches as N processes with B / N each.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import read_or_skip

log = logging.getLogger("crossmae")


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys: (seed, epoch) for an epoch's permutation,
    (seed, epoch, index) for one sample."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


class ResumableSampler(Sampler):
    """Shuffled per epoch from (seed, epoch), trimmed to whole global steps, sharded over ranks,
    and able to start at any sample of the epoch. Yields ``(index, sample_seed)`` pairs.

    Rank r takes positions r, r + R, r + 2R, ... of the epoch's permutation, so the global step s
    (``per_rank_step`` samples per rank) covers positions [s * R * per_rank_step, (s+1) * ...)
    whatever the number of ranks R.

    Args:
        num_samples: dataset length.
        per_rank_step: samples one rank consumes per optimizer step (micro batch x accumulation).
        num_replicas, rank: the process group.
        seed: run seed.
        shuffle: permute per epoch (else in order).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        per_rank_step: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.num_samples = num_samples
        self.per_rank_step = per_rank_step
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_samples // (per_rank_step * num_replicas)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of "
                f"{per_rank_step * num_replicas}"
            )
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch and the step within it to start from (for resume)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.per_rank_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        total = self.steps_per_epoch * self.per_rank_step * self.num_replicas
        mine = order[:total][self.rank :: self.num_replicas]
        for i in mine[self.start_step * self.per_rank_step :].tolist():
            yield i, sample_seed(self.seed, self.epoch, i)


class Indexed(Dataset):
    """A dataset of plain indices seen through ``ResumableSampler``'s ``(index, seed)`` keys: the
    seed is left out (a dataset whose randomness comes from its workers' generators)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.dataset[key[0]]


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W): uint8 pixels, or normalised floats (``normalize=True``)
    ids_shuffle: torch.Tensor | None  # (L,) mask permutation
    label: int
    skipped: list[str]  # files that failed to load on the way to this sample


class PretrainSamples(Dataset):
    """Wraps an image source (``datasets.ImageFiles`` / ``BuiltinPhotos``) with a seeded transform
    and a mask sampler. An unreadable, truncated or non-image file is skipped: the next index is
    used instead and the failure is reported with the sample.

    Args:
        source: has ``__len__``, ``load(i) -> PIL image``, ``name(i)`` and optionally ``labels``.
        transform: ``(image, generator) -> tensor``.
        mask_sampler: ``(n, device, generator) -> (n, L)`` permutations, or None.
    """

    def __init__(self, source, transform: Callable, mask_sampler: Callable | None = None):
        self.source = source
        self.transform = transform
        self.mask_sampler = mask_sampler

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = key if isinstance(key, tuple) else (key, key)
        g = torch.Generator().manual_seed(seed)
        i, img, skipped = read_or_skip(self.source.load, self.source.name, index,
                                       len(self.source), skip=True)  # fmt: skip
        image = self.transform(img, g)
        ids = self.mask_sampler(1, None, g)[0] if self.mask_sampler is not None else None
        labels = getattr(self.source, "labels", None)
        return Sample(image, ids, labels[i] if labels else -1, skipped)


def collate(samples: list[Sample]) -> dict:
    """Samples -> {"images" (N, 3, H, W), "ids_shuffle" (N, L) or None, "labels" (N,),
    "skipped" [file names], "replaced" (N,) bool: the sample is the next readable file after
    unreadable ones}."""
    ids = [s.ids_shuffle for s in samples]
    return {
        "images": torch.stack([s.image for s in samples]),
        "ids_shuffle": torch.stack(ids) if ids[0] is not None else None,
        "labels": torch.tensor([s.label for s in samples]),
        "skipped": [name for s in samples for name in s.skipped],
        "replaced": torch.tensor([bool(s.skipped) for s in samples]),
    }


# the signals that stop a run, every one whose default would end the process and that is sent
# from outside (a closed terminal or ssh connection: SIGHUP; Ctrl-\: SIGQUIT; a CPU-time limit:
# SIGXCPU; Slurm: SIGUSR1/2): the main process checkpoints and exits; data workers ignore them
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGXCPU,
                signal.SIGUSR1, signal.SIGUSR2)  # fmt: skip


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A data worker's ``worker_init_fn``: stop signals sent to the whole process group (Ctrl-C,
    ``timeout``, Slurm) are left to the main process, which ends the run cleanly; a worker
    killed by them would end it with a traceback and no checkpoint."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_held():
    """Hold stop signals while data workers start (they inherit the mask until
    ``ignore_stop_signals`` runs in them); one that arrives meanwhile reaches this process when
    the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Loader(DataLoader):
    """A ``DataLoader`` whose workers leave stop signals to this process: they start with the
    signals held (``stop_signals_held``) and ignore them (``ignore_stop_signals``), so Ctrl-C
    or a SIGTERM to the process group ends a run through its main process only.

    Workers that ignore SIGTERM cannot be ended by the one multiprocessing sends them at
    interpreter exit, so a loader's persistent workers are stopped by ``close()``: at the end of
    a training run (the engine's), and at exit for any loader still open."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("worker_init_fn", ignore_stop_signals)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        with stop_signals_held():  # workers start here (once, when persistent)
            batches = super().__iter__()
        _OPEN.add(self)
        return batches

    def close(self) -> None:
        """Stop the persistent workers now (a later iteration starts new ones); a worker still
        alive after torch's shutdown is killed."""
        _OPEN.discard(self)
        batches, self._iterator = getattr(self, "_iterator", None), None
        if batches is None or not hasattr(batches, "_shutdown_workers"):
            return
        batches._shutdown_workers()
        for worker in getattr(batches, "_workers", []):
            if worker.is_alive():  # it ignores SIGTERM: torch's terminate() did not end it
                worker.kill()
                worker.join()


_OPEN: weakref.WeakSet[Loader] = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's exit handler (torch imports it first), so
def _close_open_loaders() -> None:  # it runs before that handler joins the workers
    for loader in list(_OPEN):
        loader.close()


def make_loader(
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    collate_fn: Callable = collate,
) -> DataLoader:
    return Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=False,  # the sampler already trims to whole steps
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # worker seeds must not consume the global RNG (exact resume)
    )


class CudaPrefetcher:
    """Iterates ``batches`` one ahead, copying each batch's ``keys`` tensors (pinned host memory)
    to ``device`` on a side stream: the copy of batch i + 1 overlaps the step on batch i instead
    of waiting in the compute stream between two steps. Yields the batch dicts with those tensors
    on the device, ready for the current stream.

    Args:
        batches: an iterator of collated batches (``collate``), from a ``pin_memory`` loader.
        device: the CUDA device.
        keys: the batch entries to copy.
    """

    def __init__(
        self,
        batches: Iterator[dict],
        device: torch.device,
        keys: tuple[str, ...] = ("images", "ids_shuffle"),
    ):
        self.batches = batches
        self.device = device
        self.keys = keys
        self.stream = torch.cuda.Stream(device)
        self.ahead = self._copy_next()

    def _copy_next(self) -> dict | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(self.stream):
            return {k: v.to(self.device, non_blocking=True) if k in self.keys and v is not None
                    else v for k, v in batch.items()}  # fmt: skip

    def __iter__(self) -> CudaPrefetcher:
        return self

    def __next__(self) -> dict:
        batch = self.ahead
        if batch is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)  # this batch's copy, enqueued before the next one's
        for k in self.keys:
            if batch.get(k) is not None:
                batch[k].record_stream(current)  # made on the side stream, used on this one
        self.ahead = self._copy_next()
        return batch
