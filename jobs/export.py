"""``maskray export OUTPUT DEST --format coco|coco-results``: a finished segmentation output as
COCO JSON, a COCO instances file (for pycocotools, CVAT, FiftyOne) or the results list that
``COCO.loadRes`` takes. The ids and fields: ``maskray.pipeline.results.export``."""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.options import score

FORMATS = ("coco", "coco-results")  # maskray.pipeline.results.export's; repeated so that --help imports nothing heavy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a finished segmentation output (any fsspec URL)")
    parser.add_argument("dest", metavar="DEST", help="the JSON file to write (a new path, any fsspec URL)")
    parser.add_argument("--format", choices=FORMATS, default="coco",
                        help="coco: a COCO instances file (images, annotations, categories; default); "
                             "coco-results: the detections list that COCO.loadRes takes")
    parser.add_argument("--min-score", type=score, default=None,
                        help="only instances scoring at least this (default: all of them)")
    parser.add_argument("--where", default=None, metavar="SQL",
                        help="only instances for which this DuckDB condition over the instances columns holds, "
                             "e.g. \"label_name = 'person' AND area > 100\"")
    add_storage_options_argument(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from maskray.pipeline.results.export import export_output

    summary = export_output(args.output, args.dest, args.format, args.storage_options,
                            min_score=args.min_score, where=args.where)
    print(summary.describe())
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["export", *sys.argv[1:]]))
