"""The job's output: Parquet tables ``instances`` and ``images``, one part file per shard.

The schemas are the contract users query (DESIGN.md); keep the names stable. A part file is
written whole or not at all (``maskray.pipeline.storage.write_bytes_atomically``: renamed into
place on a local disk; on an object store an object only appears when its upload completes). A
shard counts as done when its done-marker exists, which is written after both part files, so
a shard whose writer died halfway is simply redone, and rewriting a part gives the same file.
That is also what makes retrying a failed write safe: a write that failed for a reason that may
pass (throttling, a 5xx, a dropped connection) is tried again (``maskray.pipeline.retry.STORAGE_RETRY``),
and one that keeps failing raises StorageWriteError with the shard uncommitted.
"""

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from maskray.pipeline.storage import join, list_files, remove_temporary_files, write_bytes_atomically

INSTANCES = "instances"
IMAGES = "images"
DONE = "_done"

INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("instance", pa.int32(), nullable=False),  # 0.. within the image, best score first
        pa.field("label", pa.int32(), nullable=False),
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("box_x1", pa.float32(), nullable=False),  # pixels of the original image, xyxy
        pa.field("box_y1", pa.float32(), nullable=False),
        pa.field("box_x2", pa.float32(), nullable=False),
        pa.field("box_y2", pa.float32(), nullable=False),
        pa.field("area", pa.int64(), nullable=False),  # mask pixels
        pa.field("mask_height", pa.int32(), nullable=False),
        pa.field("mask_width", pa.int32(), nullable=False),
        pa.field("mask_counts", pa.string(), nullable=False),  # COCO compressed RLE, as pycocotools writes it
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("width", pa.int32()),  # null when the image could not be decoded
        pa.field("height", pa.int32()),
        pa.field("instances", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field("error", pa.string()),  # what went wrong, null when ok
    ]
)

SCHEMAS = {INSTANCES: INSTANCES_SCHEMA, IMAGES: IMAGES_SCHEMA}
# Row groups of about this many rows: large enough for fast scans, small enough that a reader
# filtering on image_id or label can skip most of a big part.
ROW_GROUP_ROWS = 64 * 1024


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def done_name(shard: int) -> str:
    return f"shard-{shard:06d}.json"


def shard_of_part(path: str) -> int | None:
    """The shard whose part file ``path`` is (``.../part-000012.parquet`` → 12), or None."""
    name = path.rsplit("/", 1)[-1]
    digits = name[len("part-") : -len(".parquet")]
    return int(digits) if name.startswith("part-") and name.endswith(".parquet") and digits.isdigit() else None


def part_path(output: str, table: str, shard: int) -> str:
    return join(output, table, part_name(shard))


def remove_interrupted_writes(fs: AbstractFileSystem, output: str) -> None:
    """Deletes the temporary files that writers killed between writing and renaming left in the
    output's folders (only local outputs have them): of part files and done-markers, whose
    shards are uncommitted and redone, and in the output itself of the manifest and the plan,
    which the driver writes the same way."""
    remove_temporary_files(fs, output)
    for table in (INSTANCES, IMAGES, DONE):
        remove_temporary_files(fs, join(output, table))


def table_to_parquet_bytes(table: pa.Table, metadata: Mapping[str, str]) -> bytes:
    """A Parquet file of ``table`` (zstd, row groups of ROW_GROUP_ROWS) with key-value metadata."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_statistics=True)
    return sink.getvalue().to_pybytes()


def commit_shard(
    fs: AbstractFileSystem,
    output: str,
    shard: int,
    tables: Mapping[str, pa.Table],
    metadata: Mapping[str, str],
    summary: Mapping[str, Any],
) -> None:
    """Writes the shard's part files, then its done-marker (the shard's commit point)."""
    for name, table in tables.items():
        write_bytes_atomically(fs, part_path(output, name, shard), table_to_parquet_bytes(table, metadata))
    write_bytes_atomically(fs, join(output, DONE, done_name(shard)), json.dumps(dict(summary), sort_keys=True).encode())


def finished_shards(fs: AbstractFileSystem, output: str) -> set[int]:
    """The shards of ``output`` that have a done-marker (from the names alone: one listing)."""
    done = set()
    for name in list_files(fs, join(output, DONE)):
        base = name.rsplit("/", 1)[-1]
        if base.startswith("shard-") and base.endswith(".json"):
            done.add(int(base[len("shard-") : -len(".json")]))
    return done
