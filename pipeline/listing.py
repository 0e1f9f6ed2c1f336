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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.decode import EXTENSIONS
from pipeline.storage import full_url, join, open_url, public_url

LIST_FILE_EXTENSIONS = (".txt", ".lst")
PARQUET_COLUMNS = ("image_uri", "uri", "path")
_GLOB_CHARS = ("*", "?", "[")


@dataclass
class Listing:
    """The sorted image URLs of an input, and how many files were passed over."""

    uris: list[str]
    skipped: int = 0  # files under a prefix without an image extension


def is_image_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def list_images(url: str, storage_options: Mapping[str, Any] | None = None) -> Listing:
    """The images of the job input ``url`` (see the module's docstring), sorted and unique."""
    fs, path = open_url(url, storage_options)
    if any(c in path for c in _GLOB_CHARS):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
        return Listing(_sorted_unique(full_url(fs, p) for p in files))
    if fs.isfile(path):
        lowered = path.lower()
        if lowered.endswith(LIST_FILE_EXTENSIONS):
            return Listing(_sorted_unique(_read_text_listing(fs, path)))
        if lowered.endswith(".parquet"):
            return Listing(_sorted_unique(_read_parquet_listing(fs, path)))
        return Listing([full_url(fs, path)])
    if not fs.isdir(path):
        raise FileNotFoundError(f"{public_url(url)}: no such file, directory or prefix")
    images, skipped = [], 0
    # find() lists recursively in pages (a million keys are a thousand list calls on S3).
    for p in fs.find(path):
        if is_image_name(p):
            images.append(full_url(fs, p))
        else:
            skipped += 1
    return Listing(_sorted_unique(images), skipped)


def _sorted_unique(uris: Iterator[str] | list[str]) -> list[str]:
    return sorted(set(uris))


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


def _read_parquet_listing(fs: AbstractFileSystem, path: str) -> Iterator[str]:
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        column = next((c for c in PARQUET_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(f"{full_url(fs, path)}: a Parquet listing needs a column named one of {PARQUET_COLUMNS}, has {names}")
        for batch in parquet.iter_batches(columns=[column], batch_size=65536):
            for entry in batch.column(0).to_pylist():
                if entry:
                    yield _resolve(fs, path, entry)
