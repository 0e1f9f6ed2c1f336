"""The segmentation pipeline against a bare loop, and its memory for N and 10·N images.

Throughput: the pipeline (``run_segment``: local folder → list → Ray actor → read, decode,
batch, Mask R-CNN, RLE → Parquet part files + done markers) against a bare loop over the same
images already decoded in memory (``model(batch)`` and nothing else), same light model, same
batch size, same torch threads. The ratio is images/s of the pipeline over images/s of the
loop; the pipeline's figure is its steady state (from its first actor ready to its last
commit; the time to start Ray and load the model is reported beside it).

The two alternate in one run, ``--rounds`` times (loop, pipeline, loop, pipeline, ..., loop),
and each pipeline run is compared with the mean of the loops just before and after it, so that
the load of a shared machine hits both alike; the median of the rounds is the figure. Ray
starts its workers 15 steps nicer than the driver (its ``worker_niceness``), so the bare loop
runs in a child process at that niceness too, as bench/train.py's plain loop does: on a machine
that other work shares, both then compete for the cores alike.

Memory: peak RSS of the driver and of the actors (sampled every 50 ms), for a job of N and one
of 10·N images; bounded memory means the 10·N peaks are within 1.2x of the N peaks.

    python bench/pipeline.py                    # 256 images of 480x320, the demo model, 2 threads, 3 rounds
    python bench/pipeline.py --images 128 --rounds 2 --no-memory
    python bench/pipeline.py --weights model/weights/shapes_light.pt
    python bench/pipeline.py --actors 2 --threads 1 --no-memory   # two 1-thread actors against two 1-thread loops at once
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.pipeline.decode import decode_image
from maskray.pipeline.segment.job import run_segment
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.weights import build_model, read_weights

ROOT = Path(__file__).resolve().parents[1]

DEMO_WEIGHTS = ROOT / "model" / "weights" / "shapes_light.pt"
RAY_WORKER_NICENESS = 15  # Ray's default worker_niceness


def write_images(folder: Path, count: int, height: int, width: int) -> None:
    """``count`` JPEGs of coloured shapes on textured ground (the same ones for every run)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 90, (height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 80))
            size = int(rng.integers(30, 80))
            colour = tuple(int(c) for c in rng.integers(100, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + size, y + size], fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())


def default_weights(folder: Path) -> Path:
    if DEMO_WEIGHTS.exists():
        return DEMO_WEIGHTS
    torch.manual_seed(0)
    path = folder / "light-untrained.pt"
    MaskRCNN(MaskRCNNConfig.light(num_classes=4)).save(path)
    return path


def bare_loop(weights: Path, folder: Path, batch_size: int, threads: int) -> float:
    """images/s of the model alone over the decoded images (best of two passes)."""
    torch.set_num_threads(threads)
    # The job's own model settings (its --precision auto included), as its actor builds it.
    overrides = SegmentJob(str(folder), str(folder) + "-unused", str(weights)).overrides()
    model = build_model(read_weights(str(weights)), overrides)
    images = [decode_image(p.read_bytes()) for p in sorted(folder.glob("*.jpg"))]
    return loop_pace(model, images, batch_size)


def loop_pace(model, images: list[torch.Tensor], batch_size: int) -> float:
    """images/s of ``model`` over ``images`` in batches (best of two passes, after a warm-up call)."""
    model(images[:batch_size])  # warm-up: oneDNN primitives, allocator
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def loop_in_child(weights: Path, folder: Path, batch_size: int, threads: int, copies: int = 1) -> float:
    """bare_loop in a child process at the niceness Ray gives its workers (the actor's); with
    ``copies``, that many children at once (as many as the job has actors), their images/s summed."""
    arguments = [__file__, "--loop-child", json.dumps([str(weights), str(folder), batch_size, threads])]
    return sum(figures_of_children([arguments] * copies))


def figure_of_child(arguments: list[str]) -> float:
    """The number a child Python process (``arguments``) prints last (figures_of_children)."""
    return figures_of_children([arguments])[0]


