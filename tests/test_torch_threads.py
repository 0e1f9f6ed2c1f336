"""torch's work in a worker runs on one thread of the process, the worker's inference thread:
the model is built there and called there, by the job's actor (``process``) and by the Ray Data
``Segmenter`` alike. libgomp keeps a team of OpenMP threads for each thread that ever ran a
parallel region, and more team threads than CPUs make them all sleep between regions: a model
built on one thread and called on another ran at 0.59 to 0.65 of its pace on 2 CPUs
(bench/torch_threads.py, BENCHMARKS.md)."""

import threading

import pytest

from maskray.pipeline.segment import worker as worker_module
from maskray.pipeline.segment.plan import Shard
from maskray.pipeline.segment.ray_data import Segmenter
from maskray.pipeline.train.shapes import write_shapes
from maskray.pipeline.weights import read_weights
from tests.test_user_errors import WEIGHTS


class _Recorded:
    """The model, recording the thread of each call."""

    def __init__(self, model, threads: list[str]):
        self.model, self.threads = model, threads

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, images):
        self.threads.append(threading.current_thread().name)
        return self.model(images)


@pytest.fixture
def threads(monkeypatch) -> dict[str, list[str]]:
    """The threads that built the worker's model and that called it."""
    seen = {"built": [], "called": []}
    build = worker_module.build_model

    def recorded_build(*args, **kwargs):
        seen["built"].append(threading.current_thread().name)
        return _Recorded(build(*args, **kwargs), seen["called"])

    monkeypatch.setattr(worker_module, "build_model", recorded_build)
    return seen


@pytest.fixture
def images(tmp_path) -> list[str]:
    write_shapes(str(tmp_path / "set"), count=3, seed=5)
    return [str(path) for path in sorted((tmp_path / "set" / "images").iterdir())]


def test_the_jobs_worker_builds_and_calls_its_model_on_its_inference_thread(threads, images, tmp_path):
    worker = worker_module.ShardWorker(read_weights(WEIGHTS), str(tmp_path / "out"), device="cpu",
                                       options=worker_module.WorkerOptions(batch_size=2))
    try:
        summary = worker.process(Shard(0, 0, tuple(images)))
    finally:
        worker.close()
    assert summary["images"] == 3 and summary["errors"] == 0
    assert threads["built"] == ["maskray-infer_0"]
    assert set(threads["called"]) == {"maskray-infer_0"} and len(threads["called"]) == 2


def test_the_ray_data_segmenter_calls_its_model_on_the_thread_that_built_it(threads, images):
    segmenter = Segmenter(WEIGHTS, device="cpu")
    table = segmenter({"image_uri": images})
    assert table.num_rows > 0 and table.column("error").null_count == table.num_rows
    assert threads["built"] == ["maskray-infer_0"]
    assert set(threads["called"]) == {"maskray-infer_0"} and len(threads["called"]) == 2
