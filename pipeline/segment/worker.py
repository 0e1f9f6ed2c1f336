"""One shard from storage to Parquet: read, decode, batch, Mask R-CNN, rows, commit.

``ShardWorker`` is plain Python (the benchmark and tests use it without Ray); the Ray actor in
``maskray.pipeline.segment.actors`` holds one. Reading and decoding overlap with inference: a thread pool
fetches and decodes the next images (Pillow and fsspec release the GIL) while the model runs
on the current batch, and at most ``prefetch`` decoded images wait ahead of the model, so
memory stays bounded whatever the shard size. On a GPU the decoded images are pinned and
copied without blocking.

Every image of the shard ends up as one row of ``images``: ``ok`` with its size and instance
count, or ``error`` with what is wrong with it (gone, not an image, too large, the model
failed on it); the shard goes on either way. A failure that is not the image's own (storage
that keeps failing, a CUDA device that broke) fails the whole shard instead, uncommitted, so
that a retry or a rerun processes it: an error row is final, and must not record a passing fault.
"""

import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from maskray.pipeline.decode import ImageDecodeError, decode_image
from maskray.pipeline.errors import StorageError
from maskray.pipeline.limits import DEFAULT_MAX_PIXELS
from maskray.pipeline.segment.output import IMAGES, IMAGES_SCHEMA, INSTANCES, INSTANCES_SCHEMA, commit_shard
from maskray.pipeline.segment.plan import Shard
from maskray.pipeline.storage import (
    MISSING,
    describe_storage_error,
    open_object_url,
    open_url,
    read_bytes,
    redact,
    secret_values,
)
from maskray.pipeline.weights import Weights, build_model


class ShardReadError(RuntimeError):
    """Storage kept failing for an image of the shard: the shard is not committed and is retried."""


@dataclass(frozen=True)
class WorkerOptions:
    batch_size: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_threads: int = 8  # object stores answer in tens of ms: several reads in flight
    prefetch: int = 16  # decoded images held ahead of the model, at most

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_pixels", "read_threads", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class LoadedImage:
    uri: str
    image_id: int
    image: torch.Tensor | None = None  # uint8 [3, H, W]
    error: str | None = None