def figures_of_children(argument_lists: list[list[str]]) -> list[float]:
    """The number each child Python process prints last, the children run at once and at the
    niceness Ray gives its workers (the actor's), so that a shared machine's load hits them as it
    hits the actors."""
    import subprocess

    nice = ["nice", "-n", str(RAY_WORKER_NICENESS)]  # not preexec_fn: Ray's threads already run in this process
    children = [subprocess.Popen([*nice, sys.executable, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for arguments in argument_lists]
    figures = []
    for child, arguments in zip(children, argument_lists):
        output, errors = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(arguments)} failed ({child.returncode}): {errors[-2000:]}")
        figures.append(float(output.strip().splitlines()[-1]))
    return figures


def rss_bytes(pid: int | str) -> int:
    """Resident memory of a process, from /proc (Linux), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def pids_whose_command(matches) -> list[int]:
    """The processes whose command line (bytes, from /proc) ``matches`` accepts."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if matches(f.read()):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def actor_pids() -> list[int]:
    return pids_whose_command(lambda command: b"SegmentActor" in command)


class PeakSampler:
    """Peak RSS of this process (the driver) and of Ray's SegmentActor processes."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.driver, self.actors = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids, last_scan = [], 0.0
        while not self._stop.is_set():
            self.driver = max(self.driver, rss_bytes(os.getpid()))
            if time.monotonic() - last_scan > 1.0:  # new actors appear rarely: rescan each second
                pids, last_scan = actor_pids(), time.monotonic()
            self.actors = max(self.actors, sum(rss_bytes(pid) for pid in pids))
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pipeline_run(weights: Path, folder: Path, output: Path, batch_size: int, threads: int, shard_size: int,
                 sample_memory: bool = True, actors: int = 1):
    """The job on ``actors`` actors of ``threads`` CPUs each; with ``sample_memory``, the peak RSS
    of driver and actors too (the throughput runs go without: the sampler's scans of /proc take
    CPU from the job it measures)."""
    shutil.rmtree(output, ignore_errors=True)
    job = SegmentJob(str(folder), str(output), str(weights), batch_size=batch_size, shard_size=shard_size,
                     num_actors=actors, cpus_per_actor=threads, progress=False)
    peaks = PeakSampler()
    with peaks if sample_memory else contextlib.nullcontext():
        summary = run_segment(job)
    assert summary.complete and summary.errors == 0, summary.describe()
    return summary, peaks


def memory_run(args: argparse.Namespace, count: int) -> dict[str, int]:
    """Peak RSS of driver and actors for a job of ``count`` images, run in a child process."""
    import json
    import subprocess

    command = [sys.executable, __file__, "--memory-child", str(count), "--height", str(args.height), "--width", str(args.width),
               "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--threads", str(args.threads)]
    if args.weights:
        command += ["--weights", str(args.weights)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_child(args: argparse.Namespace) -> None:
    import json

    import ray

    work = Path(tempfile.mkdtemp(prefix="maskray-bench-memory-"))
    try:
        weights = args.weights or default_weights(work)
        write_images(work / "images", args.memory_child, args.height, args.width)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=args.threads,
                 logging_level="WARNING", log_to_driver=False)
        _, peaks = pipeline_run(weights, work / "images", work / "out", args.batch_size, args.threads, args.shard_size)
        print(json.dumps({"driver": peaks.driver, "actors": peaks.actors}))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="N, images of the throughput run and the small memory run")
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the loop, CPUs of each actor")
    parser.add_argument("--actors", type=int, default=1,
                        help="actors of the job; the bare loop then runs as many copies at once, their images/s summed")
    parser.add_argument("--weights", type=Path, default=None, help="default: the demo model, else an untrained light model")
    parser.add_argument("--rounds", type=int, default=3, help="pipeline runs, each between two loop runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the N vs 10·N memory runs")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--loop-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    if args.loop_child:
        weights, folder, batch_size, threads = json.loads(args.loop_child)
        print(bare_loop(Path(weights), Path(folder), batch_size, threads))
        return None

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    work = Path(tempfile.mkdtemp(prefix="maskray-bench-"))
    try:
        weights = args.weights or default_weights(work)
        small = work / "small"
        write_images(small, args.images, args.height, args.width)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{args.actors} x {args.threads} threads, weights {weights.name}, {args.images} images of {args.width}x{args.height}, "
              f"batch {args.batch_size}, shards of {args.shard_size}")
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=args.threads * args.actors, logging_level="WARNING", log_to_driver=False)
        # Alternate: loop, pipeline, loop, pipeline, ..., loop; each pipeline run against the mean of its two loops.
        loops = [loop_in_child(weights, small, args.batch_size, args.threads, args.actors)]
        print(f"bare loop (decoded tensors -> model), at Ray's worker niceness: {loops[0]:.2f} images/s", flush=True)
        rounds = []
        for n in range(args.rounds):
            summary, _ = pipeline_run(weights, small, work / f"out-{n}", args.batch_size, args.threads, args.shard_size,
                                      sample_memory=False, actors=args.actors)
            loops.append(loop_in_child(weights, small, args.batch_size, args.threads, args.actors))
            steady = summary.images_run / summary.processing_seconds
            loop = (loops[-2] + loops[-1]) / 2
            rounds.append((steady, loop, summary))
            print(f"round {n + 1}: pipeline (folder -> Parquet), steady {steady:.2f} images/s; loops {loops[-2]:.2f}, "
                  f"{loops[-1]:.2f}; ratio {steady / loop:.3f}; end to end incl. Ray start and model load "
                  f"{summary.images_run / summary.seconds:.2f} images/s ({summary.seconds:.1f} s, {summary.instances} instances)",
                  flush=True)
        ratios = [steady / loop for steady, loop, _ in rounds]
        print(f"bare loop:            {statistics.mean(loops):.2f} images/s (runs: {', '.join(f'{v:.2f}' for v in loops)})")
        print(f"pipeline, steady:     {statistics.mean(s for s, _, _ in rounds):.2f} images/s "
              f"(runs: {', '.join(f'{s:.2f}' for s, _, _ in rounds)})")
        print(f"ratio per round:      {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
        print(f"load average during the run: {', '.join(f'{v:.1f}' for v in os.getloadavg())} (1, 5, 15 min) "
              f"on {os.cpu_count()} CPUs")
        if not args.no_memory:
            ray.shutdown()
            # Each memory run in a fresh process, so that the driver's peak is the job's alone.
            small_peaks = memory_run(args, args.images)
            large_peaks = memory_run(args, 10 * args.images)
            mb = 1024**2
            for who in ("driver", "actors"):
                print(f"peak RSS, {who + ':':<8} {small_peaks[who] / mb:.0f} MB for {args.images} images, "
                      f"{large_peaks[who] / mb:.0f} MB for {10 * args.images}  (ratio {large_peaks[who] / small_peaks[who]:.3f})")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
