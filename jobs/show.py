"""``maskray show OUTPUT IMAGE -o overlay.png``: an image of a job's output with its masks,
boxes, labels and scores drawn (as Detectron2's Visualizer draws them). IMAGE is the
image_uri as stored, or a path or file name that ends exactly one of them.

The picture's size: ``--scale`` first (default: small images enlarged a whole number of times
so that the shorter side comes near 512 px, others kept at full size), then ``--max-size``
shrinks it, if need be, so that its longest side fits. Text and line widths follow the
picture's size, so a fitted picture stays as readable as a full-size one.
"""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.options import positive_float, positive_int, score

DEFAULT_MIN_SCORE = 0.5  # maskray.pipeline.results.show's; repeated here so that --help imports nothing heavy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a segmentation output (any fsspec URL)")
    parser.add_argument("image", metavar="IMAGE_URI",
                        help="the image: its image_uri, or a unique path suffix or file name")
    parser.add_argument("-o", "--out", default="overlay.png", help="where to write the PNG (default overlay.png)")
    parser.add_argument("--min-score", type=score, default=DEFAULT_MIN_SCORE,
                        help=f"draw only instances scoring at least this (default {DEFAULT_MIN_SCORE})")
    parser.add_argument("--scale", type=positive_float, default=None, metavar="FACTOR",
                        help="resize the picture by this factor, e.g. 0.25 or 3 (default: small images are "
                             "enlarged a whole number of times, so that the shorter side comes near 512 px and "
                             "the longer stays within 2048 px; larger images keep their size)")
    parser.add_argument("--max-size", type=positive_int, default=None, metavar="PIXELS",
                        help="then shrink the picture, if need be, so that its longest side is at most this "
                             "many pixels, e.g. 1920 to fit a screen (default: no limit)")
    add_storage_options_argument(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from maskray.pipeline.results.query import output_progress
    from maskray.pipeline.results.show import render_overlay

    progress = output_progress(args.output, args.storage_options)  # no output there: one line, before any reading
    try:
        picture, count = render_overlay(args.output, args.image, args.storage_options, args.min_score,
                                        scale=args.scale, max_size=args.max_size)
    except LookupError as error:  # no such IMAGE_URI in the output, or several: the user's to fix
        message = error.args[0] if error.args else "no such image"
        if not progress.finished:  # the image may be in a shard not yet committed
            message += f" ({progress.describe()})"
        raise ValueError(message) from None
    picture.save(args.out)
    print(f"{args.out}: {count} instances drawn on {args.image} (a {picture.width}x{picture.height} picture)")
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["show", *sys.argv[1:]]))
