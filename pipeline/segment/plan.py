"""The shard plan: the job's sorted image list cut into shards, stored beside the output.

The plan is written when a job first runs, as ``OUTPUT/_plan.parquet`` (image_id, image_uri),
one Parquet row group per shard. A rerun reads it back instead of planning the input again, so
the shards, the image ids and therefore the rows are the same even if the bucket changed in
between; and the driver reads one shard's row group at a time, so its memory does not grow
with the job. Those reads are retried like every other storage call (one 503 must not end a
job of days), and so is the question whether a plan exists (a 503 must not read as "no plan",
which would plan the output again). The plan is written in slices of many shards from the
listing's Arrow array, never as one table of Python objects: planning a million images costs
the driver little more than the listing itself (bench/scale.py, docs/scaling.md).

**Generations.** ``maskray segment --update`` adds the images that the input has gained since
as a new *generation* of the plan: ``OUTPUT/_plan/plan-000001.parquet``, ``plan-000002``, ...
(``_plan.parquet`` is generation 0). A generation is written once, whole (one atomic write:
the update's commit point), and never changed; its shards and image ids continue where the
generations before it end, so shard indices (and with them part files and done-markers) stay
unique and the files of older shards are never touched. ``Plan`` opens every generation (their
footers) and numbers the shards across them. Which images are new is a merge of the sorted
listing with each generation, a batch of the plan at a time (``unplanned``): Arrow's hash
look-up over one batch of the plan, never a set of every planned URL (bench/update.py).
"""

import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from maskray.pipeline.storage import (
    MISSING,
    join,
    list_files,
    location,
    path_type,
    remove_temporary_files,
    retried,
    write_bytes_atomically,
)

PLAN_FILE = "_plan.parquet"  # generation 0
GENERATIONS = "_plan"  # the folder of the later generations, written by updates
PLAN_SCHEMA = pa.schema([pa.field("image_id", pa.int64(), nullable=False), pa.field("image_uri", pa.string(), nullable=False)])
# Rows handed to the Parquet writer at a time (whole shards of them): few calls, small slices.
WRITE_SLICE_ROWS = 65536
# Rows of the plan read at a time when a listing is compared with it, in whole row groups (shards),
# and at most so many row groups: what the comparison holds of the plan, and the size of the hash
# table Arrow builds over it. Parquet's reader holds ~250 KB a row group while it reads a run of
# them (a million images in shards of 64 cost 17 MB at 64 groups a read, 4 MB at 16).
DIFF_BATCH_ROWS = 65536
DIFF_BATCH_GROUPS = 16
_GENERATION_NAME = re.compile(r"plan-(\d{6,})\.parquet")


def generation_file(number: int) -> str:
    """The file of generation ``number``, relative to the output (0 is ``_plan.parquet``)."""
    return PLAN_FILE if number == 0 else f"{GENERATIONS}/plan-{number:06d}.parquet"


@dataclass(frozen=True)
class Shard:
    """Shard ``index``: the images with ids ``first_id`` .. ``first_id + len(uris) - 1``."""

    index: int
    first_id: int
    uris: tuple[str, ...]

    @property
    def image_ids(self) -> range:
        return range(self.first_id, self.first_id + len(self.uris))


@dataclass(frozen=True)
class Generation:
    """One plan file: shards ``first_shard`` .. and image ids ``first_image_id`` .. of the plan."""

    number: int
    file: str  # relative to the output
    first_shard: int
    num_shards: int
    first_image_id: int
    num_images: int


