"""The Ray Data source: a split's blocks read in parallel into a Ray Dataset.

Each epoch the blocks of a split (:mod:`sdofm.datasets.blocks`) come in a new order
(seeded by ``loader.seed`` and the epoch) in runs of ``loader.blocks_per_read``
consecutive blocks; a read task reads one run with a
:class:`~sdofm.datasets.blocks.BlockReader` (a chunk two neighbours share is decoded
once) and emits each block as one Ray Data block.
The frames a reader skips go to a registry actor shared by the readers of a dataset,
which keeps each frame and each lost sample once (epochs repeat them); the driver
reads it back with :meth:`SDOMLPipeline.skipped` to log and print it at the end of
a run, and :meth:`SDOMLPipeline.frame_errors` turns a bad frame that stopped a run
(``loader.on_bad_frame=raise``) into that frame's error, wherever in Ray it was raised.

The readers live in Ray's pooled worker processes: each process opens the stores
and parses their headers once and keeps them across epochs. (An ``ActorPoolStrategy``
map stage was the first design; Ray Data starts its actor pool anew for every
execution, which cost ~5 s per epoch here and would re-read hundreds of MB of
headers per epoch on the real archive.)

Normalisation statistics come from the caller (``sdofm.datasets.stats``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sdofm.config import DataConfig, LoaderConfig, TransformConfig
from sdofm.datasets.blocks import BlockReader, SkippedFrame, SkipReport, SplitPlan, plan_split
from sdofm.datasets.index import dropped_windows, load_or_build_index
from sdofm.datasets.prepared import PreparedPlan, PreparedReader, PreparedSet
from sdofm.datasets.sdoml import Archive, FrameError


@dataclass(frozen=True)
class ReadSpec:
    """What a read task needs to find (or build) its process's reader."""

    key: str  # one per dataset: names the reader in the process cache
    data: DataConfig
    transform: TransformConfig
    loader: LoaderConfig
    plan_ref: Any  # ray.ObjectRef of the SplitPlan
    stats: dict | None
    registry: str  # name of the PipelineRegistry actor


_READERS: dict[str, BlockReader] = {}


def reader_for(spec: ReadSpec) -> BlockReader | PreparedReader:
    """This process's reader for one dataset (created on first use, then reused): of the
    stores, or of prepared shards with ``data.prepared``."""
    if spec.key not in _READERS:
        import ray

        while len(_READERS) >= 4:  # old pipelines of a long-lived worker
            _READERS.pop(next(iter(_READERS)))
        plan = ray.get(spec.plan_ref)
        if spec.data.prepared:
            _READERS[spec.key] = PreparedReader(spec.data, spec.transform, spec.loader, plan)
        else:
            _READERS[spec.key] = BlockReader(
                spec.data, spec.transform, spec.loader, plan, spec.stats
            )
    return _READERS[spec.key]


def _registry_class():
    import ray

    @ray.remote(num_cpus=0)
    class PipelineRegistry:
        """Epoch bookkeeping and the skipped frames of the readers of one dataset."""

        def __init__(self, n_blocks: int, first_epoch: int = 0):
            self.seen = np.full(n_blocks, first_epoch, np.int64)
            self.skipped = SkipReport()
            self.fatal: SkippedFrame | None = None
            self.pinned: int | None = None

        def next_epoch(self, block: int) -> int:
            self.seen[block] += 1
            return int(self.seen[block] - 1)

        def set_epoch(self, epoch: int) -> None:
            """The next pass is ``epoch``, whatever was read before (a train worker sets it
            from its checkpoint: a killed attempt's read tasks may still be counting)."""
            self.seen[:] = epoch
            self.pinned = epoch

        def completed(self) -> int:
            return int(self.seen.min()) if len(self.seen) else 0

        def pass_epoch(self) -> tuple[int, bool]:
            """The epoch of the pass that starts now, and whether it was set (then every
            block of the pass is read with it)."""
            if self.pinned is not None:
                return self.pinned, True
            return self.completed(), False

        def record(self, items: list[SkippedFrame]) -> None:
            self.skipped.add(items)

        def stop(self, frame: SkippedFrame) -> None:
            self.fatal = self.fatal or frame

        def report(self) -> tuple[SkipReport, SkippedFrame | None]:
            return self.skipped, self.fatal

    return PipelineRegistry


