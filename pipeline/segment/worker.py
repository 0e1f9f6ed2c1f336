"""One shard from storage to Parquet: read, decode, batch, Mask R-CNN, rows, commit.

``ShardWorker`` is plain Python (the benchmark and tests use it without Ray); the Ray actor in
``maskray.pipeline.segment.actors`` holds one and calls ``process`` for two shards at once, so
that one shard's reads start, and its first batch is made ready, while the shard before it is
still in the model, and its commit is written while the next one is. The model itself is built
and runs on one thread of the worker's (``maskray-infer``), a shard's batches at a time, in the
order the shards came: whichever thread calls ``process`` or ``detect``, torch's work never hops
between threads (each would bring OpenMP threads of its own to the same cores, and more of them
than cores make them all sleep between parallel regions). Two stages run ahead of the model call:

- a thread pool reads the next images (``read_threads`` in flight: object stores answer in
  tens of ms), at most ``prefetch`` images ahead of the model, so memory stays bounded whatever
  the shard size; on a GPU it decodes there what the device does not (Pillow's files);
- one preparing thread gathers those into the model's batches and makes batch n+1 ready on the
  device while the model runs batch n: on a GPU its JPEGs are decoded there by nvJPEG, one call
  a batch (``maskray.pipeline.gpu_decode``; Pillow keeps the other formats, EXIF rotation and
  whatever nvJPEG refuses), and Pillow's images are copied from pinned memory on a stream of
  its own, without blocking the model's.

On a CPU the files stay bytes until their batch's model call, and the inference thread decodes
them just before it (``host_decoding``): its JPEGs with torchvision's libjpeg-turbo (Pillow's
pixels, in less time), everything else with Pillow. Decoding beside the model would take a CPU
from one of its OpenMP threads, and every parallel region it overlaps waits for that thread.
The thread that calls ``process`` hands batch n+1 to the model before it writes batch n's rows.

Every image of the shard ends up as one row of ``images``: ``ok`` with its size and instance
count, or ``error`` with what is wrong with it (gone, not an image, too large, the model
failed on it); the shard goes on either way. A failure that is not the image's own (storage
that keeps failing, a CUDA device that broke) fails the whole shard instead, uncommitted, so
that a retry or a rerun processes it: an error row is final, and must not record a passing fault.
"""

import contextlib
import heapq
import json
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from maskray.pipeline import gpu_decode
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


CPU_BATCH_SIZE = 2  # on the CPU a larger batch gains nothing: the cores are busy either way
MAX_GPU_BATCH_SIZE = 16
# GPU memory one image of the model's input size takes at inference, per input pixel, with
# the model's activations of every stage live at once (an estimate to be replaced by
# bench/gpu_check.py's measured peaks). An overestimate is cheap; an underestimate is caught
# by _detect's halving on out-of-memory.
GPU_BYTES_PER_PIXEL = 600
GPU_MEMORY_SHARE = 0.7  # of the free memory, leaving room for the allocator's fragmentation


