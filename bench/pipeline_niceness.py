"""Does Ray's scheduling priority cost the pipeline? An A/B within one run.

Ray runs its daemons (GCS, raylet, agents) and the driver at niceness 0 and its workers, the
segmentation actor among them, at 15: every wake-up of a daemon or of the driver preempts one of
the model's two threads on a 2-core machine. This alternates pipeline runs as Ray starts them (A)
with runs where the daemons and the driver are put at the actor's niceness for the run (B),
ABBA-ordered, each run against the mean of the bare loops just before and after it, as
bench/pipeline.py measures. Linux only, and run as root (B's niceness is set back to 0 after each
run, which only root may do).

    python bench/pipeline_niceness.py --pairs 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import pipeline as pipeline_bench  # its images, bare loop and run

DAEMONS = (b"raylet", b"gcs_server", b"log_monitor", b"dashboard/agent", b"runtime_env/agent", b"monitor.py")


def daemon_pids() -> list[int]:
    """Ray's own processes on this machine (not its workers)."""
    return pipeline_bench.pids_whose_command(lambda command: any(name in command for name in DAEMONS)
                                             and b"default_worker" not in command)


def set_niceness(pids: list[int], niceness: int) -> None:
    """Every thread of ``pids`` at ``niceness`` (Linux keeps niceness per thread)."""
    for pid in pids:
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for thread in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, thread, niceness)
            except OSError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="A and B runs each")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("pipeline_niceness: run as root (B's niceness is set back after each run)")

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    work = Path(tempfile.mkdtemp(prefix="maskray-bench-niceness-"))
    try:
        weights = pipeline_bench.default_weights(work)
        pipeline_bench.write_images(work / "images", args.images, 320, 480)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                 logging_level="WARNING", log_to_driver=False)
        loops = [pipeline_bench.loop_in_child(weights, work / "images", 2, 2)]
        ratios: dict[str, list[float]] = {"A": [], "B": []}
        for n in range(2 * args.pairs):
            arm = "ABBA"[n % 4]
            set_niceness(daemon_pids() + [os.getpid()], pipeline_bench.RAY_WORKER_NICENESS if arm == "B" else 0)
            summary, _ = pipeline_bench.pipeline_run(weights, work / "images", work / f"out-{n}", 2, 2, 16, sample_memory=False)
            set_niceness(daemon_pids() + [os.getpid()], 0)  # the loop child takes its niceness from here
            loops.append(pipeline_bench.loop_in_child(weights, work / "images", 2, 2))
            steady = summary.images_run / summary.processing_seconds
            ratios[arm].append(steady / ((loops[-2] + loops[-1]) / 2))
            print(f"run {n + 1} ({arm}): steady {steady:.2f} images/s, loops {loops[-2]:.2f} {loops[-1]:.2f}, "
                  f"ratio {ratios[arm][-1]:.3f}", flush=True)
        for arm, label in (("A", "as Ray starts them"), ("B", "daemons and driver at the actor's niceness")):
            print(f"{arm}, {label}: {', '.join(f'{r:.3f}' for r in ratios[arm])}; median {statistics.median(ratios[arm]):.3f}")
        print(f"load average: {', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
