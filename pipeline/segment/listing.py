"""Which images a job covers: a prefix, a glob, or a file listing them, in a fixed order.

``list_images`` turns the job's INPUT into full image URLs (with their protocol, as the
output stores them), sorted, so that two listings of the same bucket give the same order and
so the same shards. The forms of INPUT:

- a prefix or directory (``s3://bucket/photos``, ``/data/photos``): every file below it whose
  name ends in an image extension (case-insensitive); other files are counted and skipped;
- a glob (``s3://bucket/photos/**/*.jpg``): every file it matches, whatever its extension;
- a listing file: ``.txt`` / ``.lst`` (one URL or path per line, ``#`` comments and blank
  lines skipped) or ``.parquet`` (a string column ``image_uri``, ``uri`` or ``path``). A path
  that is not a URL is relative to the listing file's directory.
- a single image file.
"""

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from maskray.pipeline.decode import EXTENSIONS
from maskray.pipeline.storage import full_url, glob_files, is_glob, join, list_files, open_url, path_type, public_url

LIST_FILE_EXTENSIONS = (".txt", ".lst")
PARQUET_COLUMNS = ("image_uri", "uri", "path")
# URLs are gathered in Python lists of this many, each then packed into an Arrow array: a
# Python str costs ~50 bytes of header on top of its characters, an Arrow string 8 (its offset).
CHUNK_URIS = 65536


@dataclass
class Listing:
    """The sorted, unique image URLs of an input, and how many files were passed over.

    The URLs are one Arrow array (large_string: no 2 GiB limit on the characters of all of
    them), so that a listing of millions of keys costs little more than their characters.
    """

    array: pa.Array
    skipped: int = 0  # files under a prefix without an image extension

    def __len__(self) -> int:
        return len(self.array)

    @property
    def uris(self) -> list[str]:
        """The URLs as a Python list: for small listings (tests, a glob); the job uses ``array``."""
        return self.array.to_pylist()


def is_image_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def list_images(url: str, storage_options: Mapping[str, Any] | None = None) -> Listing:
    """The images of the job input ``url`` (see the module's docstring), sorted and unique."""
    fs, path = open_url(url, storage_options)
    if is_glob(path):
        return Listing(sorted_unique(full_url(fs, p) for p in glob_files(fs, path)))
    kind = path_type(fs, path)
    if kind == "file":
        lowered = path.lower()
        if lowered.endswith(LIST_FILE_EXTENSIONS):
            return Listing(sorted_unique(_read_text_listing(fs, path)))
        if lowered.endswith(".parquet"):
            return Listing(sorted_unique(_read_parquet_listing(fs, path)))
        return Listing(sorted_unique([full_url(fs, path)]))
    if kind != "directory":
        raise FileNotFoundError(f"{public_url(url)}: no such file, directory or prefix")
    skipped = 0

    def images() -> Iterator[str]:
        nonlocal skipped
        for p in list_files(fs, path, recursive=True):
            if is_image_name(p):
                yield full_url(fs, p)
            else:
                skipped += 1

    return Listing(sorted_unique(images()), skipped)


def sorted_unique(uris: Iterable[str | pa.Array]) -> pa.Array:
    """``uris`` (strings, or Arrow arrays of them) as one sorted Arrow array without repeats.

    The order is Python's ``sorted`` (by code point): Arrow sorts strings by their UTF-8 bytes,
    which is the same order. Repeats are dropped after the sort, by comparing neighbours, rather
    than with a hash set that would cost more than the strings themselves.
    """
    # The C library's allocator, not Arrow's default (mimalloc), which keeps the pages of freed
    # arrays for a while: the chunks, freed once sorted, would go on counting in the driver's memory.
    pool = pa.system_memory_pool()
    chunks, pending = [], []
    for uri in uris:
        if isinstance(uri, pa.Array):
            chunks.append(uri.cast(pa.large_string(), memory_pool=pool))
            continue
        pending.append(uri)
        if len(pending) == CHUNK_URIS:
            chunks.append(pa.array(pending, pa.large_string(), memory_pool=pool))
            pending = []
    if pending:
        chunks.append(pa.array(pending, pa.large_string(), memory_pool=pool))
    listed = pa.chunked_array(chunks, pa.large_string())
    del chunks
    # Sorted straight from the chunks: no combined copy of them first.
    ordered = pc.take(listed, pc.sort_indices(listed, memory_pool=pool), memory_pool=pool).combine_chunks(memory_pool=pool)
    del listed
    if len(ordered) < 2:
        return ordered
    differs = pc.not_equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1), memory_pool=pool)
    if pc.all(differs).as_py():
        return ordered
    return pc.filter(ordered, pa.concat_arrays([pa.array([True]), differs]), memory_pool=pool)


def _resolve(fs: AbstractFileSystem, listing_path: str, entry: str) -> str:
    """An entry of a listing file as a full URL: a URL as it is, a path relative to the listing."""
    if "://" in entry:
        return entry
    if entry.startswith("/"):
        return full_url(fs, entry)
    base = listing_path.rsplit("/", 1)[0] if "/" in listing_path else ""
    return full_url(fs, join(base, entry) if base else entry)


def _read_text_listing(fs: AbstractFileSystem, path: str) -> Iterator[str]:
    with fs.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield _resolve(fs, path, entry)


def _read_parquet_listing(fs: AbstractFileSystem, path: str) -> Iterator[str | pa.Array]:
    """The entries of a Parquet listing: a batch of full URLs as it is (no Python string per
    entry), a batch with relative paths entry by entry."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        column = next((c for c in PARQUET_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(f"{full_url(fs, path)}: a Parquet listing needs a column named one of {PARQUET_COLUMNS}, has {names}")
        for batch in parquet.iter_batches(columns=[column], batch_size=CHUNK_URIS):
            entries = batch.column(0)
            if pa.types.is_dictionary(entries.type):  # a categorical column (pandas writes them)
                entries = entries.dictionary_decode()
            if not any(test(entries.type) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)):
                raise ValueError(f"{full_url(fs, path)}: column {column!r} must hold strings, holds {entries.type}")
            entries = entries.cast(pa.large_string())  # the listing's type; the characters are not copied
            present = pc.greater(pc.utf8_length(entries), 0)
            if entries.null_count or not pc.all(present).as_py():  # nulls and empty strings are not entries
                entries = entries.filter(present)
            if pc.all(pc.match_substring(entries, "://")).as_py() is not False:
                yield entries
            else:
                for entry in entries.to_pylist():
                    yield _resolve(fs, path, entry)
