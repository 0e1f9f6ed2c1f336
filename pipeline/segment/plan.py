"""The shard plan: the job's sorted image list cut into shards, stored beside the output.

The plan is written once, when a job first runs, as ``OUTPUT/_plan.parquet`` (image_id,
image_uri), one Parquet row group per shard. A rerun reads it back instead of listing the
input again, so the shards, the image ids and therefore the rows are the same even if the
bucket changed in between; and the driver reads one shard's row group at a time, so its memory
does not grow with the job. Those reads are retried like every other storage call (one 503
must not end a job of days), and so is the question whether a plan exists (a 503 must not
read as "no plan", which would plan the output again). The plan is written in slices of many
shards from the listing's Arrow array, never as one table of Python objects: planning a million
images costs the driver little more than the listing itself (bench/scale.py, docs/scaling.md).
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from maskray.pipeline.storage import MISSING, join, location, path_type, retried, write_bytes_atomically

PLAN_FILE = "_plan.parquet"
PLAN_SCHEMA = pa.schema([pa.field("image_id", pa.int64(), nullable=False), pa.field("image_uri", pa.string(), nullable=False)])
# Rows handed to the Parquet writer at a time (whole shards of them): few calls, small slices.
WRITE_SLICE_ROWS = 65536


@dataclass(frozen=True)
class Shard:
    """Shard ``index``: the images with ids ``first_id`` .. ``first_id + len(uris) - 1``."""

    index: int
    first_id: int
    uris: tuple[str, ...]

    @property
    def image_ids(self) -> range:
        return range(self.first_id, self.first_id + len(self.uris))


class Plan:
    """A stored shard plan; ``shard(k)`` reads shard k's images from it."""

    def __init__(self, fs: AbstractFileSystem, output: str):
        self.path = join(output, PLAN_FILE)
        self._where = location(fs, self.path)
        # A plan that is not Parquet is raised as pyarrow says (ArrowInvalid), not taken for a storage failure.
        self._file = retried(lambda: _open_parquet(fs, self.path), self._where, "read",
                             passes=(*MISSING, pa.ArrowInvalid))
        self.num_shards = self._file.num_row_groups
        self.num_images = self._file.metadata.num_rows
        self.shard_size = self._file.metadata.row_group(0).num_rows if self.num_shards else 0

    @staticmethod
    def exists(fs: AbstractFileSystem, output: str) -> bool:
        """Whether ``output`` has a plan; a storage failure is retried, then raised, never read as "no"."""
        return path_type(fs, join(output, PLAN_FILE)) == "file"

    @classmethod
    def create(cls, fs: AbstractFileSystem, output: str, uris: Sequence[str] | pa.Array, shard_size: int) -> "Plan":
        """Writes the plan of ``uris`` (already sorted: a list, or the listing's Arrow array) in
        shards of ``shard_size`` and opens it."""
        if shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {shard_size}")
        if not isinstance(uris, pa.Array):
            uris = pa.array(uris, pa.string())
        sink = pa.BufferOutputStream()
        step = max(1, WRITE_SLICE_ROWS // shard_size) * shard_size  # slices end on shard boundaries
        with pq.ParquetWriter(sink, PLAN_SCHEMA, compression="zstd") as writer:
            for start in range(0, len(uris), step):
                chunk = uris.slice(start, step).cast(pa.string())
                ids = pa.array(np.arange(start, start + len(chunk), dtype=np.int64))
                # One row group per shard: shard k is row group k.
                writer.write_table(pa.Table.from_arrays([ids, chunk], schema=PLAN_SCHEMA), row_group_size=shard_size)
        write_bytes_atomically(fs, join(output, PLAN_FILE), sink.getvalue().to_pybytes())
        return cls(fs, output)

    def shard(self, index: int) -> Shard:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} is not in this plan of {self.num_shards} shards")
        # Read by the driver while the job runs, a row group at a time: retried like any read.
        group = retried(lambda: self._file.read_row_group(index), self._where, "read", passes=(pa.ArrowInvalid,))
        ids = group.column("image_id")
        return Shard(index, int(ids[0].as_py()), tuple(group.column("image_uri").to_pylist()))

    def shard_length(self, index: int) -> int:
        """How many images shard ``index`` has, from the plan's footer (no data read)."""
        return self._file.metadata.row_group(index).num_rows

    def shards(self, skip: set[int] = frozenset()) -> Iterator[Shard]:
        """The shards not in ``skip``, in order, read lazily."""
        for index in range(self.num_shards):
            if index not in skip:
                yield self.shard(index)

    def close(self) -> None:
        self._file.close()


def _open_parquet(fs: AbstractFileSystem, path: str) -> pq.ParquetFile:
    """``path`` opened as Parquet (its footer read); the file is closed again if that fails."""
    stream = fs.open(path, "rb")
    try:
        return pq.ParquetFile(stream)
    except BaseException:
        stream.close()
        raise
