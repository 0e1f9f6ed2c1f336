"""Scale: the driver's plan step for N and 10·N keys, and a long job's memory and throughput over time.

Plan: a listing file of N image URLs (shuffled, 1% of them repeated, ~40 characters each, as
a bucket's keys look) goes through the driver's whole planning step, ``list_images`` then
``Plan.create`` (sort, drop repeats, write ``_plan.parquet``, open it), each size in a fresh
process. Memory is that process's peak RSS over the step minus its RSS before (Linux's
high-water mark, reset just before the step; the modules are loaded and warmed on a small
listing first, so that the figure is the listing's, not the imports'). Linear means a cost per
key (the growth from N to 10·N keys over the 9·N keys added) plus a small fixed part (Arrow's
allocator keeps some memory whatever the size); the bounds below are checked and the run
fails past them.

Job: N small images (32-64 px PNGs) in a local folder through ``run_segment`` on a local Ray
cluster with a tiny untrained light model, while the driver's and every actor's RSS are
sampled twice a second. Memory is flat when RSS after the first fifth of the run grows by less
than ``JOB_GROWTH_BOUND`` bytes and by less than ``JOB_LEAK_BOUND_PER_IMAGE`` bytes per image
(the slope of a line fitted over the rest). Throughput is steady when no tenth of the run
(from the first commit to the last) does less than a third of the median tenth's images per
actor CPU-second, and none runs under a tenth of the median images/s (a stall). Images/s per
tenth are printed too, but on a shared machine they move with other processes' load.

    python bench/scale.py plan                          # 100,000 and 1,000,000 keys, .txt and .parquet listings
    python bench/scale.py plan --keys 200000 --formats txt
    python bench/scale.py job                           # 10,000 images, 2 actors
    python bench/scale.py job --images 2000 --actors 1

tests/test_scale.py runs both at CI sizes against the same bounds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The bounds this benchmark checks (and tests/test_scale.py with it). Plan: the driver's peak
# memory per listed key (the growth from N to 10·N keys over the keys added), for URLs of ~40
# characters: the plan's Arrow array alone is ~48 bytes a key, sorting it holds it twice, and
# the Python lists and set the listing used before cost ~240. Then what does not grow with the
# listing, and the planning time per million keys on one core (~5 s on a busy 2-core machine).
PLAN_BYTES_PER_KEY_BOUND = 200
PLAN_FIXED_BYTES_BOUND = 64 * 1024**2
PLAN_SECONDS_PER_MILLION_BOUND = 20.0
# Job: RSS growth of the driver and of each actor after the first fifth of the run.
JOB_GROWTH_BOUND = 64 * 1024**2
JOB_LEAK_BOUND_PER_IMAGE = 2048
# Steady: no tenth of the run does less than a third of the median tenth's images per actor
# CPU-second (the job's own work per image; other processes on the machine do not move it), and
# none runs under a tenth of the median images/s (a stall: the driver or the actors waiting).
JOB_SLOWEST_TENTH_BOUND = 1 / 3
JOB_STALLED_TENTH_BOUND = 1 / 10

WARM_UP_KEYS = 2000


# Plan ----------------------------------------------------------------------------------------


def synthetic_uris(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct image URLs in a random order, plus 1% repeats of some of them."""
    rng = random.Random(seed)
    uris = [f"s3://photos/2026/{i % 1000:03d}/img-{i:09d}.jpg" for i in range(count)]
    uris += rng.sample(uris, count // 100)
    rng.shuffle(uris)
    return uris


def write_listing(path: Path, uris: list[str]) -> Path:
    """A listing file of ``uris``: ``.txt`` (one per line) or ``.parquet`` (column image_uri)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"image_uri": pa.array(uris, pa.string())}), path)
    else:
        path.write_text("# a synthetic listing (bench/scale.py)\n" + "\n".join(uris) + "\n")
    return path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def plan_child(listing: str, output: str, shard_size: int) -> dict:
    """The planning step of a driver, measured in this (fresh) process: see the module's docstring."""
    import gc

    from maskray.pipeline.segment.listing import list_images
    from maskray.pipeline.segment.plan import Plan
    from maskray.pipeline.storage import open_url

    # Warm-up: the lazily loaded parts (Arrow's compute kernels, the Parquet writer, fsspec's
    # local filesystem) cost ~45 MB once, whatever the size; they are not the listing's.
    small = Path(output).parent / f"warm-up{Path(listing).suffix}"
    write_listing(small, synthetic_uris(WARM_UP_KEYS, seed=1))
    fs, small_output = open_url(str(Path(output).parent / "warm-up-plan"))
    Plan.create(fs, small_output, list_images(str(small)).array, shard_size).close()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the high-water mark of RSS to the current RSS
    before = _rss()
    started = time.perf_counter()
    listing = list_images(listing)
    listed = time.perf_counter()
    fs, path = open_url(output)
    plan = Plan.create(fs, path, listing.array, shard_size)
    planned = time.perf_counter()
    peak = _peak_rss()
    result = {"keys": len(listing), "shards": plan.num_shards, "list_seconds": listed - started, "plan_seconds": planned - listed,
              "seconds": planned - started, "rss_before": before, "peak_growth": peak - before,
              "plan_file_bytes": fs.size(plan.path)}
    plan.close()
    return result


def measure_plan(keys: int, folder: Path, kind: str = "txt", shard_size: int = 64) -> dict:
    """A listing of ``keys`` distinct URLs (plus 1% repeats) planned in a fresh process; its figures."""
    listing = write_listing(folder / f"listing-{keys}.{kind}", synthetic_uris(keys))
    output = folder / f"plan-{keys}-{kind}"
    command = [sys.executable, str(Path(__file__).resolve()), "plan-child", str(listing), str(output), str(shard_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the planning process failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "listing": str(listing), "output": str(output), "kind": kind}


def plan_figures(small: dict, large: dict) -> dict:
    """The cost of one more key (between the two sizes: what grows with the listing), the
    fixed part left at the smaller size, and the time per million keys at the larger."""
    per_key = (large["peak_growth"] - small["peak_growth"]) / (large["keys"] - small["keys"])
    return {"bytes_per_key": per_key, "fixed_bytes": small["peak_growth"] - per_key * small["keys"],
            "seconds_per_million": large["seconds"] / large["keys"] * 1e6,
            "time_ratio": large["seconds"] / small["seconds"], "memory_ratio": large["peak_growth"] / max(1, small["peak_growth"])}


def plan_bound_failures(figures: dict) -> list[str]:
    failures = []
    if figures["bytes_per_key"] > PLAN_BYTES_PER_KEY_BOUND:
        failures.append(f"{figures['bytes_per_key']:.0f} bytes of driver memory per key > {PLAN_BYTES_PER_KEY_BOUND}")
    if figures["fixed_bytes"] > PLAN_FIXED_BYTES_BOUND:
        failures.append(f"{figures['fixed_bytes'] / 1e6:.0f} MB of driver memory whatever the size "
                        f"> {PLAN_FIXED_BYTES_BOUND / 1e6:.0f}")
    if figures["seconds_per_million"] > PLAN_SECONDS_PER_MILLION_BOUND:
        failures.append(f"{figures['seconds_per_million']:.1f} s per million keys > {PLAN_SECONDS_PER_MILLION_BOUND}")
    return failures


def bench_plan(args) -> int:
    failures = []
    with tempfile.TemporaryDirectory(prefix="maskray-scale-") as tmp:
        for kind in args.formats:
            small, large = (measure_plan(n, Path(tmp), kind, args.shard_size) for n in (args.keys, 10 * args.keys))
            for r in (small, large):
                print(f"{kind:8s} {r['keys']:>10,} keys  list {r['list_seconds']:6.2f} s  plan {r['plan_seconds']:6.2f} s  "
                      f"peak +{r['peak_growth'] / 1e6:7.1f} MB  plan file {r['plan_file_bytes'] / 1e6:6.1f} MB "
                      f"({r['plan_file_bytes'] / r['keys']:.1f} B/key), {r['shards']:,} shards")
            figures = plan_figures(small, large)
            print(f"{kind:8s} 10x keys: time x{figures['time_ratio']:.1f}, peak memory growth x{figures['memory_ratio']:.1f}; "
                  f"{figures['bytes_per_key']:.0f} bytes per key + {figures['fixed_bytes'] / 1e6:.0f} MB fixed, "
                  f"{figures['seconds_per_million']:.1f} s per million keys")
            failures += [f"{kind}: {f}" for f in plan_bound_failures(figures)]
    for failure in failures:
        print("BOUND EXCEEDED:", failure)
    return 1 if failures else 0


# Job -----------------------------------------------------------------------------------------


def write_tiny_images(folder: Path, count: int) -> list[Path]:
    """``count`` PNGs of 32 to 64 px a side, a shape or two on noise (the same for every run)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        height, width = (int(s) for s in rng.integers(32, 65, 2))
        image = Image.fromarray(rng.integers(0, 90, (height, width, 3), dtype=np.uint8))
        x, y = int(rng.integers(0, width - 16)), int(rng.integers(0, height - 16))
        ImageDraw.Draw(image).ellipse([x, y, x + 14, y + 12], fill=tuple(int(c) for c in rng.integers(120, 256, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        path = folder / f"{i // 1000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def tiny_weights(path: Path) -> Path:
    """An untrained light model cut down to run on 64 px images fast: what the job's memory and
    throughput over time are measured with, not its detections."""
    import torch

    from maskray.model import MaskRCNN, MaskRCNNConfig

    torch.manual_seed(0)
    config = MaskRCNNConfig.light(
        num_classes=4, class_names=("__background__", "disc", "box", "wedge"), min_size=(64,), max_size=64,
        anchor_sizes=(8, 16, 32, 64, 128), fpn_channels=16, representation_size=32, mask_head_channels=8, mask_head_layers=1,
        rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=10, box_detections_per_img=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    MaskRCNN(config).save(path)
    return path


@dataclass
class MemoryTrace:
    """RSS samples (wall-clock time, bytes) of the driver and of each actor (by pid)."""

    driver: list[tuple[float, int]] = field(default_factory=list)
    actors: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    actor_cpu: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # (time, CPU seconds used so far)


class MemorySampler:
    """Samples the driver's and the job's actors' RSS every ``interval`` s in a thread.

    The actors are found by name (``maskray-segment-*``, as the job names them) and asked their
    pid once; the pid call waits behind the shards already queued on the actor, so an actor's
    samples start a few shards into the run.
    """

    def __init__(self, interval: float = 0.5):
        import psutil

        self.interval = interval
        self.trace = MemoryTrace()
        self._psutil = psutil
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskray-memory-sampler", daemon=True)
        self._pid_refs: dict[str, object] = {}
        self._processes: dict[int, object] = {}

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _find_actors(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            namespace = entry.get("namespace") if isinstance(entry, dict) else None
            if name.startswith("maskray-segment-") and name not in self._pid_refs:
                try:
                    self._pid_refs[name] = ray.get_actor(name, namespace=namespace).pid.remote()
                except ValueError:  # gone since the listing
                    self._pid_refs[name] = None
        pending = {ref: name for name, ref in self._pid_refs.items() if ref is not None}
        if pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                try:
                    pid = ray.get(ref)
                    self._processes[pid] = self._psutil.Process(pid)
                    self.trace.actors.setdefault(pid, [])
                    self.trace.actor_cpu.setdefault(pid, [])
                except Exception:  # noqa: BLE001 - the actor ended before it answered
                    pass
                self._pid_refs[pending[ref]] = None

    def _run(self) -> None:
        me = self._psutil.Process()
        while not self._stop.is_set():
            now = time.time()  # the clock of the done-markers' modification times
            self.trace.driver.append((now, me.memory_info().rss))
            try:
                self._find_actors()
            except Exception:  # noqa: BLE001 - Ray shutting down at the end of a run
                pass
            for pid, process in list(self._processes.items()):
                try:
                    rss, cpu = process.memory_info().rss, process.cpu_times()
                    self.trace.actors[pid].append((now, rss))
                    self.trace.actor_cpu[pid].append((now, cpu.user + cpu.system))
                except self._psutil.Error:  # the actor ended (the job is over)
                    del self._processes[pid]
            self._stop.wait(self.interval)


def commit_times(output: Path) -> list[tuple[float, int]]:
    """(commit time, images) of every shard of a local output, from its done-markers, in time order."""
    done = []
    for marker in (output / "_done").glob("shard-*.json"):
        done.append((marker.stat().st_mtime, json.loads(marker.read_text())["images"]))
    return sorted(done)


def images_by_tenth(commits: list[tuple[float, int]], start: float, end: float) -> list[float]:
    """Images processed in each tenth of ``start`` .. ``end``; a shard's images are spread evenly
    over the time since the commit before it."""
    width = (end - start) / 10
    tenths = [0.0] * 10
    previous = commits[0][0]
    for at, images in commits[1:]:
        span = max(at - previous, 1e-9)
        for k in range(10):
            low, high = start + k * width, start + (k + 1) * width
            tenths[k] += images * max(0.0, min(high, at) - max(low, previous)) / span
        previous = at
    return tenths


def throughput_by_tenth(commits: list[tuple[float, int]]) -> list[float]:
    """images/s in each tenth of the time from the first commit to the last."""
    start, end = commits[0][0], commits[-1][0]
    return [images / ((end - start) / 10) for images in images_by_tenth(commits, start, end)]


def _cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """The CPU seconds an actor had used at time ``t``, interpolated between its samples."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
    return samples[-1][1] if t > samples[-1][0] else samples[0][1]


def work_by_tenth(commits: list[tuple[float, int]], actor_cpu: dict[int, list[tuple[float, float]]]) -> list[float]:
    """Images per CPU-second of the actors in each tenth of the run, from when every actor's CPU
    time is sampled to the last commit. Unlike images/s, this does not fall when other
    processes take the machine's cores: it falls when the job does more work per image as it
    goes (a list scanned per image that grows with the run, a cache that is never emptied)."""
    traces = [t for t in actor_cpu.values() if len(t) >= 2]
    if not traces:
        return []
    start, end = max([commits[0][0], *(t[0][0] for t in traces)]), commits[-1][0]
    if end <= start:
        return []
    width = (end - start) / 10
    result = []
    for k, images in enumerate(images_by_tenth(commits, start, end)):
        low, high = start + k * width, start + (k + 1) * width
        cpu = sum(_cpu_at(t, high) - _cpu_at(t, low) for t in traces)
        result.append(images / cpu if cpu > 0 else 0.0)
    return result


def growth_after_warm_up(samples: list[tuple[float, int]], start: float, end: float,
                         warm_fraction: float = 0.2) -> tuple[int, float]:
    """Over the samples of the run from ``start`` to ``end``, after its first ``warm_fraction``:
    (max RSS − the first RSS, least-squares slope in bytes/s)."""
    cut = start + warm_fraction * (end - start)
    rest = [(t, r) for t, r in samples if cut <= t <= end]
    if len(rest) < 3:
        return 0, 0.0
    growth = max(r for _, r in rest) - rest[0][1]
    mean_t = statistics.fmean(t for t, _ in rest)
    mean_r = statistics.fmean(r for _, r in rest)
    spread = sum((t - mean_t) ** 2 for t, _ in rest)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in rest) / spread if spread else 0.0
    return growth, slope


@dataclass
class JobRun:
    summary: object  # maskray.pipeline.segment.job.JobSummary
    trace: MemoryTrace
    tenths: list[float]  # images/s per tenth of the run
    work_tenths: list[float]  # images per actor CPU-second, per tenth of the run
    images_per_second: float  # over the whole steady state
    start: float  # the first commit (wall clock): the run's steady state starts here
    end: float  # the last commit

    def memory_report(self) -> dict[str, tuple[int, float]]:
        """name -> (growth after the warm-up in bytes, leak in bytes per image processed)."""
        rate = self.images_per_second or 1.0
        report = {}
        for name, samples in [("driver", self.trace.driver), *((f"actor {pid}", s) for pid, s in self.trace.actors.items())]:
            growth, slope = growth_after_warm_up(samples, self.start, self.end)
            per_image = slope / (rate if name == "driver" else rate / max(1, len(self.trace.actors)))
            report[name] = (growth, per_image)
        return report


def run_job(images: Path, output: Path, weights: Path, actors: int, shard_size: int = 200, batch_size: int = 16) -> JobRun:
    """The segmentation job over the folder ``images``, sampled (see the module's docstring)."""
    from maskray.pipeline.segment.job import run_segment
    from maskray.pipeline.segment.settings import SegmentJob

    job = SegmentJob(str(images), str(output), str(weights), batch_size=batch_size, shard_size=shard_size, num_actors=actors,
                     cpus_per_actor=1, read_threads=4, progress=False)
    with MemorySampler() as sampler:
        summary = run_segment(job)
    commits = commit_times(output)
    steady = commits[-1][0] - commits[0][0]
    rate = sum(n for _, n in commits[1:]) / steady if steady > 0 else 0.0
    trace = sampler.trace
    return JobRun(summary, trace, throughput_by_tenth(commits), work_by_tenth(commits, trace.actor_cpu), rate,
                  commits[0][0], commits[-1][0])


def job_bound_failures(run: JobRun) -> list[str]:
    failures = []
    for name, (growth, per_image) in run.memory_report().items():
        if growth > JOB_GROWTH_BOUND:
            failures.append(f"{name}: RSS grew {growth / 1e6:.1f} MB after the warm-up (bound {JOB_GROWTH_BOUND / 1e6:.0f} MB)")
        if per_image > JOB_LEAK_BOUND_PER_IMAGE:
            failures.append(f"{name}: RSS rises {per_image:.0f} bytes per image (bound {JOB_LEAK_BOUND_PER_IMAGE})")
    if not run.work_tenths:
        failures.append("the actors' CPU time was not sampled: the run's work per image is unknown")
        return failures
    median = statistics.median(run.work_tenths)
    if min(run.work_tenths) < JOB_SLOWEST_TENTH_BOUND * median:
        failures.append(f"the slowest tenth did {min(run.work_tenths):.1f} images per CPU-second, "
                        f"under a third of the median {median:.1f}")
    median = statistics.median(run.tenths)
    if min(run.tenths) < JOB_STALLED_TENTH_BOUND * median:
        failures.append(f"the slowest tenth ran {min(run.tenths):.1f} images/s, under a tenth of the median {median:.1f}: a stall")
    return failures


def bench_job(args) -> int:
    import ray

    from maskray.pipeline.cluster import connect_ray

    with tempfile.TemporaryDirectory(prefix="maskray-scale-job-") as tmp:
        started = time.perf_counter()
        write_tiny_images(Path(tmp) / "images", args.images)
        print(f"{args.images:,} images written in {time.perf_counter() - started:.1f} s")
        weights = tiny_weights(Path(tmp) / "tiny.pt")
        connect_ray(None)
        try:
            run = run_job(Path(tmp) / "images", Path(tmp) / "output", weights, args.actors, args.shard_size, args.batch_size)
        finally:
            ray.shutdown()
    s = run.summary
    print(f"job: {s.images:,} images ({s.errors} errors), {s.instances:,} instances, {s.shards} shards, {s.seconds:.1f} s in all, "
          f"{run.images_per_second:.1f} images/s from the first commit to the last")
    print("images/s per tenth of the run: " + " ".join(f"{t:.1f}" for t in run.tenths)
          + f"  (slowest/median {min(run.tenths) / statistics.median(run.tenths):.2f})")
    if run.work_tenths:
        print("images per actor CPU-second, per tenth: " + " ".join(f"{t:.1f}" for t in run.work_tenths)
              + f"  (slowest/median {min(run.work_tenths) / statistics.median(run.work_tenths):.2f})")
    for name, (growth, per_image) in run.memory_report().items():
        samples = run.trace.driver if name == "driver" else run.trace.actors[int(name.split()[1])]
        peak = max(r for _, r in samples)
        print(f"{name:14s} {len(samples):4d} samples, peak RSS {peak / 1e6:7.1f} MB, growth after the first fifth "
              f"{growth / 1e6:+6.1f} MB, trend {per_image:+7.1f} bytes/image")
    failures = job_bound_failures(run)
    if s.images != args.images:
        failures.append(f"{s.images} images in the output, {args.images} in the input")
    for failure in failures:
        print("BOUND EXCEEDED:", failure)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    plan = sub.add_parser("plan", help="plan time and driver memory for N and 10·N keys")
    plan.add_argument("--keys", type=int, default=100_000, help="N (default 100,000; 10·N is also run)")
    plan.add_argument("--formats", nargs="+", default=["txt", "parquet"], choices=["txt", "parquet"])
    plan.add_argument("--shard-size", type=int, default=64)
    job = sub.add_parser("job", help="a long job's memory and throughput over time")
    job.add_argument("--images", type=int, default=10_000)
    job.add_argument("--actors", type=int, default=2)
    job.add_argument("--shard-size", type=int, default=200)
    job.add_argument("--batch-size", type=int, default=16)
    child = sub.add_parser("plan-child", help=argparse.SUPPRESS)
    child.add_argument("listing")
    child.add_argument("output")
    child.add_argument("shard_size", type=int)
    args = parser.parse_args()
    if args.what == "plan-child":
        print(json.dumps(plan_child(args.listing, args.output, args.shard_size)))
        return 0
    return bench_plan(args) if args.what == "plan" else bench_job(args)


if __name__ == "__main__":
    sys.exit(main())