class Plan:
    """A stored shard plan, every generation of it; ``shard(k)`` reads shard k's images from it."""

    def __init__(self, fs: AbstractFileSystem, output: str):
        self.fs, self.output = fs, output
        self.path = join(output, PLAN_FILE)
        self._metadata: list[pq.FileMetaData] = []
        self.generations: list[Generation] = []
        self._open: tuple[int, pq.ParquetFile] | None = None
        first = self._read_footer(0)
        self._open = (0, first)
        self._add(0, first.metadata)
        for number in _later_generations(fs, output):
            parquet = self._read_footer(number)
            try:
                self._add(number, parquet.metadata)
            finally:
                parquet.close()
        last = self.generations[-1]
        self.num_shards = last.first_shard + last.num_shards
        self.num_images = last.first_image_id + last.num_images
        self.shard_size = first.metadata.row_group(0).num_rows if first.metadata.num_row_groups else 0
        self._starts = [g.first_shard for g in self.generations]

    def _read_footer(self, number: int) -> pq.ParquetFile:
        path = join(self.output, generation_file(number))
        # A plan that is not Parquet is raised as pyarrow says (ArrowInvalid), not taken for a storage failure.
        return retried(lambda: _open_parquet(self.fs, path), location(self.fs, path), "read", passes=(*MISSING, pa.ArrowInvalid))

    def _add(self, number: int, metadata: pq.FileMetaData) -> None:
        first_shard = sum(g.num_shards for g in self.generations)
        first_id = sum(g.num_images for g in self.generations)
        if number and metadata.num_row_groups:
            stats = metadata.row_group(0).column(0).statistics
            if stats is not None and stats.has_min_max and stats.min != first_id:
                raise ValueError(f"{location(self.fs, join(self.output, generation_file(number)))}: its image ids start at "
                                 f"{stats.min}, where the generations before it end at {first_id}: not this plan's")
        self._metadata.append(metadata)
        self.generations.append(Generation(number, generation_file(number), first_shard, metadata.num_row_groups, first_id,
                                           metadata.num_rows))

    @staticmethod
    def exists(fs: AbstractFileSystem, output: str) -> bool:
        """Whether ``output`` has a plan; a storage failure is retried, then raised, never read as "no"."""
        return path_type(fs, join(output, PLAN_FILE)) == "file"

    @classmethod
    def create(cls, fs: AbstractFileSystem, output: str, uris: Sequence[str] | pa.Array, shard_size: int) -> "Plan":
        """Writes the plan of ``uris`` (already sorted: a list, or the listing's Arrow array) in
        shards of ``shard_size`` and opens it."""
        write_bytes_atomically(fs, join(output, PLAN_FILE), _plan_bytes(uris, shard_size, first_id=0))
        return cls(fs, output)

    def add_generation(self, uris: Sequence[str] | pa.Array, shard_size: int) -> "Plan":
        """Writes ``uris`` (sorted, none of them in the plan yet) as the plan's next generation, in
        shards of ``shard_size`` numbered on from this plan's, and returns the plan opened again
        (this one is closed). The one write is the commit point of an update: until it lands the
        plan is what it was, once it has, every later run (with ``--update`` or not) runs its shards."""
        number = self.generations[-1].number + 1
        data = _plan_bytes(uris, shard_size, first_id=self.num_images)
        write_bytes_atomically(self.fs, join(self.output, generation_file(number)), data)
        self.close()
        return Plan(self.fs, self.output)

    def unplanned(self, listing: pa.Array) -> tuple[pa.Array, int]:
        """The entries of ``listing`` (sorted and unique, as ``list_images`` gives it) that are in no
        generation of the plan, in the listing's order, and how many of its entries the plan has.

        A merge of two sorted lists a batch of the plan at a time: each batch's range (its least
        and greatest URL) is found in the listing by bisection, and the listing's entries in that
        range are looked up among the batch's (``pyarrow.compute.is_in``, a hash table over one
        batch). Memory: one batch of the plan and a byte per listed key, whatever the plan's size.
        A batch need not be sorted (only its range is used), so any plan file gives the right answer.
        """
        planned = np.zeros(len(listing), dtype=bool)
        for generation, metadata in zip(self.generations, self._metadata):
            path = join(self.output, generation.file)
            parquet = self._read_footer(generation.number)
            try:
                for groups in _batches_of_row_groups(metadata, DIFF_BATCH_ROWS, DIFF_BATCH_GROUPS):
                    def read(groups=groups, parquet=parquet) -> pa.ChunkedArray:
                        return parquet.read_row_groups(groups, columns=["image_uri"]).column(0)

                    batch = retried(read, location(self.fs, path), "read", passes=(pa.ArrowInvalid,))
                    if not len(batch):
                        continue
                    least, greatest = (s.as_py() for s in pc.min_max(batch).values())
                    start, stop = _bisect(listing, least, left=True), _bisect(listing, greatest, left=False)
                    if start < stop:
                        found = pc.is_in(listing.slice(start, stop - start), value_set=batch)
                        planned[start:stop] |= found.to_numpy(zero_copy_only=False)
                    del batch
            finally:
                parquet.close()
        present = int(planned.sum())
        if present == 0:
            return listing, 0
        return listing.filter(pa.array(~planned)), present

    def _file_of(self, generation: int) -> pq.ParquetFile:
        if self._open is None or self._open[0] != generation:
            if self._open is not None:
                self._open[1].close()
                self._open = None
            self._open = (generation, self._read_footer(generation))
        return self._open[1]

    def _locate(self, index: int) -> tuple[Generation, int]:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} is not in this plan of {self.num_shards} shards")
        generation = self.generations[bisect_right(self._starts, index) - 1]
        return generation, index - generation.first_shard

    def shard(self, index: int) -> Shard:
        generation, group = self._locate(index)
        parquet = self._file_of(generation.number)
        where = location(self.fs, join(self.output, generation.file))
        # Read by the driver while the job runs, a row group at a time: retried like any read.
        table = retried(lambda: parquet.read_row_group(group), where, "read", passes=(pa.ArrowInvalid,))
        ids = table.column("image_id")
        return Shard(index, int(ids[0].as_py()), tuple(table.column("image_uri").to_pylist()))

    def shard_length(self, index: int) -> int:
        """How many images shard ``index`` has, from the plan's footers (no data read)."""
        generation, group = self._locate(index)
        return self._metadata[generation.number].row_group(group).num_rows

    def shards(self, skip: set[int] = frozenset()) -> Iterator[Shard]:
        """The shards not in ``skip``, in order, read lazily."""
        for index in range(self.num_shards):
            if index not in skip:
                yield self.shard(index)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


