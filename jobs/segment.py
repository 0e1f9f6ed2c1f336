"""``maskray segment INPUT OUTPUT --weights CKPT``: instance segmentation of a bucket into Parquet.

Also a script for clusters: ``ray job submit --working-dir . -- python -m maskray.jobs.segment INPUT
OUTPUT --weights CKPT`` (the job joins the cluster through RAY_ADDRESS). A rerun of the same
command resumes: finished shards are skipped. ``--update`` lists INPUT again and adds its new
images as new shards (a bucket that grows: run it again with ``--update``, e.g. every night);
a rerun without it says how many new images it leaves out. The options are the fields of
``SegmentJob``.
"""

import argparse
import sys

from maskray.jobs.arguments import add_dataclass_arguments, dataclass_from_namespace
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.segment.settings import SegmentJob


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, SegmentJob)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    job = dataclass_from_namespace(SegmentJob, args)  # a bad value fails here, before Ray or torch start

    from maskray.pipeline.segment.job import run_segment

    summary = run_segment(job)
    print(summary.describe())
    return 0 if summary.complete else 1


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["segment", *sys.argv[1:]]))
