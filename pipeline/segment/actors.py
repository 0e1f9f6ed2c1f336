"""The Ray actors of a segmentation job: one model per GPU (or per few CPUs), and the progress board."""

import logging
import os
import time

from maskray.pipeline.errors import JobError
from maskray.pipeline.segment.plan import Shard
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.segment.worker import device_is_broken

log = logging.getLogger("maskray.segment")


def actor_layout(job: SegmentJob) -> tuple[int, dict[str, float]]:
    """(number of actors, resources of each): one GPU each where the cluster has GPUs,
    else ``cpus_per_actor`` CPUs each, as many as fit on the alive nodes."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    if gpus >= 1:
        return job.num_actors or int(gpus), {"num_gpus": 1, "num_cpus": 1}
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes]
    largest = max(node_cpus, default=0)
    if largest < 1:
        raise JobError("the Ray cluster has no CPUs and no GPUs to run actors on")
    per_actor = max(1, min(job.cpus_per_actor or 2, largest))
    fitting = sum(c // per_actor for c in node_cpus)
    return job.num_actors or max(1, fitting), {"num_cpus": per_actor}


def make_actor_class():
    import ray

    @ray.remote
    class SegmentActor:
        """One model on one GPU (or a few CPUs), turning shards into part files."""

        def __init__(self, weights, output, storage_options, overrides, metadata, options, threads, board):
            import torch

            from maskray.pipeline.segment.worker import ShardWorker

            if threads:
                torch.set_num_threads(threads)
            self.board = board
            self.worker = ShardWorker(weights, output, storage_options, overrides, metadata, options)

        def ready(self) -> str:
            return f"{self.worker.device} on {ray.util.get_node_ip_address()} (pid {os.getpid()})"

        def pid(self) -> int:
            return os.getpid()

        def process(self, shard: Shard) -> dict:
            last = [0.0]

            def report(images: int) -> None:
                # At most twice a second: each report is a remote call, and the driver polls that often.
                if time.monotonic() - last[0] >= 0.5:
                    last[0] = time.monotonic()
                    self.board.report.remote(shard.index, images)

            try:
                summary = self.worker.process(shard, on_progress=report)
            except Exception as error:
                if device_is_broken(error):
                    # The CUDA context is unusable for the rest of this process: end it, so that the
                    # driver retries the shard on a fresh actor instead of here, three times in vain.
                    log.error("the GPU failed (%s); this actor exits to be replaced", first_line(error))
                    os._exit(1)
                raise
            summary["node"] = ray.get_runtime_context().get_node_id()
            return summary

    return SegmentActor


def make_board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Images done per shard in progress, reported by the actors after each batch; a
        retried shard starts again from zero, so nothing is counted twice."""

        def __init__(self):
            self.in_progress: dict[int, int] = {}
            self.finished: set[int] = set()

        def report(self, shard: int, images: int) -> None:
            if shard not in self.finished:  # a late report of a shard the driver already counted
                self.in_progress[shard] = images

        def restart(self, shard: int) -> None:
            self.in_progress.pop(shard, None)

        def finish(self, shard: int) -> None:
            self.finished.add(shard)
            self.in_progress.pop(shard, None)

        def total(self) -> int:
            return sum(self.in_progress.values())

    return ProgressBoard


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    # Ray's errors carry a traceback; the last line says what happened.
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