def choose_batch_size(device: torch.device, input_pixels: int, free_bytes: int | None = None) -> int:
    """The batch size for ``device`` when the user gave none: on a GPU as many images of
    ``input_pixels`` (the model's resized input, e.g. 800 x 1333) as fit in its free memory."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    fits = int(free_bytes * GPU_MEMORY_SHARE) // (GPU_BYTES_PER_PIXEL * input_pixels)
    return max(1, min(MAX_GPU_BATCH_SIZE, fits))


@dataclass(frozen=True)
class WorkerOptions:
    batch_size: int | None = None  # None: chosen for the device (choose_batch_size)
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_threads: int = 8  # object stores answer in tens of ms: several reads in flight
    prefetch: int = 16  # images read (and on a GPU decoded) ahead of the model, at most
    # Where JPEGs are decoded (maskray.pipeline.gpu_decode; Pillow for every other file either way):
    # "device": on the model's device, a batch at a time in the preparing thread (nvJPEG on a GPU);
    # "libjpeg": torchvision's libjpeg-turbo on the host (in the thread that host_decoding names),
    # Pillow's pixels exactly at 0.6 of its time; "pillow"; None: "device" on a GPU, "libjpeg" on a CPU.
    jpeg_decoder: str | None = None
    # Which thread decodes what is decoded on the host (Pillow's files, and on a CPU the JPEGs):
    # "inference": the inference thread, each batch just before its model call, so that decoding
    # never runs beside the model's OpenMP threads and stalls them; "read": the read threads, as
    # they read; None: "inference" on a CPU, "read" on a GPU (whose model does not wait on the CPU).
    host_decoding: str | None = None
    # Niceness added to the read threads when they decode on a CPU device, so that their decoding
    # takes the cores when inference leaves them (between its parallel regions), not from its threads.
    read_niceness: int = 10

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_pixels", "read_threads", "prefetch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.jpeg_decoder not in (None, "device", "libjpeg", "pillow"):
            raise ValueError(f"jpeg_decoder must be 'device', 'libjpeg', 'pillow' or None, got {self.jpeg_decoder!r}")
        if self.host_decoding not in (None, "inference", "read"):
            raise ValueError(f"host_decoding must be 'inference', 'read' or None, got {self.host_decoding!r}")
        if not 0 <= self.read_niceness <= 19:
            raise ValueError(f"read_niceness must be in [0, 19], got {self.read_niceness}")


@dataclass
class LoadedImage:
    uri: str
    image_id: int
    image: torch.Tensor | None = None  # uint8 [3, H, W]
    error: str | None = None
    data: bytes | None = None  # the file's bytes, left for its batch's decoding (on the device, or before its model call)


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
        # One thread builds the model and runs every model call, with the torch threads its creator
        # was given: on a CPU, no other thread may run torch's parallel regions. libgomp keeps a team
        # of OpenMP threads for each thread that ever ran one, and once the process holds more of
        # them than it has CPUs, its threads sleep between regions instead of spinning, so that every
        # region waits for them to be woken: built on the actor's thread and called on this one, the
        # model ran at 0.59 to 0.65 of its pace on 2 CPUs (bench/torch_threads.py, BENCHMARKS.md).
        self._inference = ThreadPoolExecutor(1, thread_name_prefix="maskray-infer",
                                             initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        try:
            self.model = self._inference.submit(build_model, weights, overrides, str(self.device)).result()
        except BaseException:
            self._inference.shutdown(wait=False)
            raise
        self.class_names = self.model.class_names
        self.options = options
        self.batch_size = options.batch_size or choose_batch_size(self.device, _input_pixels(self.model))
        self.storage_options = dict(storage_options or {})
        self.secrets = secret_values(self.storage_options)
        self.output_fs, self.output = open_url(output, self.storage_options)
        self.metadata = dict(metadata or {})
        self.jpeg_decoder = options.jpeg_decoder or ("device" if self.device.type == "cuda" else "libjpeg")
        # Batch n+1's copies and decoding run on a stream of their own, beside batch n's model call.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.host_decoding = options.host_decoding or ("inference" if self.device.type == "cpu" else "read")
        decoding_beside_model = self.device.type == "cpu" and self.host_decoding == "read"
        niceness = options.read_niceness if decoding_beside_model else 0
        # Read threads that decode beside a CPU model do it one image at a time, the shard's earliest
        # first, however many reads are in flight: eight niced decoding threads together outweigh the
        # model's threads in the kernel's scheduler, and an OpenMP region waits for its slowest thread.
        # One keeps ahead of the model easily (a few ms an image against tens for the model).
        self._decode_turns = _InOrder() if decoding_beside_model else None
        self._readers = ThreadPoolExecutor(options.read_threads, thread_name_prefix="maskray-read",
                                           initializer=_lower_priority, initargs=(niceness,))
        self._shard_turns = _Turnstile()  # whose batches the model runs: the shards' in the order they came
        if self.device.type == "cuda":
            self._inference.submit(self._warm_up).result()  # on the thread that keeps its cuBLAS handles

    def _warm_up(self) -> None:
        """One model call on a blank image of the model's input size, so that CUDA loads its kernels
        and the libraries their handles while the actor starts, not in its first shard's first batch."""
        side = max(self.model.config.min_size)
        self.model([torch.zeros(3, side, side, dtype=torch.uint8, device=self.device)])

    # reading ---------------------------------------------------------------------------

    def _filesystem(self, uri: str):
        # Storage options are the input's; fsspec caches the filesystem instances.
        return open_object_url(uri, self.storage_options if "://" in uri and not uri.startswith("file://") else None)

    def load(self, uri: str, image_id: int, defer_jpeg: bool = False, order: tuple = (math.inf,)) -> LoadedImage:
        """Reads and decodes one image. What is wrong with the image itself (gone since the
        listing, not an image, too large) becomes its error message; a storage failure that may
        pass (throttling, a 5xx, a dropped connection) is retried (maskray.pipeline.storage) and then
        raised as ShardReadError, as is one that cannot pass but is not the image's (refused
        credentials), so that the shard is retried or rerun rather than committed with images it never read.
        With ``defer_jpeg``, a JPEG that the device decodes (maskray.pipeline.gpu_decode) is left as its
        bytes, as is every file that the inference thread decodes (``host_decoding``); ``order`` is its
        place in the queue for the read threads' decoding on a CPU (the lowest goes first)."""
        try:
            fs, path = self._filesystem(uri)
            data = read_bytes(fs, path, uri)
        except MISSING as error:  # the object is not there (any more): the image's own row
            return LoadedImage(uri, image_id, error=redact(f"cannot read: {describe_storage_error(uri, error)}", self.secrets))
        except StorageError as error:
            raise ShardReadError(redact(str(error), self.secrets)) from None
        except Exception as error:  # noqa: BLE001 - no filesystem for the URL (an unknown protocol, a package missing)
            raise ShardReadError(redact(f"cannot read {describe_storage_error(uri, error)}", self.secrets)) from None
        if (defer_jpeg and self._device_decodes(data)) or self.host_decoding == "inference":
            return LoadedImage(uri, image_id, data=data)  # decoded with its batch
        with self._decode_turns.turn(order) if self._decode_turns is not None else contextlib.nullcontext():
            image = self._decode_on_host(data)
        if isinstance(image, ImageDecodeError):
            return LoadedImage(uri, image_id, error=str(image))
        if self.device.type == "cuda":
            image = image.pin_memory()  # so that the copy to the GPU does not block
        return LoadedImage(uri, image_id, image=image)

    def _device_decodes(self, data: bytes) -> bool:
        return self.jpeg_decoder == "device" and gpu_decode.device_decodable(data, self.options.max_pixels)

    def _decode_on_host(self, data: bytes) -> torch.Tensor | ImageDecodeError:
        if self.jpeg_decoder != "pillow" and gpu_decode.device_decodable(data, self.options.max_pixels):
            return gpu_decode.decode_batch([data], "cpu", self.options.max_pixels)[0]  # libjpeg-turbo
        try:
            return decode_image(data, self.options.max_pixels)
        except ImageDecodeError as error:
            return error

    def _loaded(self, shard: Shard, ticket: int) -> Iterator[LoadedImage]:
        """The shard's images in order, read and decoded up to ``prefetch`` ahead; the CPU decodes
        an earlier shard's images (a lower ``ticket``) before a later one's."""
        pending: deque[Future] = deque()
        todo = iter(enumerate(zip(shard.uris, shard.image_ids)))
        for position, (uri, image_id) in todo:
            pending.append(self._readers.submit(self.load, uri, image_id, True, (ticket, position)))
            if len(pending) >= self.options.prefetch:
                break
        while pending:
            loaded = pending.popleft().result()
            for position, (uri, image_id) in todo:  # top the window up by one
                pending.append(self._readers.submit(self.load, uri, image_id, True, (ticket, position)))
                break
            yield loaded

    # batches -----------------------------------------------------------------------------

    def _steps(self, shard: Shard, ticket: int) -> Iterator[LoadedImage | list[LoadedImage]]:
        """The shard in order: each image that failed to load (its error row) and each batch of
        loaded images, ready on the device. Runs in the preparing thread (``_Ahead``)."""
        batch: list[LoadedImage] = []
        for loaded in self._loaded(shard, ticket):
            if loaded.error is not None:
                yield loaded
                continue
            batch.append(loaded)
            if len(batch) == self.batch_size:
                yield from self._on_device(batch)
                batch = []
        if batch:
            yield from self._on_device(batch)

    def _on_device(self, batch: list[LoadedImage]) -> Iterator[LoadedImage | list[LoadedImage]]:
        """``batch`` with the JPEGs that the device decodes decoded and every decoded image on the
        model's device; a file that no decoder takes is yielded first, as its error row. Files the
        inference thread decodes stay bytes."""
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            pending = [item for item in batch if item.data is not None and self._device_decodes(item.data)]
            for item, image in zip(pending, gpu_decode.decode_batch([item.data for item in pending], self.device,
                                                                    self.options.max_pixels)):
                item.data = None
                if isinstance(image, ImageDecodeError):
                    item.error = str(image)
                else:
                    item.image = image
            for item in batch:
                if item.image is not None:  # Pillow's, from pinned memory; a no-op for the device's own
                    item.image = item.image.to(self.device, non_blocking=True)
        if stream is not None:
            stream.synchronize()  # this thread waits for its copies; the model's stream never does
        ok = []
        for item in batch:
            if item.error is not None:
                yield item
            else:
                ok.append(item)
        if ok:
            yield ok

    # inference -------------------------------------------------------------------------

    def detect(self, batch: list[LoadedImage]) -> list[dict | str]:
        """Per image its detections, or an error message if it could not be decoded or the model
        failed on it; on the inference thread, whichever thread asks (see ``__init__``)."""
        return self.submit(batch).result()

    def submit(self, batch: list[LoadedImage]) -> Future:
        """``detect``, to be waited for: its Future."""
        return self._inference.submit(self._decode_and_detect, batch)

    def _decode_and_detect(self, batch: list[LoadedImage]) -> list[dict | str]:
        """``detect``, on the inference thread: the images still held as bytes are decoded first
        (``host_decoding``), one after the other while the model waits, rather than beside it."""
        waiting = [item for item in batch if item.data is not None]
        for item in waiting:
            image, item.data = self._decode_on_host(item.data), None
            if isinstance(image, ImageDecodeError):
                item.error = str(image)  # the same error row as when the read threads decode
            else:
                item.image = image
        decoded = [item for item in batch if item.error is None]
        found = iter(self._detect(decoded) if decoded else [])
        return [item.error if item.error is not None else next(found) for item in batch]

    def _detect(self, batch: list[LoadedImage]) -> list[dict | str]:
        """``detect``, on the inference thread: a batch that fails is split and retried."""
        try:
            return self.model([item.image.to(self.device, non_blocking=True) for item in batch])  # a no-op once prepared
        except torch.OutOfMemoryError as error:
            if len(batch) == 1:
                return [_model_failure(error)]
            # Halves, recursively: an out-of-memory batch usually fits at half the size, and the
            # next batch of the shard is tried at full size again rather than one image at a time.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            return self._detect(batch[:half]) + self._detect(batch[half:])
        except Exception as error:  # a model failure on one image is its error row
            if device_is_broken(error):
                raise  # every image after it would fail too: the actor ends itself (segment.actors) and is replaced
            if len(batch) == 1:
                return [_model_failure(error)]
        # The batch failed on something other than memory (one odd image): each image on its own, keeping the others.
        return [result for item in batch for result in self._detect([item])]

    def process(self, shard: Shard, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Runs ``shard`` and commits its part files; returns the shard's summary. Safe to call
        from two threads at once: the later shard reads ahead while the earlier is in the model."""
        ticket = self._shard_turns.draw()
        images, instances = _Rows(IMAGES_SCHEMA), _Rows(INSTANCES_SCHEMA)
        done = 0
        try:
            with contextlib.closing(_Ahead(self._steps(shard, ticket), depth=1)) as steps, \
                    self._shard_turns.turn(ticket):
                start = time.perf_counter()  # the shard's own time, from its turn at the model
                # A batch goes to the model before this thread writes the rows of the batch before
                # it, so that the model never waits for them (the rows stay in the shard's order).
                in_model: list[tuple[list[LoadedImage], Future]] = []  # at most one batch

                def write_rows() -> None:
                    nonlocal done
                    for batch, results in in_model:
                        done += self._add_results(images, instances, batch, results)
                        if on_progress:
                            on_progress(done)
                    in_model.clear()

                for step in steps:
                    if isinstance(step, LoadedImage):  # could not be read or decoded: its error row
                        write_rows()
                        images.add_error(step, step.error)
                        done += 1
                        continue
                    if self._copy_stream is not None:  # made on the copy stream, used (and freed) on the model's
                        current = torch.cuda.current_stream(self.device)
                        for item in step:
                            if item.image is not None:  # not yet decoded: the inference thread does it on the host
                                item.image.record_stream(current)
                    submitted = self.submit(step)
                    write_rows()
                    in_model.append((step, submitted))
                write_rows()
        finally:
            self._shard_turns.give_back(ticket)  # the next shard's turn, however this one ended
        summary = {
            "shard": shard.index,
            "images": images.count,
            "errors": images.errors,
            "instances": instances.count,
            "seconds": round(time.perf_counter() - start, 3),
            "precision": self.model.precision_on(self.device),  # what ran, after --precision auto was resolved
        }
        metadata = {"maskray": json.dumps({**self.metadata, "shard": shard.index}, sort_keys=True)}
        try:
            commit_shard(self.output_fs, self.output, shard.index, {INSTANCES: instances.table(), IMAGES: images.table()},
                         metadata, summary)
        except StorageError as error:  # its text quotes the storage's answer: no credential may ride along
            raise type(error)(redact(str(error), self.secrets)) from None
        return summary

    def _add_results(self, images: "_Rows", instances: "_Rows", batch: list[LoadedImage], results: Future) -> int:
        """The rows of ``batch`` from its model call's ``results``; returns how many images."""
        for item, result in zip(batch, results.result()):
            if isinstance(result, str):
                images.add_error(item, result)
            else:
                self._add_detections(images, instances, item, result)
        return len(batch)

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
        self._inference.shutdown(wait=False, cancel_futures=True)


def _lower_priority(niceness: int) -> None:
    """Lowers the calling thread's scheduling priority by ``niceness`` (Linux: niceness is per thread)."""
    if niceness > 0 and hasattr(os, "setpriority"):
        try:
            thread = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + niceness))
        except OSError:
            pass