def _read_blocks(spec: ReadSpec, blocks: np.ndarray, epoch: int | None):
    """A read task: read ``blocks`` and yield one Ray Data block each."""
    import ray
    from ray.data.block import BlockAccessor

    reader = reader_for(spec)
    handle = ray.get_actor(spec.registry)
    short = []
    for b in blocks:
        e = epoch if epoch is not None else ray.get(handle.next_epoch.remote(int(b)))
        try:
            batch, skipped = reader.read_block(int(b), e)
        except FrameError as err:  # on_bad_frame=raise: name the frame to the driver first
            frame = SkippedFrame(err.store, err.year, err.channel, err.index, err.reason)
            ray.get(handle.stop.remote(frame))
            raise
        if skipped:  # waited for: recorded before the block can be consumed
            ray.get(handle.record.remote(skipped))
        # The reader writes the next block into the same image buffer. A whole block
        # leaves the read's output buffer as it is yielded and is stored (copied into the
        # object store) before the reader resumes. A shorter one (samples lost to a bad
        # frame) would wait there for the next block, and the two be joined and re-cut
        # into views of the reader's buffer: it is copied and yielded after the task's
        # whole blocks.
        if len(batch["image"]) < spec.loader.block_size:
            short.append({**batch, "image": batch["image"].copy()})
        else:
            yield BlockAccessor.batch_to_block(batch)
    for batch in short:
        yield BlockAccessor.batch_to_block(batch)


