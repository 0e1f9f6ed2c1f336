"""Which thread builds the model and which one calls it: libgomp's thread teams, measured.

torch on Linux runs its parallel regions on libgomp (GNU OpenMP), which keeps a team of threads
for every thread of the process that ever ran a parallel region, and counts them all. Once that
count exceeds the CPUs, libgomp's threads stop spinning between regions (its "throttled" spin)
and go to sleep at once, so that every region then waits for its threads to be woken. A model
built on one thread (loading weights and folding BatchNorm run parallel regions) and called on
another, as the segmentation actor did, therefore runs slower than either thread alone would.

Three layouts of the same bare loop over the same decoded images, each in a fresh process at
Ray's worker niceness (libgomp's teams live as long as the process), alternating ``--rounds``
times so that a shared machine's drift hits all of them alike:

- ``one thread``: built and called on the main thread (bench/pipeline.py's bare loop);
- ``built on main, called on another``: the actor's layout before this benchmark;
- ``built and called on another``: the actor's layout now (maskray.pipeline.segment.worker).

    python bench/torch_threads.py                       # the demo model, 128 images of 480x320, batch 2
    python bench/torch_threads.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline import default_weights, figure_of_child, loop_pace, write_images

LAYOUTS = ("one thread", "built on main, called on another", "built and called on another")


def child(layout: str, weights: str, folder: str, batch_size: int, threads: int) -> float:
    """images/s of the bare loop in ``layout`` (bench.pipeline.loop_pace)."""
    from maskray.pipeline.decode import decode_image
    from maskray.pipeline.segment.settings import SegmentJob
    from maskray.pipeline.weights import build_model, read_weights

    torch.set_num_threads(threads)
    images = [decode_image(p.read_bytes()) for p in sorted(Path(folder).glob("*.jpg"))]
    overrides = SegmentJob(folder, folder + "-unused", weights).overrides()  # the job's --precision auto
    built: list = []

    def build() -> None:
        built.append(build_model(read_weights(weights), overrides))

    def run(result: list) -> None:
        torch.set_num_threads(threads)  # as the worker's inference thread does
        if not built:
            build()
        result.append(loop_pace(built[0], images, batch_size))

    result: list = []
    if layout == "one thread":
        run(result)
        return result[0]
    if layout == "built on main, called on another":
        build()
    thread = threading.Thread(target=run, args=(result,))
    thread.start()
    thread.join()
    return result[0]


def measure(layout: str, weights: Path, folder: Path, batch_size: int, threads: int) -> float:
    """``child`` in a fresh process (libgomp's teams live as long as the process)."""
    return figure_of_child([__file__, "--child", json.dumps([layout, str(weights), str(folder), batch_size, threads])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(*json.loads(args.child)))
        return

    with tempfile.TemporaryDirectory(prefix="maskray-bench-threads-") as work:
        folder = Path(work) / "images"
        write_images(folder, args.images, args.height, args.width)
        weights = args.weights or default_weights(Path(work))
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{args.threads} threads, weights {weights.name}, {args.images} images of {args.width}x{args.height}, "
              f"batch {args.batch_size}")
        paces: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for n in range(args.rounds):
            for layout in LAYOUTS:
                paces[layout].append(measure(layout, weights, folder, args.batch_size, args.threads))
            print(f"round {n + 1}: " + "; ".join(f"{layout} {paces[layout][-1]:.2f}" for layout in LAYOUTS), flush=True)
    base = statistics.median(paces[LAYOUTS[0]])
    for layout in LAYOUTS:
        ratios = [pace / one for pace, one in zip(paces[layout], paces[LAYOUTS[0]])]
        print(f"{layout + ':':<36} median {statistics.median(paces[layout]):6.2f} images/s, "
              f"ratio to one thread per round {', '.join(f'{r:.3f}' for r in ratios)} (median pace {base:.2f})")


if __name__ == "__main__":
    main()
