"""Data loaders: infinite, resumable, deterministic training batches and one-pass test batches.

A batch is a plain list of mapper dicts. Training randomness is fixed by ``(seed, rank, position in
this process's stream)``: the batch sampler hands each dataset index to the workers together with its
own augmentation seed, so the batches do not depend on the number of workers, and a run resumed with
``start_iter`` gets exactly the batches an uninterrupted run would have got next.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from surgdino import comm
from surgdino.data.mapper import DatasetMapper
from surgdino.data.samplers import (
    InferenceSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    _ShardedStream,
    mix_seed,
)
from surgdino.errors import ConfigError, DataError, SurgDinoError
from surgdino.log import get_logger

logger = get_logger(__name__)


class _UserError:
    """A user error raised while mapping a sample in a worker, carried to the main process as a value.

    torch re-raises worker exceptions with the worker's traceback pasted into the message; carried
    this way, the main process raises the error itself: the same one line as with 0 workers.
    """

    def __init__(self, error: SurgDinoError):
        self.error_type, self.message = type(error), str(error)

    def reraise(self) -> None:
        try:
            error = self.error_type(self.message)
        except Exception:
            error = SurgDinoError(self.message)
        raise error from None


class MappedDataset(Dataset):
    """Records mapped on access. A key is an index, or ``(index, seed)`` to fix the augmentation."""

    def __init__(self, records: Sequence[dict[str, Any]], mapper: Any):
        self.records = records
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int | None]) -> dict[str, Any] | _UserError:
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            if seed is None:
                return self.mapper(self.records[index])
            return self.mapper(self.records[index], seed=seed)
        except SurgDinoError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            return _UserError(e)


def _raise_user_errors(batches: Iterator[Any]) -> Iterator[Any]:
    for batch in batches:
        for item in batch if isinstance(batch, list) else ():
            if isinstance(item, _UserError):
                item.reraise()
        yield batch


class Loader(DataLoader):
    """A ``DataLoader`` that raises user errors of its workers (bad image, bad mask) as the one-line error."""

    def __iter__(self) -> Iterator[Any]:
        # the base iterator is made now, as DataLoader does (its workers' seed is drawn from torch's RNG here)
        return _raise_user_errors(super().__iter__())


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite batches of ``(index, augmentation seed)`` keys drawn from a training sampler.

    With ``group_ids`` (e.g. 0 = landscape, 1 = portrait) a batch only holds one group. ``start_batch``
    skips that many batches: an O(1) jump without grouping, an index-only replay with it.
    """

    def __init__(self, sampler: _ShardedStream, batch_size: int, *, seed: int, group_ids: Sequence[int] | None = None,
                 start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_ids = None if group_ids is None else list(group_ids)
        self.start_batch = int(start_batch)

    def _key(self, index: int, position: int) -> tuple[int, int]:
        return int(index), mix_seed(self.seed, self.sampler.rank, position)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batch_size
        if self.group_ids is None:
            first = self.start_batch * b
            self.sampler.set_start(first)
            batch: list[tuple[int, int]] = []
            for pos, index in enumerate(self.sampler, start=first):
                batch.append(self._key(index, pos))
                if len(batch) == b:
                    yield batch
                    batch = []
            return
        self.sampler.set_start(0)
        buckets: dict[int, list[tuple[int, int]]] = {}
        emitted = 0
        for pos, index in enumerate(self.sampler):
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append((index, pos))
            if len(bucket) == b:
                if emitted >= self.start_batch:
                    yield [self._key(i, p) for i, p in bucket]
                emitted += 1
                buckets[self.group_ids[index]] = []


def trivial_batch_collator(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batches are plain lists of per-image dicts."""
    return batch


class _WorkerInit:
    """Seeds python, numpy and torch in each worker from (seed, rank, worker id), for third-party code."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        s = mix_seed(self.seed, self.rank, worker_id, 7)
        random.seed(s)
        np.random.seed(s % (2**32))
        torch.manual_seed(s)


def build_loader_from_records(
    records: Sequence[dict[str, Any]],
    mapper: Any,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    training: bool = True,
    sampler: Sampler | None = None,
    seed: int = 0,
    aspect_ratio_grouping: bool = False,
    start_iter: int = 0,
) -> DataLoader:
    """A loader over ``records`` mapped by ``mapper``; no catalog needed.

    training=True: infinite batches from ``sampler`` (default ``TrainingSampler``), each sample's
    augmentation seeded by its stream position; ``start_iter`` = batches this process already drew.
    training=False: each record once in order (``InferenceSampler`` shard of this process).
    """
    if len(records) == 0:
        raise DataError("the dataset has no images to load (after filtering); check DATASETS.* and the json")
    dataset = MappedDataset(records, mapper)
    rank = comm.get_rank()
    common: dict[str, Any] = {"num_workers": num_workers, "collate_fn": trivial_batch_collator}
    if num_workers > 0:
        common["worker_init_fn"] = _WorkerInit(seed, rank)
    if not training:
        sampler = sampler if sampler is not None else InferenceSampler(len(records))
        return Loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **common)
    sampler = sampler if sampler is not None else TrainingSampler(len(records), seed=seed)
    if not isinstance(sampler, _ShardedStream):
        raise TypeError("training needs a TrainingSampler or RepeatFactorTrainingSampler (resumable streams)")
    group_ids = None
    if aspect_ratio_grouping:
        group_ids = [0 if int(r.get("width", 1)) >= int(r.get("height", 1)) else 1 for r in records]
    batch_sampler = TrainBatchSampler(sampler, batch_size, seed=seed, group_ids=group_ids, start_batch=start_iter)
    return Loader(dataset, batch_sampler=batch_sampler, **common)


def _shared_seed(seed: int) -> int:
    """``seed`` if >= 0, else one random seed shared by all processes (logged)."""
    if seed >= 0:
        return int(seed)
    value = comm.all_gather(int(np.random.SeedSequence().generate_state(1)[0]) % (2**31))[0]
    logger.info(f"Data seed not set (SEED < 0): using {value}")
    return value


def _records(cfg: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    from surgdino.data.catalog import DatasetCatalog, register_datasets_from_config

    register_datasets_from_config(cfg)
    records: list[dict[str, Any]] = []
    for name in names:
        records.extend(DatasetCatalog.get(name))
    return records


def filter_empty_annotations(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with at least one non-crowd annotation."""
    return [r for r in records if any(not a.get("iscrowd", 0) for a in r.get("annotations", []))]


def default_batch_size(cfg: Any) -> int:
    """Images per process per micro-step: IMS_PER_BATCH / world size / ACCUMULATION_STEPS."""
    world, accum = comm.get_world_size(), max(1, cfg.SOLVER.ACCUMULATION_STEPS)
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % (world * accum) != 0 or total < world * accum:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of the number of processes "
                          f"({world}) x SOLVER.ACCUMULATION_STEPS ({accum})")
    return total // (world * accum)


def build_train_loader(
    cfg: Any,
    dataset_names: Sequence[str] | None = None,
    *,
    batch_size_per_process: int | None = None,
    seed: int | None = None,
    start_iter: int = 0,
    mapper: Any = None,
) -> DataLoader:
    """Infinite training loader over ``dataset_names`` (default ``DATASETS.TRAIN``).

    Iterating yields lists of ``batch_size_per_process`` mapper dicts (default from
    ``default_batch_size``). ``start_iter`` = batches this process already consumed (iteration x
    ACCUMULATION_STEPS when accumulating): the loader then continues the same stream.
    """
    names = list(dataset_names if dataset_names is not None else cfg.DATASETS.TRAIN)
    if not names:
        raise ConfigError("DATASETS.TRAIN is empty; name at least one dataset, e.g. DATASETS.TRAIN \"('my_train',)\"")
    records = _records(cfg, names)
    n_all = len(records)
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        records = filter_empty_annotations(records)
        if n_all != len(records):
            logger.info(f"Removed {n_all - len(records)} of {n_all} images without instances "
                        "(DATALOADER.FILTER_EMPTY_ANNOTATIONS)")
    if not records:
        raise DataError(f"datasets {names}: no image has a (non-crowd) annotation; nothing to train on")
    batch = batch_size_per_process if batch_size_per_process is not None else default_batch_size(cfg)
    seed = _shared_seed(cfg.SEED if seed is None else seed)
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        sampler: _ShardedStream = TrainingSampler(len(records), seed=seed)
    elif name == "RepeatFactorTrainingSampler":
        sampler = RepeatFactorTrainingSampler.from_records(records, cfg.DATALOADER.REPEAT_THRESHOLD, seed=seed)
        factors = sampler._int_part + sampler._frac_part
        logger.info(f"RepeatFactorTrainingSampler: {float(factors.sum()):.0f} samples per epoch over {len(records)} "
                    f"images (threshold {cfg.DATALOADER.REPEAT_THRESHOLD}, max factor {float(factors.max()):.2f})")
    else:
        raise ConfigError(f"DATALOADER.SAMPLER_TRAIN: unknown sampler {name!r}; "
                          "use TrainingSampler or RepeatFactorTrainingSampler")
    if mapper is None:
        mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))
    if getattr(mapper, "uses_copy_paste", False) and mapper.paste_source is None:
        mapper.paste_source = records
    return build_loader_from_records(
        records, mapper, batch_size=batch, num_workers=cfg.DATALOADER.NUM_WORKERS, training=True, sampler=sampler,
        seed=seed, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, start_iter=start_iter,
    )


def build_test_loader(cfg: Any, dataset_name: str, *, mapper: Any = None, num_workers: int | None = None) -> DataLoader:
    """Each image of ``dataset_name`` once (this process's contiguous shard), batch size 1, test mapper."""
    records = _records(cfg, [dataset_name])
    if mapper is None:
        mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=False))
    workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    return build_loader_from_records(records, mapper, batch_size=1, num_workers=workers, training=False,
                                     sampler=InferenceSampler(len(records)))
