"""The CPU input path: the read threads only read, and the inference thread decodes each batch
just before its model call, so that decoding never runs beside the model's OpenMP threads (a
millisecond of decoding on one of their CPUs stalls every parallel region it overlaps); a file
that does not decode is the same error row as when the read threads decode it; and the next
batch goes to the model before the rows of the one before it are written."""

import threading
import time

import pyarrow.parquet as pq
import pytest

from maskray.pipeline.segment import worker as worker_module
from maskray.pipeline.segment.plan import Shard
from maskray.pipeline.weights import Weights
from tests.test_gpu_input_path import _corpus, _jpeg_files, _png, light_weights

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Weights:
    return light_weights(tmp_path_factory.mktemp("weights"))


class _Timed:
    """Wraps the model; each call takes ``seconds`` more, and its thread and span are recorded."""

    def __init__(self, model, spans: list, seconds: float):
        self.model, self.spans, self.seconds = model, spans, seconds

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, images):
        start = time.perf_counter()
        time.sleep(self.seconds)
        result = self.model(images)
        self.spans.append(("model", threading.current_thread().name, start, time.perf_counter()))
        return result


def test_a_cpu_worker_decodes_on_its_inference_thread_between_model_calls(weights, tmp_path):
    uris = _jpeg_files(tmp_path / "in", 8)
    (tmp_path / "in" / "8.png").write_bytes(_png(8))
    uris.append(str(tmp_path / "in" / "8.png"))
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), device="cpu",
                                       options=worker_module.WorkerOptions(batch_size=2))
    spans: list = []
    worker.model = _Timed(worker.model, spans, 0.1)
    decode = worker._decode_on_host

    def timed_decode(data):
        start = time.perf_counter()
        image = decode(data)
        spans.append(("decode", threading.current_thread().name, start, time.perf_counter()))
        return image

    worker._decode_on_host = timed_decode
    try:
        assert worker.host_decoding == "inference"  # the default on a CPU
        summary = worker.process(Shard(0, 0, tuple(uris)))
    finally:
        worker.close()
    assert summary["images"] == 9 and summary["errors"] == 0
    decodes = [span for span in spans if span[0] == "decode"]
    calls = [span for span in spans if span[0] == "model"]
    assert len(decodes) == 9 and len(calls) == 5  # the PNG too: Pillow, on the same thread
    assert {thread for _, thread, _, _ in decodes} == {thread for _, thread, _, _ in calls} == {"maskray-infer_0"}
    for _, _, start, end in decodes:  # the read threads had every file long before: none decoded during a call
        assert not any(start < call_end and call_start < end for _, _, call_start, call_end in calls)


def _table(folder, name):
    return pq.read_table(next(folder.rglob(f"{name}/*.parquet"))).to_pylist()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_decoding_on_the_inference_thread_gives_the_rows_of_the_read_threads(weights, tmp_path, batch_size):
    uris = _corpus(tmp_path / "in")  # JPEGs, a PNG, EXIF rotation, cut, CMYK, HTML, a missing file
    rows = {}
    for mode in ("read", "inference"):
        worker = worker_module.ShardWorker(weights, str(tmp_path / mode), device="cpu",
                                           options=worker_module.WorkerOptions(batch_size=batch_size, host_decoding=mode))
        try:
            summary = worker.process(Shard(0, 0, tuple(uris)))
        finally:
            worker.close()
        assert summary["images"] == len(uris) and summary["errors"] == 4
        rows[mode] = (_table(tmp_path / mode, "images"), _table(tmp_path / mode, "instances"))
    if batch_size == 1:  # the same batches either way: the same rows, in the same order
        assert rows["inference"] == rows["read"]
    else:  # a file that does not decode leaves its batch one short here, not in the read threads' way
        (read_images, read_instances), (images, instances) = rows["read"], rows["inference"]
        assert sorted(images, key=str) == sorted(read_images, key=str)
        assert len(instances) == len(read_instances)
    by_uri = {row["image_uri"]: row for row in rows["inference"][0]}
    assert by_uri[uris[3]]["status"] == "error" and "truncated" in by_uri[uris[3]]["error"]
    assert (by_uri[uris[2]]["width"], by_uri[uris[2]]["height"]) == (40, 72)  # EXIF rotation applied


def test_the_next_batch_goes_to_the_model_before_the_rows_of_the_last_are_written(weights, tmp_path):
    uris = _jpeg_files(tmp_path / "in", 6)
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), device="cpu",
                                       options=worker_module.WorkerOptions(batch_size=2))
    events, submit, add_results = [], worker.submit, worker._add_results

    def recorded_submit(batch):
        events.append(("model", batch[0].uri))
        return submit(batch)

    def recorded_add_results(images, instances, batch, results):
        events.append(("rows", batch[0].uri))
        return add_results(images, instances, batch, results)

    worker.submit, worker._add_results = recorded_submit, recorded_add_results
    progress = []
    try:
        summary = worker.process(Shard(0, 0, tuple(uris)), on_progress=progress.append)
    finally:
        worker.close()
    assert summary["images"] == 6
    assert events == [("model", uris[0]), ("model", uris[2]), ("rows", uris[0]), ("model", uris[4]), ("rows", uris[2]),
                      ("rows", uris[4])]
    assert progress == [2, 4, 6]
    assert [row["image_uri"] for row in _table(tmp_path / "out", "images")] == uris  # in the shard's order
