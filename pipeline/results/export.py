"""A segmentation output as COCO JSON: an instances file, or a results list.

``export_output(OUTPUT, DEST, "coco")`` writes a COCO instances file (``images``,
``annotations``, ``categories``) that ``pycocotools.coco.COCO`` loads and that CVAT and FiftyOne
import; ``"coco-results"`` writes the list of detections that ``COCO.loadRes`` takes (image_id,
category_id, segmentation, bbox, score).

The ids, stable for a given output (the same output exports to the same file):

- ``image_id`` is the Parquet ``image_id``: the image's position in the job's plan (its sorted
  image list, ``_plan.parquet``, then each generation ``--update`` added, in order), so an
  annotation joins back to its rows with ``WHERE image_id = ...``.
- ``category_id`` is the model's label index, the Parquet ``label``; the categories are the
  model's class names (``_manifest.json``'s configuration), background (index 0) left out, as are
  torchvision's ``N/A`` placeholders unless an instance carries one. A torchvision COCO model's
  labels are COCO's own category ids.
- an annotation's ``id`` (instances file only) counts from 1 in the order of (image_id, instance).
- ``file_name`` is the image's path below the job's INPUT folder or prefix (the folder a glob
  starts from, the folder of a single image or a listing file), as CVAT and FiftyOne want it
  (``data_path`` = that folder); an image elsewhere gets its full location (a local path, or its
  URL). ``coco_url`` is always the ``image_uri``.

Each annotation has the mask as COCO compressed RLE (``{"size": [h, w], "counts": str}``, the
Parquet string as it is), the box in xywh pixels (``box_x1, box_y1, box_x2 - box_x1, box_y2 - box_y1``,
exact from the float32 columns), ``area`` (mask pixels), ``score`` and ``iscrowd`` 0. An output of
a box-only model (empty ``mask_counts``, or a mask size of 0) exports without ``segmentation``:
the box only, its area that of the box. Images that could not be segmented (``status = 'error'``)
have no size and are left out of ``images``.

Only a finished output exports (every planned shard committed): a COCO file of part of a job
would be taken for the whole. ``min_score`` and ``where`` (a DuckDB SQL condition over the
``instances`` columns, e.g. ``label_name = 'disc' AND area > 100``) choose the instances; every
image stays in ``images``.

It streams: the part files are read a row group at a time (pyarrow), each batch filtered
(DuckDB runs ``where`` over the batch) and written out as JSON at once, so memory stays that of a
row group whatever the size of the output (``bench/export.py``). The JSON goes to a temporary file
(beside DEST on a local disk, in the system's temporary folder for a bucket) that becomes DEST
whole: renamed over it, or uploaded in one go, where an object appears only once complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from maskray.pipeline.errors import OutputError, QueryError
from maskray.pipeline.results.query import open_table, output_progress
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.output import IMAGES, INSTANCES, INSTANCES_SCHEMA
from maskray.pipeline.storage import (
    check_reachable,
    full_url,
    glob_base,
    is_glob,
    is_local,
    location,
    open_url,
    path_type,
    public_url,
    retried,
)

FORMATS = ("coco", "coco-results")
# Rows handed from a row group to the JSON writer at a time: bounds the Python objects alive at once.
BATCH_ROWS = 4096
# Class names that hold a place in a model's label indices without being a class (torchvision's COCO list).
PLACEHOLDER_NAMES = {"N/A", "__background__"}
_IMAGE_COLUMNS = ["image_uri", "image_id", "width", "height", "status"]
_INSTANCE_COLUMNS = ["image_id", "instance", "label", "label_name", "score", "box_x1", "box_y1", "box_x2", "box_y2",
                     "area", "mask_height", "mask_width", "mask_counts"]


@dataclass(frozen=True)
class ExportSummary:
    dest: str  # without credentials
    format: str
    images: int  # in the file's ``images`` (coco), or with at least one annotation (coco-results)
    annotations: int
    categories: int
    left_out: int  # images with status 'error', which have no size

    def describe(self) -> str:
        what = "a COCO instances file" if self.format == "coco" else "COCO results"
        of = f"{self.images} images, " if self.format == "coco" else f"on {self.images} images, "
        text = f"{self.dest}: {what}: {self.annotations} annotations, {of}{self.categories} categories"
        if self.left_out:
            text += f"; {self.left_out} images that could not be segmented left out"
        return text


def export_output(output_url: str, dest_url: str, format: str = "coco",
                  storage_options: Mapping[str, Any] | None = None, *, min_score: float | None = None,
                  where: str | None = None) -> ExportSummary:
    """Writes the finished segmentation output ``output_url`` to ``dest_url`` (a new file, any
    fsspec URL) as ``format`` (``coco`` or ``coco-results``). Before anything is written:
    OutputError for no segmentation output, an unfinished one, a DEST that exists or lies
    inside the output; QueryError for a ``where`` that DuckDB cannot run; ValueError for a bad
    format or score."""
    if format not in FORMATS:
        raise ValueError(f"no export format {format!r}; there are {', '.join(FORMATS)}")
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {min_score}")
    progress = output_progress(output_url, storage_options)  # not an output: one line naming it
    if not progress.finished:
        raise OutputError(f"cannot export {progress.describe()}; export it once it is finished")
    fs, output = open_url(output_url, storage_options)
    dest_fs, dest = open_url(dest_url, storage_options)
    _check_dest(dest_url, dest_fs, dest, full_url(fs, output))
    selection = _Selection(min_score, where)
    manifest = Manifest.read(fs, output)

    def write(out: IO[str]) -> ExportSummary:
        writer = _JsonWriter(out)
        counts = {"images": 0, "left_out": 0}
        seen: dict[int, str] = {}
        if format == "coco":
            writer.raw('{"info": ')
            writer.raw(json.dumps(_info(manifest)))
            writer.raw(', "licenses": [], "images": [')
            names = _FileNames(manifest.input)
            for batch in _batches(output_url, IMAGES, _IMAGE_COLUMNS, storage_options):
                rows = batch.to_pydict()
                for uri, image_id, width, height, status in zip(*(rows[c] for c in _IMAGE_COLUMNS)):
                    if status != "ok":
                        counts["left_out"] += 1
                        continue
                    writer.item({"id": image_id, "file_name": names.of(uri), "width": width, "height": height,
                                 "coco_url": uri})
                    counts["images"] += 1
            writer.raw('], "annotations": [')
        else:
            writer.raw("[")
        annotated, last_image = 0, None  # the rows come by image_id: a new id is a new image
        annotations = 0
        for batch in _batches(output_url, INSTANCES, selection.columns, storage_options):
            batch = selection.apply(batch)
            for annotation in _annotations(batch, with_ids=format == "coco", first_id=annotations + 1):
                writer.item(annotation)
                annotations += 1
                if annotation["image_id"] != last_image:
                    annotated, last_image = annotated + 1, annotation["image_id"]
            seen.update(zip(batch.column("label").to_pylist(), batch.column("label_name").to_pylist()))
        categories = _categories(manifest, seen)
        if format == "coco":
            writer.raw('], "categories": [')
            for category in categories:
                writer.item(category)
            writer.raw("]}\n")
        else:
            writer.raw("]\n")
            counts["images"] = annotated
        return ExportSummary(public_url(dest_url), format, counts["images"], annotations, len(categories),
                             counts["left_out"])

    return _write_streamed(dest_url, dest_fs, dest, write)


def _check_dest(dest_url: str, fs, dest: str, output_full: str) -> None:
    """DEST must be new, and outside the output (an output is maskray's alone: a file of ours
    in it would make its next rerun refuse it)."""
    check_reachable(dest_url, fs, dest, must_exist=False)  # the bucket is there and answers
    kind = path_type(fs, dest)
    if kind is not None:
        what = "a file" if kind == "file" else "a folder"
        raise OutputError(f"{public_url(dest_url)}: already exists ({what}); give a new file name")
    dest_full = full_url(fs, dest)
    if dest_full == output_full or dest_full.startswith(output_full.rstrip("/") + "/"):
        raise OutputError(f"{public_url(dest_url)}: inside the segmentation output, which holds maskray's files "
                          "only; write the export beside it")


class _Selection:
    """The instances chosen by ``min_score`` and the SQL condition ``where``, batch by batch."""

    def __init__(self, min_score: float | None, where: str | None):
        self.min_score = min_score
        self.where = where.strip() if where and where.strip() else None
        self._con = None
        # What is read of each row: every column when a condition may name any of them.
        self.columns = INSTANCES_SCHEMA.names if self.where is not None else _INSTANCE_COLUMNS
        if self.where is not None:
            import duckdb

            self._con = duckdb.connect()
            self._query = f"SELECT * FROM {INSTANCES} WHERE ({self.where})"
            try:
                statements = len(self._con.extract_statements(self._query))
            except duckdb.Error as error:
                raise self._error(error) from None
            if statements != 1:  # "1=1); DROP ...": a condition, nothing more
                raise QueryError(f"--where {self.where!r} is more than a condition over the instances columns")
            # Tried on no rows first: a mistake in the SQL is said before any file is written.
            self._run(INSTANCES_SCHEMA.empty_table())

    def apply(self, batch: pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        if self.min_score is not None:
            batch = batch.filter(pc.greater_equal(batch.column("score"), pa.scalar(self.min_score, pa.float32())))
        if self.where is not None and batch.num_rows:
            batch = self._run(batch)
        return batch

    def _run(self, rows: pa.Table | pa.RecordBatch) -> pa.Table:
        import duckdb

        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        try:
            self._con.register(INSTANCES, rows)
            result = self._con.sql(self._query)
            # DuckDB 2 renamed fetch_arrow_table (and deprecated the old name); 1.x has only that one.
            return result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.fetch_arrow_table()
        except duckdb.Error as error:
            raise self._error(error) from None
        finally:
            self._con.unregister(INSTANCES)

    def _error(self, error: BaseException) -> QueryError:
        # DuckDB's words, without its quote of the SQL ("LINE 1: ..." and a caret under it).
        said = [line.strip() for line in str(error).splitlines()
                if line.strip() and not line.startswith("LINE ") and set(line.strip()) != {"^"}]
        return QueryError(f"--where {self.where!r} cannot run: {' '.join(said) or type(error).__name__}")


def _batches(output_url: str, table: str, columns: list[str],
             storage_options: Mapping[str, Any] | None) -> Iterator[pa.RecordBatch]:
    """The rows of ``table``'s committed parts in order (shard by shard: by image_id, then
    instance), a row group at a time, in batches of at most BATCH_ROWS rows; nothing read ahead.

    Memory stays flat over any number of parts only so: without ``cache_metadata=False`` the
    scanner keeps every part's footer (statistics of mask_counts included), and Arrow's default
    allocator (mimalloc) keeps what it once held; the system allocator gives it back."""
    dataset = open_table(output_url, table, storage_options)
    yield from dataset.to_batches(columns=columns, batch_size=BATCH_ROWS, batch_readahead=1, fragment_readahead=1,
                                  use_threads=False, cache_metadata=False, memory_pool=pa.system_memory_pool())


def _annotations(batch: pa.Table | pa.RecordBatch, with_ids: bool, first_id: int) -> Iterator[dict]:
    rows = {name: batch.column(name).to_pylist() for name in _INSTANCE_COLUMNS}
    for k in range(batch.num_rows):
        x1, y1, x2, y2 = (rows[c][k] for c in ("box_x1", "box_y1", "box_x2", "box_y2"))
        counts, height, width = rows["mask_counts"][k], rows["mask_height"][k], rows["mask_width"][k]
        annotation: dict[str, Any] = {"id": first_id + k} if with_ids else {}
        annotation.update(image_id=rows["image_id"][k], category_id=rows["label"][k])
        if counts and height and width:
            annotation["segmentation"] = {"size": [height, width], "counts": counts}
            area = rows["area"][k]
        else:  # a box-only model: no mask to give
            area = (x2 - x1) * (y2 - y1)
        annotation.update(bbox=[x1, y1, x2 - x1, y2 - y1], area=area, score=rows["score"][k])
        if with_ids:
            annotation["iscrowd"] = 0
        yield annotation


def _categories(manifest: Manifest, seen: Mapping[int, str]) -> list[dict]:
    """The model's classes (background and placeholders out, unless an instance has one),
    and any label an instance has beyond them, by label index."""
    names = dict(enumerate(manifest.config.get("class_names") or ()))
    kept = {i: n for i, n in names.items() if i > 0 and n not in PLACEHOLDER_NAMES}
    kept.update({label: names.get(label, name) for label, name in seen.items()})
    return [{"id": label, "name": kept[label], "supercategory": ""} for label in sorted(kept)]


def _info(manifest: Manifest) -> dict:
    return {"description": f"maskray segmentation of {manifest.input}", "version": "1",
            "date_created": manifest.created, "maskray": {"job_id": manifest.job_id, "output": manifest.output,
                                                          "weights": manifest.weights}}


class _FileNames:
    """``file_name`` of an image: its path below the job's input folder, else its location."""

    def __init__(self, input_url: str):
        base = _strip_protocol(input_url)
        base = glob_base(base) if is_glob(base) else base
        self.bases = [b.rstrip("/") + "/" for b in (base, base.rsplit("/", 1)[0]) if b.strip("/")]

    def of(self, uri: str) -> str:
        path = _strip_protocol(uri)
        for base in self.bases:
            if path.startswith(base):
                return path[len(base):]
        return path if uri.startswith("file://") else uri


def _strip_protocol(url: str) -> str:
    return url.split("://", 1)[1] if url.startswith("file://") else url.split("://", 1)[-1] if "://" in url else url


class _JsonWriter:
    """Items of a JSON array, written one by one with the commas between them."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.first = True

    def raw(self, text: str) -> None:
        self.out.write(text)
        self.first = text.endswith("[")  # a new array begins: its first item has no comma

    def item(self, value: Any) -> None:
        self.out.write(("" if self.first else ", ") + json.dumps(value, separators=(",", ":")))
        self.first = False


def _write_streamed(dest_url: str, fs, dest: str, write) -> ExportSummary:
    """``write(text_file)`` into a temporary file that then becomes ``dest`` whole: on a local
    disk a hidden file beside it, fsynced and renamed over it; elsewhere a local temporary file
    uploaded in one go (an object appears only once its upload completes)."""
    local = is_local(fs)
    folder = os.path.dirname(dest) if local else None
    if local:
        os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", buffering=1024 * 1024) as out:
            summary = write(out)
            out.flush()
            os.fsync(out.fileno())
        if local:
            os.replace(temporary, dest)
            directory = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        else:
            retried(lambda: fs.put_file(temporary, dest), location(fs, dest), "write", passes=())
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return summary
