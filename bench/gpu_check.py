"""``make gpu-check``: everything in maskray that needs a GPU, in one run of under 8 minutes on one GPU.

Run it first whenever a machine with a GPU is at hand. In order:

1. **Build**: the compiled operators with their CUDA kernels (``setup.py build_ext --inplace``
   with ``MASKRAY_FORCE_CUDA=1``, for this GPU's architecture), unless the build in place has
   them already.
2. **Tests**: ``tests/test_ops_cuda.py`` (the RoI ops against torchvision's CUDA ops) and
   ``tests/test_gpu_input_path.py`` (nvJPEG decoding, the input path on the device).
3. **RoI ops**: maskray's CUDA RoIAlign / RoIPool against torchvision's CUDA ops
   (bench/roi_ops.py's Mask R-CNN workload, on the GPU, median of several runs).
4. **Mask R-CNN end to end**: the R50-FPN model, v1 and v2, at 800 px (images of 1200x800),
   in float16 and bfloat16, over batch sizes 1 to 16: the bare model loop (decoded images
   already on the GPU -> ``model(batch)`` -> RLE) and the segmentation job (a folder of JPEGs ->
   ``run_segment`` on one Ray actor -> Parquet), with GPU memory peaks, and the job's steady
   state as a share of the loop's pace.

Without internet: the models are seeded random inits in torchvision's layout with calibrated
BatchNorm (tests/torchvision_reference.py, as bench/model.py uses them), scored so that every
image has 100 detections, the mask head's worst case; nothing is downloaded. It prints tables
ready for BENCHMARKS.md, with the device named, and exits non-zero if a step failed. Without a
GPU it says so and exits with status 2.

    make gpu-check                                  # all of it
    python bench/gpu_check.py --skip-build --skip-tests
    python bench/gpu_check.py --job-batch-sizes 1 2 4 8 16   # the job at every batch size (about 2 min more)
    python bench/gpu_check.py --cpu-smoke           # its code paths on the CPU, light model, a few images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS_GPU = ("gpu-check needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False): "
             "run it on a machine with one (`make gpu-check`), or `--cpu-smoke` to try its code on the CPU")
TEST_FILES = ("tests/test_ops_cuda.py", "tests/test_gpu_input_path.py")


# the steps --------------------------------------------------------------------------------

def build(python: str) -> dict:
    """Builds the operators with CUDA kernels in place (model/_C.abi3.so) when they lack them."""
    check = "import maskray.model.ops as o; print(o.has_cuda_kernels())"
    found = subprocess.run([python, "-c", check], capture_output=True, text=True, check=False, cwd=ROOT)
    if found.returncode == 0 and found.stdout.strip().endswith("True"):
        return {"ok": True, "what": "the build in place has the CUDA kernels already", "seconds": 0.0}
    import torch

    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, MASKRAY_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}"),
               MAX_JOBS=os.environ.get("MAX_JOBS", str(min(16, os.cpu_count() or 2))))
    if not env.get("CUDA_HOME") and Path("/usr/local/cuda").is_dir():
        env["CUDA_HOME"] = "/usr/local/cuda"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maskray-gpu-build-") as temp:
        result = subprocess.run([python, "setup.py", "build_ext", "--inplace", "--build-temp", temp], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print("\n".join((result.stdout + result.stderr).splitlines()[-40:]), file=sys.stderr)
        return {"ok": False, "what": f"the CUDA build failed (exit status {result.returncode})", "seconds": seconds}
    found = subprocess.run([python, "-c", check], capture_output=True, text=True, check=False, cwd=ROOT)
    ok = found.returncode == 0 and found.stdout.strip().endswith("True")
    what = f"built for sm_{major}{minor} in {seconds:.0f} s" if ok else "built, but the CUDA kernels are not registered"
    return {"ok": ok, "what": what, "seconds": seconds}


def run_tests(python: str) -> dict:
    start = time.perf_counter()
    result = subprocess.run([python, "-m", "pytest", *TEST_FILES, "-q", "-p", "no:cacheprovider", "-rfs"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0:
        print("\n".join(lines[-60:]), file=sys.stderr)
    return {"ok": result.returncode == 0, "what": lines[-1].strip("= ") if lines else f"exit status {result.returncode}",
            "seconds": time.perf_counter() - start}


def roi_ops(device: str, repeats: int) -> list[dict]:
    """bench/roi_ops.py's workload on ``device``: torchvision's ops against maskray's."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import roi_ops as bench_roi_ops

    def timed(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return bench_roi_ops.median_seconds(run, repeats)

    rows = []
    for layout in ("contiguous", "channels_last"):
        feature, rois = bench_roi_ops.make_inputs(channels_last=layout == "channels_last")
        if device != "cuda":  # the smoke run: a small slice of the workload
            feature, rois = feature[:, :32, :64, :64].contiguous(), rois[:32]
        feature, rois = feature.to(device), rois.to(device)
        if layout == "channels_last":
            feature = feature.contiguous(memory_format=torch.channels_last)
        for size in (7, 14):
            for name, theirs, mine in bench_roi_ops.cases(feature, rois, size):
                t_theirs, t_mine = timed(theirs), timed(mine)
                rows.append({"case": name, "out": size, "layout": layout, "torchvision_ms": t_theirs * 1e3,
                             "maskray_ms": t_mine * 1e3, "ratio": t_theirs / t_mine})
                print(f"  {name:<18} {size:>2}x{size:<2} {layout:<13} torchvision {t_theirs * 1e3:8.3f} ms   "
                      f"maskray {t_mine * 1e3:8.3f} ms   {t_theirs / t_mine:5.2f}x", flush=True)
    return rows


class MemorySampler:
    """Peak device memory in use (all processes: the actor's included) above what was in use at
    the start, sampled every 20 ms with cudaMemGetInfo."""

    def __init__(self, device: str):
        import torch

        self.device, self.torch = device, torch
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.base)
            time.sleep(0.02)

    def __enter__(self) -> MemorySampler:
        if self.device == "cuda":
            self.base = self._used()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def make_jpegs(folder: Path, count: int, height: int, width: int) -> None:
    """``count`` JPEGs of smooth colour blobs (photo-like for the codec), seeded."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand(1, 3, max(1, height // 32), max(1, width // 32), generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
        pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())


def reference_state_dict(arch: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.torchvision_reference import calibrated_state_dict, calibrated_state_dict_v2

    return calibrated_state_dict_v2() if arch == "v2" else calibrated_state_dict()


def build_model(arch: str, precision: str, device: str, state_dict: dict | None):
    import torch

    from maskray.model import MaskRCNN, MaskRCNNConfig

    if arch == "light":
        torch.manual_seed(0)
        config = MaskRCNNConfig.light(num_classes=91, precision=precision, box_score_thresh=0.0)
        model = MaskRCNN(config)
    else:
        preset = MaskRCNNConfig.resnet50_fpn_v2 if arch == "v2" else MaskRCNNConfig.resnet50_fpn
        model = MaskRCNN(preset(min_size=(800,), max_size=1333, precision=precision))
        model.load_state_dict(state_dict)
    return model.eval().to_inference_layout().to(device)


def model_loop(model, images: list, batch: int, device: str, passes: int = 1) -> dict:
    """images/s of ``model`` over ``images`` (on the device), ``batch`` at a time, best of ``passes``;
    the peak memory torch allocated above what it held before."""
    import torch

    model(images[:batch])  # warm-up: cuDNN's algorithms for these shapes, the allocator's pools
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    best, detections = 0.0, 0
    for _ in range(passes):
        start = time.perf_counter()
        detections = 0
        for i in range(0, len(images) - batch + 1, batch):
            detections += sum(len(r["labels"]) for r in model(images[i : i + batch]))
        if device == "cuda":
            torch.cuda.synchronize()
        done = (len(images) // batch) * batch
        best = max(best, done / (time.perf_counter() - start))
    peak = (torch.cuda.max_memory_allocated() - before) if device == "cuda" else 0
    return {"images_per_s": best, "peak_bytes": peak, "detections_per_image": detections / max(1, (len(images) // batch) * batch)}


def job_run(weights: Path, images: Path, output: Path, batch: int | None, precision: str, device: str, shard_size: int) -> dict:
    from maskray.pipeline.segment.job import run_segment
    from maskray.pipeline.segment.settings import SegmentJob

    shutil.rmtree(output, ignore_errors=True)
    job = SegmentJob(str(images), str(output), str(weights), batch_size=batch, shard_size=shard_size, num_actors=1,
                     progress=False, precision=precision, cpus_per_actor=2 if device != "cuda" else None)
    with MemorySampler(device) as memory:
        summary = run_segment(job)
    if not summary.complete or summary.errors:
        raise RuntimeError(f"the job failed: {summary.describe()}")
    return {"images_per_s": summary.images_run / summary.processing_seconds, "peak_bytes": memory.peak,
            "end_to_end_s": summary.seconds, "instances_per_image": summary.instances / max(1, summary.images_run)}


def measure(args: argparse.Namespace) -> dict:
    """Steps 3 and 4, in this process (after the build, in a fresh one)."""
    import ray
    import torch

    from maskray.pipeline.decode import decode_image
    from maskray.pipeline.segment.worker import _input_pixels, choose_batch_size

    device = "cpu" if args.cpu_smoke else "cuda"
    deadline = args.deadline or time.time() + args.budget
    cost = {"loop": 10.0, "job": 25.0}  # seconds a run takes, as last measured

    def in_time(kind: str, what: str) -> bool:
        if time.time() + cost[kind] <= deadline:
            return True
        results["skipped"].append(f"{what} (it would end after the --budget of {args.budget:.0f} s)")
        print(f"  skipped: {results['skipped'][-1]}", flush=True)
        return False

    results: dict = {"roi_ops": [], "model": [], "skipped": []}
    if not args.skip_roi_ops:
        print("RoI ops:", flush=True)
        results["roi_ops"] = roi_ops(device, args.repeats)

    work = Path(tempfile.mkdtemp(prefix="maskray-gpu-check-"))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        make_jpegs(work / "images", max(args.images, args.job_images), args.height, args.width)
        host_images = [decode_image(p.read_bytes()) for p in sorted((work / "images").glob("*.jpg"))[: args.images]]
        images = [image.to(device).contiguous() for image in host_images]
        if not args.skip_job:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, num_cpus=min(8, os.cpu_count() or 2), num_gpus=1 if device == "cuda" else 0)
        for arch in args.archs:
            state_dict = None if arch == "light" else reference_state_dict(arch)
            weights = work / f"{arch}.pt"
            if not args.skip_job:
                if state_dict is None:
                    build_model(arch, "fp32", "cpu", None).save(weights)
                else:
                    torch.save(state_dict, weights)  # a torchvision state dict file, as a user gives one
            for precision in args.precisions:
                model = build_model(arch, precision, device, state_dict)
                if arch != "light" and not results.get("auto_batch"):
                    results["auto_batch"] = choose_batch_size(torch.device(device), _input_pixels(model))
                for batch in args.batch_sizes:
                    if not in_time("loop", f"loop {arch} {precision} batch {batch}"):
                        continue
                    row = {"arch": arch, "precision": precision, "batch": batch}
                    begun = time.perf_counter()
                    loop = model_loop(model, images, batch, device, passes=2 if device == "cpu" else 1)
                    cost["loop"] = time.perf_counter() - begun
                    row.update({"loop_images_per_s": loop["images_per_s"], "loop_peak_bytes": loop["peak_bytes"],
                                "detections_per_image": loop["detections_per_image"]})
                    print(f"  {arch} {precision} batch {batch:>2}: loop {loop['images_per_s']:7.2f} images/s, "
                          f"peak {loop['peak_bytes'] / 2**20:7.0f} MiB, {loop['detections_per_image']:.0f} detections/image",
                          flush=True)
                    results["model"].append(row)
                del model
                if device == "cuda":
                    torch.cuda.empty_cache()
                if args.skip_job:
                    continue
                for batch in args.job_batch_sizes:
                    if not in_time("job", f"job {arch} {precision} batch {batch}"):
                        continue
                    begun = time.perf_counter()
                    job = job_run(weights, work / "images", work / "out", batch, precision, device, args.shard_size)
                    cost["job"] = time.perf_counter() - begun
                    row = next((r for r in results["model"] if (r["arch"], r["precision"], r["batch"]) == (arch, precision, batch)),
                               None)
                    if row is None:
                        row = {"arch": arch, "precision": precision, "batch": batch}
                        results["model"].append(row)
                    row.update({"job_images_per_s": job["images_per_s"], "job_peak_bytes": job["peak_bytes"],
                                "job_end_to_end_s": job["end_to_end_s"]})
                    ratio = job["images_per_s"] / row["loop_images_per_s"] if row.get("loop_images_per_s") else float("nan")
                    print(f"  {arch} {precision} batch {batch:>2}: job  {job['images_per_s']:7.2f} images/s steady "
                          f"({ratio:.2f} of the loop), device memory peak {job['peak_bytes'] / 2**20:7.0f} MiB, "
                          f"{job['end_to_end_s']:.1f} s end to end", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return results


# the report -------------------------------------------------------------------------------

def device_line(cpu_smoke: bool) -> str:
    import torch
    import torchvision

    if cpu_smoke:
        name = f"CPU smoke run ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs): not a GPU measurement"
    else:
        props = torch.cuda.get_device_properties(0)
        name = (f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"{os.cpu_count()} CPUs")
    return f"{name}; torch {torch.__version__}, torchvision {torchvision.__version__}, {time.strftime('%Y-%m-%d')}"


def report(header: str, steps: dict, results: dict, args: argparse.Namespace) -> str:
    """The Markdown that BENCHMARKS.md takes."""
    lines = [f"**Measured on {header}** (`make gpu-check`)", ""]
    for name in ("build", "tests"):
        if name in steps:
            lines.append(f"- {name}: {'ok' if steps[name]['ok'] else 'FAILED'}, {steps[name]['what']}")
    if results.get("auto_batch"):
        lines.append(f"- `--batch-size` left to the device chooses {results['auto_batch']} for the R50-FPN model at 800 px here")
    for skipped in results.get("skipped", []):
        lines.append(f"- skipped: {skipped}")
    if results.get("roi_ops"):
        lines += ["", "| case | out | layout | torchvision ms | maskray ms | ratio |", "| --- | --- | --- | ---: | ---: | ---: |"]
        for r in results["roi_ops"]:
            lines.append(f"| {r['case']} | {r['out']}×{r['out']} | {r['layout']} | {r['torchvision_ms']:.3f} | "
                         f"{r['maskray_ms']:.3f} | {r['ratio']:.2f}× |")
    if results.get("model"):
        size = f"{args.width}×{args.height}"
        at = "the light model" if args.archs == ["light"] else "R50-FPN at min_size 800"
        detections = [r["detections_per_image"] for r in results["model"] if "detections_per_image" in r]
        found = f"{statistics.mean(detections):.0f} detections per image" if detections else "detections not counted"
        title = (f"Mask R-CNN ({at}), JPEGs of {size}, {found}. Loop: {args.images} decoded images on the device → "
                 f"model → RLE. Job: a folder of {args.job_images} JPEGs → one actor → Parquet, shards of "
                 f"{args.shard_size}, steady state (from the actor ready, warmed up, to the last commit):")
        lines += ["", title, "",
                  "| model | precision | batch | loop images/s | loop peak MiB | job images/s | job / loop | job device peak MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["model"]:
            loop, job = r.get("loop_images_per_s"), r.get("job_images_per_s")
            cells = [r["arch"], r["precision"], str(r["batch"]),
                     f"{loop:.2f}" if loop else "—", f"{r['loop_peak_bytes'] / 2**20:.0f}" if loop else "—",
                     f"{job:.2f}" if job else "—", f"{job / loop:.2f}" if job and loop else "—",
                     f"{r['job_peak_bytes'] / 2**20:.0f}" if job else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        per_pixel = bytes_per_pixel(results["model"], args)
        if per_pixel:
            note = (f"Memory per image at inference: {per_pixel:.0f} bytes per input pixel (the loop's peaks, "
                    "largest batch against batch 1; `worker.GPU_BYTES_PER_PIXEL` estimates it)")
            lines += ["", note]
    return "\n".join(lines)


def bytes_per_pixel(rows: list[dict], args: argparse.Namespace) -> float | None:
    """The loop's peak memory growth per image per input pixel, over its batch sizes (the worst model and precision)."""
    worst = None
    pixels = args.height * args.width  # at min_size 800 the 1200x800 images keep their size
    for arch in {r["arch"] for r in rows}:
        for precision in {r["precision"] for r in rows}:
            peaks = sorted((r["batch"], r["loop_peak_bytes"]) for r in rows
                           if (r["arch"], r["precision"]) == (arch, precision) and r.get("loop_peak_bytes"))
            if len(peaks) >= 2 and peaks[-1][0] > peaks[0][0]:
                value = (peaks[-1][1] - peaks[0][1]) / (peaks[-1][0] - peaks[0][0]) / pixels
                worst = value if worst is None else max(worst, value)
    return worst


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["v1", "v2"], choices=["v1", "v2", "light"])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="of the model loop")
    parser.add_argument("--job-batch-sizes", type=int, nargs="+", default=[1, 4, 16],
                        help="of the job (each run starts an actor: about 10 s more a run)")
    parser.add_argument("--images", type=int, default=64, help="of the model loop")
    parser.add_argument("--job-images", type=int, default=128, help="of each job run")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per RoI op case (median)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for the whole check: a loop or job run that would end later is skipped, and said so")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-roi-ops", action="store_true")
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: the measuring code on the CPU, light model, fp32, 4 images of 240x320, batches 1 and 2")
    parser.add_argument("--measure-only", type=Path, default=None, help=argparse.SUPPRESS)  # the child: results to this file
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # the child: time.time() to end by
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.archs, args.precisions, args.batch_sizes, args.job_batch_sizes = ["light"], ["fp32"], [1, 2], [2]
        args.images, args.job_images, args.height, args.width, args.repeats, args.shard_size = 4, 8, 240, 320, 2, 4
        args.skip_build = args.skip_tests = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        return 2
    if args.measure_only is not None:
        args.measure_only.write_text(json.dumps(measure(args)))
        return 0

    started = time.perf_counter()
    deadline = time.time() + args.budget
    header = device_line(args.cpu_smoke)
    print(f"gpu-check on {header}", flush=True)
    python, steps = sys.executable, {}
    if not args.skip_build:
        print("build:", flush=True)
        steps["build"] = build(python)
        print(f"  {steps['build']['what']}", flush=True)
    if not args.skip_tests:
        print(f"tests: {' '.join(TEST_FILES)}", flush=True)
        steps["tests"] = run_tests(python)
        print(f"  {steps['tests']['what']} ({steps['tests']['seconds']:.0f} s)", flush=True)
    # The measurements in a fresh process: it loads the operators as built above.
    with tempfile.TemporaryDirectory(prefix="maskray-gpu-check-") as temp:
        out = Path(temp) / "results.json"
        child = [python, str(Path(__file__).resolve()), "--measure-only", str(out), "--deadline", str(deadline),
                 *(argv if argv is not None else sys.argv[1:])]
        measured = subprocess.run(child, cwd=ROOT, check=False)
        results = json.loads(out.read_text()) if out.exists() else {}
    steps["measurements"] = {"ok": measured.returncode == 0, "what": f"exit status {measured.returncode}"}
    print()
    print(report(header, steps, results, args))
    print(f"\ngpu-check took {time.perf_counter() - started:.0f} s")
    failed = [name for name, step in steps.items() if not step["ok"]]
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
