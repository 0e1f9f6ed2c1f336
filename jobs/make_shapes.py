"""``maskray make-shapes OUT``: a synthetic instance-segmentation set (see pipeline/train/shapes.py).

Writes ``OUT/images/*.png`` and ``OUT/annotations.json`` (COCO instances with exact RLE masks)
of overlapping circles, squares, triangles, stars and hexagons on textured backgrounds. The
same seed gives the same images; another seed gives a held-out set.
"""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument
from maskray.jobs.cli import reports_user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder or fsspec URL to write images/ and annotations.json to")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0); image i depends only on (seed, i)")
    parser.add_argument("--size", default="160x128", help="image size WIDTHxHEIGHT (default 160x128)")
    add_storage_options_argument(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from maskray.pipeline.storage import public_url
    from maskray.pipeline.train.shapes import parse_size, write_shapes

    summary = write_shapes(args.out, args.count, args.seed, parse_size(args.size), args.storage_options,
                           progress=True)
    print(f"maskray make-shapes: {summary['images']} images, {summary['instances']} instances -> "
          f"{public_url(args.out)} (annotations.json, images/)")
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["make-shapes", *sys.argv[1:]]))