class ShardWorker:
    """Holds one model and turns shards into committed part files."""

    def __init__(
        self,
        weights: Weights,
        output: str,
        storage_options: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        options: WorkerOptions = WorkerOptions(),
        device: str | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model(weights, overrides, str(self.device))
        self.class_names = self.model.class_names
        self.options = options
        self.storage_options = dict(storage_options or {})
        self.secrets = secret_values(self.storage_options)
        self.output_fs, self.output = open_url(output, self.storage_options)
        self.metadata = dict(metadata or {})
        self._readers = ThreadPoolExecutor(options.read_threads, thread_name_prefix="maskray-read")

    # reading ---------------------------------------------------------------------------

    def _filesystem(self, uri: str):
        # Storage options are the input's; fsspec caches the filesystem instances.
        return open_object_url(uri, self.storage_options if "://" in uri and not uri.startswith("file://") else None)

    def load(self, uri: str, image_id: int) -> LoadedImage:
        """Reads and decodes one image. What is wrong with the image itself (gone since the
        listing, not an image, too large) becomes its error message; a storage failure that may
        pass (throttling, a 5xx, a dropped connection) is retried (maskray.pipeline.storage) and then
        raised as ShardReadError, as is one that cannot pass but is not the image's (refused
        credentials), so that the shard is retried or rerun rather than committed with images it never read."""
        try:
            fs, path = self._filesystem(uri)
            data = read_bytes(fs, path, uri)
        except MISSING as error:  # the object is not there (any more): the image's own row
            return LoadedImage(uri, image_id, error=redact(f"cannot read: {describe_storage_error(uri, error)}", self.secrets))
        except StorageError as error:
            raise ShardReadError(redact(str(error), self.secrets)) from None
        except Exception as error:  # noqa: BLE001 - no filesystem for the URL (an unknown protocol, a package missing)
            raise ShardReadError(redact(f"cannot read {describe_storage_error(uri, error)}", self.secrets)) from None
        try:
            image = decode_image(data, self.options.max_pixels)
        except ImageDecodeError as error:
            return LoadedImage(uri, image_id, error=str(error))
        if self.device.type == "cuda":
            image = image.pin_memory()  # so that the copy to the GPU does not block
        return LoadedImage(uri, image_id, image=image)

    def _loaded(self, shard: Shard) -> Iterator[LoadedImage]:
        """The shard's images in order, read and decoded up to ``prefetch`` ahead."""
        pending: deque[Future] = deque()
        todo = iter(zip(shard.uris, shard.image_ids))
        for uri, image_id in todo:
            pending.append(self._readers.submit(self.load, uri, image_id))
            if len(pending) >= self.options.prefetch:
                break
        while pending:
            loaded = pending.popleft().result()
            for uri, image_id in todo:  # top the window up by one
                pending.append(self._readers.submit(self.load, uri, image_id))
                break
            yield loaded

    # inference -------------------------------------------------------------------------

    def _detect(self, batch: list[LoadedImage]) -> list[dict | str]:
        """Per image its detections, or an error message if the model failed on it."""
        try:
            return self.model([item.image.to(self.device, non_blocking=True) for item in batch])
        except Exception as error:  # noqa: BLE001 - a model failure on one image is its error row
            if device_is_broken(error):
                raise  # every image after it would fail too: the actor ends itself (segment.actors) and is replaced
            if len(batch) == 1:
                return [f"model failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"]
        # The batch failed (out of memory, one odd image): each image on its own, keeping the others.
        return [result for item in batch for result in self._detect([item])]

    def process(self, shard: Shard, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Runs ``shard`` and commits its part files; returns the shard's summary."""
        start = time.perf_counter()
        images, instances = _Rows(IMAGES_SCHEMA), _Rows(INSTANCES_SCHEMA)
        batch: list[LoadedImage] = []
        done = 0

        def flush() -> None:
            nonlocal done
            for item, result in zip(batch, self._detect(batch)):
                if isinstance(result, str):
                    images.add_error(item, result)
                else:
                    self._add_detections(images, instances, item, result)
            done += len(batch)
            batch.clear()
            if on_progress:
                on_progress(done)

        for loaded in self._loaded(shard):
            if loaded.error is not None:
                images.add_error(loaded, loaded.error)
                done += 1
                continue
            batch.append(loaded)
            if len(batch) == self.options.batch_size:
                flush()
        if batch:
            flush()
        summary = {
            "shard": shard.index,
            "images": images.count,
            "errors": images.errors,
            "instances": instances.count,
            "seconds": round(time.perf_counter() - start, 3),
        }
        metadata = {"maskray": json.dumps({**self.metadata, "shard": shard.index}, sort_keys=True)}
        try:
            commit_shard(self.output_fs, self.output, shard.index, {INSTANCES: instances.table(), IMAGES: images.table()},
                         metadata, summary)
        except StorageError as error:  # its text quotes the storage's answer: no credential may ride along
            raise type(error)(redact(str(error), self.secrets)) from None
        return summary

    def _add_detections(self, images: "_Rows", instances: "_Rows", item: LoadedImage, result: dict) -> None:
        height, width = item.image.shape[-2:]
        boxes = result["boxes"].float().cpu().numpy()
        labels = result["labels"].cpu().numpy()
        scores = result["scores"].float().cpu().numpy()
        areas = result["areas"].cpu().numpy()
        masks = result.get("masks")
        for i in range(len(labels)):
            if masks is not None:
                mask_height, mask_width = masks[i]["size"]
                counts = masks[i]["counts"]
            else:  # a Faster R-CNN: boxes only
                mask_height, mask_width, counts = height, width, ""
            instances.append(
                image_uri=item.uri, image_id=item.image_id, instance=i, label=int(labels[i]),
                label_name=self.class_names[int(labels[i])], score=float(scores[i]),
                box_x1=float(boxes[i, 0]), box_y1=float(boxes[i, 1]), box_x2=float(boxes[i, 2]), box_y2=float(boxes[i, 3]),
                area=int(areas[i]), mask_height=int(mask_height), mask_width=int(mask_width), mask_counts=counts,
            )
        images.append(image_uri=item.uri, image_id=item.image_id, width=int(width), height=int(height),
                      instances=len(labels), status="ok", error=None)

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)


def device_is_broken(error: BaseException) -> bool:
    """A CUDA error other than running out of memory leaves the device unusable for the process."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("CUDA error" in text or "CUBLAS_STATUS" in text or "cuDNN error" in text) \
        and not isinstance(error, torch.cuda.OutOfMemoryError)


class _Rows:
    """Rows of one table, collected column by column."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self.columns: dict[str, list] = {name: [] for name in schema.names}
        self.errors = 0

    @property
    def count(self) -> int:
        return len(self.columns[self.schema.names[0]])

    def append(self, **row: Any) -> None:
        for name, column in self.columns.items():
            column.append(row[name])

    def add_error(self, item: LoadedImage, message: str) -> None:
        self.errors += 1
        self.append(image_uri=item.uri, image_id=item.image_id, width=None, height=None, instances=0, status="error", error=message)

    def table(self) -> pa.Table:
        return pa.table({name: pa.array(values, self.schema.field(name).type) for name, values in self.columns.items()}, schema=self.schema)