def read_tasks(n_blocks: int, blocks_per_read: int) -> int:
    """Read tasks of a dataset of ``n_blocks``: one per run of ``blocks_per_read``
    consecutive blocks, at most 4096."""
    return min(4096, -(-n_blocks // blocks_per_read))


def read_whole_blocks(source, loader: LoaderConfig, n_blocks: int, sample_bytes: int):
    """The Ray Dataset of ``source``, a datasource whose read tasks yield blocks of
    ``loader.block_size`` samples of ``sample_bytes`` (``n_blocks`` in all, in runs of
    ``loader.blocks_per_read``), read by ``loader.readers`` tasks at a time, each
    yielded block one Ray block, in the order planned."""
    import ray

    # Left alone, Ray Data splits each read task's output to reach its default ~200
    # blocks, and the read's output buffer joins yielded blocks up to 128 MiB or re-cuts
    # larger ones (views a consumer then concatenates into fresh memory), so batches span
    # blocks and are assembled anew. As many blocks as read tasks turns the split off; a
    # size limit just under one whole block's bytes makes the buffer pass every whole
    # block on as it is yielded (a shorter one waits for the next of its task).
    ds = ray.data.read_datasource(
        source,
        num_cpus=loader.cpus_per_reader,
        concurrency=loader.readers,
        override_num_blocks=read_tasks(n_blocks, loader.blocks_per_read),
    )
    ds.context.target_max_block_size = int(0.9 * loader.block_size * sample_bytes)
    # Blocks leave in the order planned, whichever reader finishes first: the same seed
    # and epoch give the same sample order.
    ds.context.execution_options.preserve_order = True
    return ds


def _block_source(spec: ReadSpec, plan: SplitPlan | PreparedPlan, shuffle: bool, epoch: int | None):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    n_blocks = len(plan.blocks)
    sizes = np.array([len(b) for b in plan.blocks])
    d, seed, per_read = spec.data, spec.loader.seed, spec.loader.blocks_per_read
    row_bytes = 4 * len(d.channels) * d.num_frames * (spec.transform.size or 512) ** 2

    class BlockSource(Datasource):
        """The split's blocks, read in a new seeded order each epoch."""

        def estimate_inmemory_data_size(self) -> int:
            return int(sizes.sum() * row_bytes)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            import ray

            e, fixed = (
                (epoch, True)
                if epoch is not None
                else ray.get(ray.get_actor(spec.registry).pass_epoch.remote())
            )
            # Runs of consecutive blocks (a chunk shared by two is decoded once), in a
            # new order each epoch; one run per read task (at most 4096 tasks).
            runs = [np.arange(i, min(i + per_read, n_blocks)) for i in range(0, n_blocks, per_read)]
            order = (
                np.random.default_rng([seed, e]).permutation(len(runs))
                if shuffle
                else np.arange(len(runs))
            )
            # The run with the split's last block, the one shorter block, goes last: before
            # it, batches of a size that divides the block size are slices of one block.
            if len(runs):
                order = np.concatenate([order[order != len(runs) - 1], [len(runs) - 1]])
            parts = [
                np.concatenate([runs[i] for i in g])
                for g in np.array_split(order, read_tasks(n_blocks, per_read))
                if len(g)
            ]
            return [
                ReadTask(
                    (lambda p=p: _read_blocks(spec, p, e if fixed else None)),
                    BlockMetadata(
                        num_rows=int(sizes[p].sum()),
                        size_bytes=int(sizes[p].sum() * row_bytes),
                        input_files=None,
                        exec_stats=None,
                    ),
                )
                for p in parts
            ]

    return BlockSource()


class SDOMLPipeline:
    """Ray Datasets of train / val / test built from the alignment index.

    ``table``: the alignment index (None: built or loaded from ``data``).
    ``stats``: the normalisation statistics, from
    ``sdofm.datasets.stats.load_or_compute_stats``; required when ``transform.zscore``.

    With ``data.prepared`` the datasets read prepared shards (:mod:`sdofm.datasets.prepared`)
    instead of the stores: the same batches, already transformed (whatever
    ``transform.on`` says), in ``transform.dtype``; a shard folder prepared with other
    data or transform settings is an error naming them.
    """

    def __init__(
        self,
        data: DataConfig,
        transform: TransformConfig,
        loader: LoaderConfig,
        table: pd.DataFrame | None = None,
        stats: dict | None = None,
    ):
        if transform.zscore and stats is None and not data.prepared:
            raise ValueError(
                "transform.zscore needs normalisation statistics: compute them with "
                "sdofm.datasets.stats.load_or_compute_stats and pass them as stats "
                "(or set transform.zscore=false)"
            )
        self.data, self.transform, self.loader = data, transform, loader
        self.prepared = None
        if data.prepared:
            self.prepared = PreparedSet(data.prepared, data.storage_options)
            self.prepared.check(data, transform)
            self.table = table
        else:
            self.table = table if table is not None else load_or_build_index(data)[0]
        self.stats = stats
        self._subsets: list[tuple[str, np.ndarray | None]] = []  # (split, subset) of each dataset
        self._registries: list[object] = []  # one registry actor per dataset made
        self._latest: dict[str, object] = {}  # split -> the registry of its newest dataset
        self._shape: tuple[int, int, int, int] | None = None

    def plan(self, split: str, subset: np.ndarray | None = None) -> SplitPlan | PreparedPlan:
        if self.prepared is not None:
            return self.prepared.plan(split, self.loader.block_size, subset)
        return plan_split(self.data, self.loader, self.table, split, subset)

    def num_samples(self, split: str) -> int:
        return self.plan(split).num_samples

    def dropped_windows(self, split: str) -> int:
        """Index steps of ``split`` that end no complete window of ``data.num_frames``
        frames ``data.frame_step`` apart (a gap, the split's start); 0 for one frame."""
        if self.prepared is not None or self.data.num_frames == 1:
            return 0
        return dropped_windows(self.table, self.num_samples(split), split)

    def sample_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the ``image`` of one sample (the stores are opened once)."""
        if self.prepared is not None:
            return self.prepared.shape
        if self._shape is None:
            self._shape = self._stored_sample_shape()
        return self._shape

    def _stored_sample_shape(self) -> tuple[int, int, int, int]:
        d = self.data
        first = d.channels[0]
        archive = Archive.open(d)
        store = archive.aia if first in d.aia_channels else archive.hmi
        years = self.table[f"{first}_year"]
        if not len(years):
            raise ValueError(f"the alignment index of {d.root} has no steps")
        stored = store.array(str(years.iloc[0]), first).shape[-1]
        size = self.transform.size or stored
        return len(d.channels), d.num_frames, size, size

    def sample_bytes(self) -> int:
        """Bytes of one sample's ``image`` as the readers hand it over."""
        return int(np.prod(self.sample_shape())) * np.dtype(self.transform.dtype).itemsize

    def dataset(
        self,
        split: str,
        epoch: int | None = None,
        subset: np.ndarray | None = None,
        first_epoch: int = 0,
    ):
        """A Ray Dataset of ``split`` (optionally only its sample ids ``subset``).

        ``epoch=None``: every pass over the dataset is the next epoch, counting from
        ``first_epoch`` (the form to hand to ``TorchTrainer(datasets=...)``; a resumed
        run starts at its checkpoint's epoch); an int fixes the order of that epoch.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        plan = self.plan(split, subset)
        if plan.num_samples == 0:
            raise ValueError(
                f"split {split!r} has no samples (index {len(self.table)} rows, "
                f"num_frames {self.data.num_frames})"
            )
        key = uuid.uuid4().hex[:12]
        name = f"sdofm-pipeline-{split}-{key}"
        # The handle keeps the registry alive as long as this pipeline object. It lives on
        # this process's node: a worker node lost mid-run must not take the epoch
        # bookkeeping and the skip counts with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        registry = (
            _registry_class()
            .options(name=name, scheduling_strategy=here)
            .remote(len(plan.blocks), first_epoch)
        )
        self._registries.append(registry)
        self._latest[split] = registry
        self._subsets.append((split, subset))
        lc = self.loader
        spec = ReadSpec(
            key, self.data, self.transform, lc, ray.put(plan), self.stats, registry=name
        )
        source = _block_source(spec, plan, lc.shuffle and split == "train", epoch)
        return read_whole_blocks(source, lc, len(plan.blocks), self.sample_bytes())

    def registry(self, split: str):
        """The epoch bookkeeping actor of ``split``'s newest dataset (it has ``set_epoch``)."""
        return self._latest[split]

    def _reports(self) -> list[tuple[SkipReport, SkippedFrame | None]]:
        import ray

        return ray.get([r.report.remote() for r in self._registries])

    def skipped(self, split: str | None = None) -> SkipReport:
        """The distinct frames skipped so far by this pipeline's datasets (of ``split``, or
        all), each once, with the distinct samples they cost per split."""
        out = SkipReport()
        if self.prepared is not None:  # skipped when the shards were written
            return out.add(self._prepared_skips(split))
        for report, _ in self._reports():
            if split is None or split in report.samples:
                out.merge(report)
        return out

    def _prepared_skips(self, split: str | None) -> list[SkippedFrame]:
        """The frames skipped when the shards were written that cost samples of the datasets
        made from them (of ``split``, or all)."""
        out = []
        for s in self.prepared.manifest.get("skipped", []):
            for sp, subset in self._subsets:
                lost = s["samples"].get(sp, [])
                if subset is not None:
                    lost = sorted(set(lost) & {int(i) for i in subset})
                if lost and (split is None or sp == split):
                    frame = (s["store"], s["year"], s["channel"], s["frame"], s["reason"])
                    out.append(SkippedFrame(*frame, sp, tuple(lost)))
        return out

    @contextmanager
    def frame_errors(self) -> Iterator[None]:
        """Re-raise a failure that a bad frame caused in a reader (``on_bad_frame=raise``;
        Ray wraps it in its own errors, in a Train worker or a Data task) as that frame's
        :class:`FrameError`, naming store, year, channel and frame."""
        try:
            yield
        except FrameError:
            raise
        except Exception as e:
            fatal = next((f for _, f in self._reports() if f is not None), None)
            if fatal is None:
                raise
            raise fatal.error() from e