class _InOrder:
    """A turn at a time, taken in the order of the waiters' numbers, the lowest first."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: list[float] = []
        self._busy = False

    @contextlib.contextmanager
    def turn(self, number: float) -> Iterator[None]:
        with self._changed:
            heapq.heappush(self._waiting, number)
            while self._busy or self._waiting[0] != number:
                self._changed.wait()
            heapq.heappop(self._waiting)
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()


class _Turnstile:
    """Turns served in the order the tickets were drawn. A ticket given back, whether its turn
    came or not (its holder failed before it), passes the turn on."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._drawn = 0
        self._serving = 0
        self._given_back: set[int] = set()

    def draw(self) -> int:
        with self._changed:
            self._drawn += 1
            return self._drawn - 1

    @contextlib.contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        with self._changed:
            while self._serving != ticket:
                self._changed.wait()
        yield

    def give_back(self, ticket: int) -> None:
        with self._changed:
            self._given_back.add(ticket)
            while self._serving in self._given_back:
                self._given_back.remove(self._serving)
                self._serving += 1
            self._changed.notify_all()


_DONE = object()


class _Ahead:
    """The items of ``steps``, computed in a thread of their own, which starts at once, up to
    ``depth`` ahead of the consumer; an exception of ``steps`` is raised here, in order. ``close``
    (a consumer that stops early, or never started) stops the thread."""

    def __init__(self, steps: Iterator, depth: int):
        self._steps = steps
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskray-prepare", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._steps:
                if not self._put((True, item)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put((False, error))
            return
        finally:
            if self._stop.is_set():
                self._steps.close()
        self._put((True, _DONE))

    def __iter__(self) -> Iterator:
        while True:
            ok, item = self._ready.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)  # it stops at its next item; a read in flight may take its retries' time


def _input_pixels(model) -> int:
    """Pixels of the model's largest resized input (its longest min_size by max_size)."""
    config = model.config
    return max(config.min_size) * config.max_size


def _model_failure(error: BaseException) -> str:
    return f"model failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


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

