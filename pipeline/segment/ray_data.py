"""maskray's model as a stage of your own Ray Data pipeline (the batch-inference pattern: a
callable class that loads the model once per actor and maps batches):

    import ray
    from maskray.pipeline.segment.ray_data import Segmenter

    rows = (ray.data.read_binary_files("s3://photos/2026/", include_paths=True)
            .map_batches(Segmenter, fn_constructor_kwargs={"weights": "model.pt"}, concurrency=2, batch_size=8))
    rows.write_parquet("s3://results/rows")

A batch holds images as bytes (column ``bytes``, with ``path`` as ``read_binary_files(...,
include_paths=True)`` gives it) or as URIs (column ``image_uri``, read through the job's storage
layer with ``storage_options``). The rows returned are those of the job's ``instances`` table
(``maskray.pipeline.segment.output.INSTANCES_SCHEMA``, the same values ``maskray segment``
writes for the same image and weights), plus a column ``error``, null on instance rows:

- an image with no instances gives no row;
- an image that cannot be read, decoded or segmented gives one row with its ``image_uri``,
  ``image_id`` and ``error`` (the job's error text), every instance column null; keep
  ``error IS NULL`` for the instances.

``image_uri`` is the URI (``path`` given a protocol: ``path_protocol``, ``file`` by default,
``s3`` for ``read_binary_files("s3://...")``); ``image_id`` is the batch's own ``image_id`` column
where it has one, else a stable id of the URI (the first 63 bits of its SHA-256): Ray Data has no
global order in which to number the images as the job does.

It runs the worker's own code (``maskray.pipeline.segment.worker``: reading, decoding, the model
call with its per-image fallback, the rows), so the rows cannot drift from the job's. Unlike the
job, it has no exactly-once commit, resume, or manifest: those are the pipeline's business.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from maskray.pipeline.limits import DEFAULT_MAX_PIXELS
from maskray.pipeline.options import check_precision
from maskray.pipeline.segment.output import INSTANCES_SCHEMA

ERROR = "error"
SCHEMA = pa.schema([pa.field(f.name, f.type) for f in INSTANCES_SCHEMA] + [pa.field(ERROR, pa.string())])


def stable_image_id(uri: str) -> int:
    """A stable int64 id of ``uri``: the first 63 bits of its SHA-256."""
    return int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big") >> 1


class Segmenter:
    """``__init__`` loads the model once (``weights``: what ``--weights`` takes, a name such as
    ``coco-v2``, a path or URL of a maskray checkpoint or a torchvision state dict, or
    ``maskray.pipeline.weights.Weights``; ``precision`` as ``--precision``); ``__call__(batch)``
    returns the batch's instance rows as a ``pyarrow.Table`` of ``SCHEMA``."""

    def __init__(self, weights, score_threshold: float | None = None, device: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, model_batch_size: int = 2,
                 max_pixels: int = DEFAULT_MAX_PIXELS, path_protocol: str = "file", precision: str = "auto"):
        from maskray.pipeline.segment.worker import ShardWorker, WorkerOptions
        from maskray.pipeline.weights import Weights, read_weights

        if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not isinstance(weights, Weights):
            weights = read_weights(str(weights), storage_options)
        overrides = {"precision": check_precision(precision)}  # as the job's --precision
        if score_threshold is not None:
            overrides["box_score_thresh"] = float(score_threshold)
        # The job's worker, for its reading, decoding, model call and rows; it never commits here,
        # so its output is a place that is never written.
        self._worker = ShardWorker(weights, "memory://maskray-ray-data-never-written", storage_options, overrides,
                                   options=WorkerOptions(batch_size=model_batch_size, max_pixels=max_pixels),
                                   device=device)
        self.path_protocol = path_protocol

    def _uri(self, path: str) -> str:
        return path if "://" in path else f"{self.path_protocol}://{path}"

    def _loaded(self, batch: Mapping[str, Any]) -> list:
        from maskray.pipeline.segment.worker import LoadedImage

        if "image_uri" in batch:
            uris = [str(u) for u in batch["image_uri"]]
        elif "path" in batch:
            uris = [self._uri(str(p)) for p in batch["path"]]
        else:
            raise ValueError(f"a batch needs a column image_uri, or bytes and path; it has {sorted(batch)}")
        ids = [int(i) for i in batch["image_id"]] if "image_id" in batch else [stable_image_id(u) for u in uris]
        if "bytes" not in batch:
            return [self._worker.load(uri, image_id) for uri, image_id in zip(uris, ids)]
        # Decoded by the worker's model call, as the job's are on a CPU (ShardWorker.detect).
        return [LoadedImage(uri, image_id, data=bytes(data)) for uri, image_id, data in zip(uris, ids, batch["bytes"])]

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        from maskray.pipeline.segment.output import IMAGES_SCHEMA
        from maskray.pipeline.segment.worker import _Rows

        instances, images = _Rows(INSTANCES_SCHEMA), _Rows(IMAGES_SCHEMA)
        errors: list[tuple[str, int, str]] = []
        loaded = self._loaded(batch)
        good = [item for item in loaded if item.error is None]
        errors += [(item.uri, item.image_id, item.error) for item in loaded if item.error is not None]
        size = self._worker.options.batch_size
        for start in range(0, len(good), size):
            chunk = good[start:start + size]
            for item, result in zip(chunk, self._worker.detect(chunk)):
                if isinstance(result, str):
                    errors.append((item.uri, item.image_id, result))
                else:
                    self._worker._add_detections(images, instances, item, result)
        table = instances.table()
        columns = {name: table.column(name).combine_chunks().cast(SCHEMA.field(name).type) for name in INSTANCES_SCHEMA.names}
        found = pa.table({**columns, ERROR: pa.nulls(table.num_rows, pa.string())}, schema=SCHEMA)
        if not errors:
            return found
        failed = {name: pa.nulls(len(errors), SCHEMA.field(name).type) for name in SCHEMA.names}
        failed.update(image_uri=pa.array([e[0] for e in errors], pa.string()),
                      image_id=pa.array(np.array([e[1] for e in errors], np.int64)),
                      error=pa.array([e[2] for e in errors], pa.string()))
        return pa.concat_tables([found, pa.table(failed, schema=SCHEMA)])
