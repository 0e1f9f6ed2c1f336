"""The job's output: Parquet tables ``instances`` and ``images``, one part file per shard.

The schemas are the contract users query (DESIGN.md); keep the names stable. A part file is
written whole or not at all: on a local disk it is written under a temporary name and renamed
(atomic on POSIX); on an object store an object only appears when its upload completes. A
shard counts as done when its done-marker exists, which is written after both part files, so
a shard whose writer died halfway is simply redone, and rewriting a part gives the same file.
That is also what makes retrying a failed write safe: an object store write that failed for a
reason that may pass (throttling, a 5xx, a dropped connection) is tried again (maskray.pipeline.retry),
and one that keeps failing raises StorageWriteError with the shard uncommitted.
"""

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from maskray.pipeline.retry import RetryPolicy, attempts_made, is_transient, retry_call
from maskray.pipeline.storage import StorageError, describe_storage_error, full_url, is_local, join

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
# A write or listing of object storage that fails for a reason that may pass is tried this often
# in all, waiting 0.25-0.5, 0.5-1, 1-2 s between tries (maskray.pipeline.retry), on top of the storage
# client's own retries. Local disks are not retried: their errors (a full disk) do not pass.
WRITE_ATTEMPTS = 4
WRITE_BACKOFF_SECONDS = 0.5
# Row groups of about this many rows: large enough for fast scans, small enough that a reader
# filtering on image_id or label can skip most of a big part.
ROW_GROUP_ROWS = 64 * 1024


class StorageWriteError(StorageError):
    """A write that kept failing for reasons that may pass (throttling, 5xx, dropped
    connections): nothing was committed, and a retry or a rerun writes it again."""


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


def write_bytes_atomically(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """``data`` at ``path``, never visible half-written."""
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        temporary = join(parent, f".{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name is: a crash leaves no empty part
            os.replace(temporary, path)  # atomic within a file system
            _fsync_directory(parent)  # and the rename itself survives a crash
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    else:
        # A single PUT (or a completed multipart upload): all or nothing, so a retry after a
        # failure (even one where the object did land) writes the same object again.
        policy = RetryPolicy(WRITE_ATTEMPTS, WRITE_BACKOFF_SECONDS)  # read at each call, so that tests can shorten the waits
        try:
            retry_call(lambda: fs.pipe_file(path, data), policy)
        except Exception as error:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many kinds
            if not is_transient(error):
                raise  # refused credentials, a bucket that is gone: as they are, for the caller to explain
            raise StorageWriteError(f"cannot write {describe_storage_error(full_url(fs, path), error)} "
                                    f"({attempts_made(error, policy)})") from None


def remove_interrupted_writes(fs: AbstractFileSystem, output: str) -> None:
    """Deletes the temporary files of ``write_bytes_atomically`` that writers killed between
    writing and renaming left behind (only local outputs have them). Readers never see them, but
    they are litter; the shards they belonged to are uncommitted, and redone."""
    if not is_local(fs):
        return
    for table in (INSTANCES, IMAGES, DONE):
        folder = join(output, table)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name.startswith(".") and name.endswith(".tmp"):
                try:
                    os.remove(join(folder, name))
                except FileNotFoundError:  # its writer renamed it after all
                    pass


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
    def listing() -> list[str]:
        # Object-store filesystems cache listings (s3fs does): a resumed job must see the markers of now.
        fs.invalidate_cache(join(output, DONE))
        return fs.ls(join(output, DONE), detail=False)

    try:
        names = listing() if is_local(fs) else retry_call(listing, RetryPolicy(WRITE_ATTEMPTS, WRITE_BACKOFF_SECONDS))
    except FileNotFoundError:
        return set()
    done = set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith("shard-") and base.endswith(".json"):
            done.add(int(base[len("shard-") : -len(".json")]))
    return done
