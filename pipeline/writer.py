"""The job's output: Parquet tables ``instances`` and ``images``, one part file per shard.

The schemas are the contract users query (DESIGN.md); keep the names stable. A part file is
written whole or not at all: on a local disk it is written under a temporary name and renamed
(atomic on POSIX); on an object store an object only appears when its upload completes. A
shard counts as done when its done-marker exists, which is written after both part files, so
a shard whose writer died halfway is simply redone, and rewriting a part gives the same file.
"""

import json
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.storage import is_local, join

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


def part_path(output: str, table: str, shard: int) -> str:
    return join(output, table, part_name(shard))


def write_bytes_atomically(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """``data`` at ``path``, never visible half-written."""
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        temporary = join(parent, f".{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp")
        try:
            with fs.open(temporary, "wb") as f:
                f.write(data)
            fs.mv(temporary, path)  # os.rename: atomic within a file system
        finally:
            if fs.exists(temporary):
                fs.rm(temporary)
    else:
        fs.pipe_file(path, data)  # a single PUT (or a completed multipart upload): all or nothing


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
    try:
        names = fs.ls(join(output, DONE), detail=False)
    except FileNotFoundError:
        return set()
    done = set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith("shard-") and base.endswith(".json"):
            done.add(int(base[len("shard-") : -len(".json")]))
    return done
