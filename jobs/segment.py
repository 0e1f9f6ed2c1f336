"""``maskray segment INPUT OUTPUT --weights CKPT``: instance segmentation of a bucket into Parquet.

Also a script for clusters: ``ray job submit --working-dir . -- python jobs/segment.py INPUT
OUTPUT --weights CKPT`` (the job joins the cluster through RAY_ADDRESS). A rerun of the same
command resumes: finished shards are skipped.
"""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument, fraction, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="images: a prefix, a glob, or a .txt/.parquet file listing them (any fsspec URL)")
    parser.add_argument("output", metavar="OUTPUT", help="where the Parquet output goes (any fsspec URL); rerun to resume")
    parser.add_argument("--weights", required=True, metavar="CKPT", help="a maskray checkpoint or a torchvision Mask R-CNN state dict")
    add_storage_options_argument(parser)
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="images per model call (default 2)")
    parser.add_argument("--shard-size", type=positive_int, default=64, help="images per shard, the unit of work and resume (default 64)")
    parser.add_argument("--num-actors", type=positive_int, default=None, help="model actors (default: one per GPU, else as CPUs allow)")
    parser.add_argument("--cpus-per-actor", type=positive_int, default=None, help="CPUs (torch threads) per actor without GPUs (default 2)")
    parser.add_argument("--score-threshold", type=fraction, default=None, help="keep detections scoring at least this (default: the model's)")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="refuse images larger than this many pixels, against decompression bombs (default 200,000,000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from maskray.pipeline.decode import DEFAULT_MAX_PIXELS
    from maskray.pipeline.errors import JobError
    from maskray.pipeline.segment.job import run_segment
    from maskray.pipeline.segment.settings import SegmentJob
    from maskray.pipeline.storage import StorageError

    job = SegmentJob(
        input=args.input,
        output=args.output,
        weights=args.weights,
        storage_options=args.storage_options,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        score_threshold=args.score_threshold,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        address=args.address,
        progress=not args.no_progress,
    )
    try:
        summary = run_segment(job)
    except (JobError, StorageError, FileNotFoundError, ValueError) as error:
        print(f"maskray segment: error: {error}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0 if summary.complete else 1


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["segment", *sys.argv[1:]]))