def remove_interrupted_plan_writes(fs: AbstractFileSystem, output: str) -> None:
    """The temporary files that a run killed while writing a generation left in ``_plan/``."""
    remove_temporary_files(fs, join(output, GENERATIONS))


def _later_generations(fs: AbstractFileSystem, output: str) -> list[int]:
    """The numbers of the generations in ``_plan/`` (1, 2, ...: one listing, retried); a gap is a damaged plan."""
    numbers = sorted(int(m.group(1)) for p in list_files(fs, join(output, GENERATIONS))
                     if (m := _GENERATION_NAME.fullmatch(p.rstrip("/").rsplit("/", 1)[-1])))
    for expected, number in enumerate(numbers, start=1):
        if number != expected:
            raise ValueError(f"{location(fs, join(output, GENERATIONS))}: the plan is damaged: {generation_file(expected)} "
                             f"is missing, and {generation_file(number)} is there")
    return numbers


def _plan_bytes(uris: Sequence[str] | pa.Array, shard_size: int, first_id: int) -> bytes:
    """A plan file of ``uris`` in row groups (shards) of ``shard_size``, ids from ``first_id``."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    if not isinstance(uris, pa.Array):
        uris = pa.array(uris, pa.string())
    sink = pa.BufferOutputStream()
    step = max(1, WRITE_SLICE_ROWS // shard_size) * shard_size  # slices end on shard boundaries
    with pq.ParquetWriter(sink, PLAN_SCHEMA, compression="zstd") as writer:
        for start in range(0, len(uris), step):
            chunk = uris.slice(start, step).cast(pa.string())
            ids = pa.array(np.arange(first_id + start, first_id + start + len(chunk), dtype=np.int64))
            # One row group per shard: shard k of the file is row group k.
            writer.write_table(pa.Table.from_arrays([ids, chunk], schema=PLAN_SCHEMA), row_group_size=shard_size)
    return sink.getvalue().to_pybytes()


def _batches_of_row_groups(metadata: pq.FileMetaData, rows: int, groups: int) -> Iterator[list[int]]:
    """The file's row groups in runs of about ``rows`` rows and at most ``groups`` groups (whole
    groups, at least one)."""
    run, count = [], 0
    for group in range(metadata.num_row_groups):
        run.append(group)
        count += metadata.row_group(group).num_rows
        if count >= rows or len(run) >= groups:
            yield run
            run, count = [], 0
    if run:
        yield run


def _bisect(listing: pa.Array, value: str, left: bool) -> int:
    """Where ``value`` goes in the sorted ``listing``: before its equals (``left``) or after them."""
    low, high = 0, len(listing)
    while low < high:
        middle = (low + high) // 2
        entry = listing[middle].as_py()
        if entry < value or (not left and entry == value):
            low = middle + 1
        else:
            high = middle
    return low


def _open_parquet(fs: AbstractFileSystem, path: str) -> pq.ParquetFile:
    """``path`` opened as Parquet (its footer read); the file is closed again if that fails."""
    stream = fs.open(path, "rb")
    try:
        return pq.ParquetFile(stream)
    except BaseException:
        stream.close()
        raise
