"""The shard plan: the job's sorted image list cut into shards, stored beside the output.

The plan is written once, when a job first runs, as ``OUTPUT/_plan.parquet`` (image_id,
image_uri), one Parquet row group per shard. A rerun reads it back instead of listing the
input again, so the shards, the image ids and therefore the rows are the same even if the
bucket changed in between; and the driver reads one shard's row group at a time, so its memory
does not grow with the job.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.storage import join
from pipeline.writer import write_bytes_atomically

PLAN_FILE = "_plan.parquet"
PLAN_SCHEMA = pa.schema([pa.field("image_id", pa.int64(), nullable=False), pa.field("image_uri", pa.string(), nullable=False)])


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
        self._file = pq.ParquetFile(fs.open(self.path, "rb"))
        self.num_shards = self._file.num_row_groups
        self.num_images = self._file.metadata.num_rows
        self.shard_size = self._file.metadata.row_group(0).num_rows if self.num_shards else 0

    @staticmethod
    def exists(fs: AbstractFileSystem, output: str) -> bool:
        return fs.exists(join(output, PLAN_FILE))

    @classmethod
    def create(cls, fs: AbstractFileSystem, output: str, uris: list[str], shard_size: int) -> "Plan":
        """Writes the plan of ``uris`` (already sorted) in shards of ``shard_size`` and opens it."""
        if shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {shard_size}")
        table = pa.table({"image_id": pa.array(range(len(uris)), pa.int64()), "image_uri": pa.array(uris, pa.string())}, schema=PLAN_SCHEMA)
        sink = pa.BufferOutputStream()
        # One row group per shard: shard k is row group k.
        pq.write_table(table, sink, row_group_size=shard_size, compression="zstd")
        write_bytes_atomically(fs, join(output, PLAN_FILE), sink.getvalue().to_pybytes())
        return cls(fs, output)

    def shard(self, index: int) -> Shard:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} is not in this plan of {self.num_shards} shards")
        group = self._file.read_row_group(index)
        ids = group.column("image_id")
        return Shard(index, int(ids[0].as_py()), tuple(group.column("image_uri").to_pylist()))

    def shards(self, skip: set[int] = frozenset()) -> Iterator[Shard]:
        """The shards not in ``skip``, in order, read lazily."""
        for index in range(self.num_shards):
            if index not in skip:
                yield self.shard(index)

    def close(self) -> None:
        self._file.close()
