"""``maskray show OUTPUT IMAGE -o overlay.png``: an image of a job's output with its masks,
boxes, labels and scores drawn. IMAGE is the image_uri as stored, or a path or file name that
ends exactly one of them."""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.options import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a segmentation output (any fsspec URL)")
    parser.add_argument("image", metavar="IMAGE_URI",
                        help="the image: its image_uri, or a unique path suffix or file name")
    parser.add_argument("-o", "--out", default="overlay.png", help="where to write the PNG (default overlay.png)")
    parser.add_argument("--min-score", type=float, default=0.0, help="draw only instances scoring at least this")
    parser.add_argument("--scale", type=positive_int, default=None,
                        help="enlarge the picture this many times (default: small images to about 512 px, others 1)")
    add_storage_options_argument(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from maskray.pipeline.results.show import auto_scale, find_image_uri, render_overlay

    try:
        scale = args.scale
        if scale is None:
            row = find_image_uri(args.output, args.image, args.storage_options)
            scale = auto_scale(row["height"] or 512, row["width"] or 512)
        picture, count = render_overlay(args.output, args.image, args.storage_options, args.min_score, scale=scale)
    except LookupError as error:  # no such IMAGE_URI in the output, or several: the user's to fix
        raise ValueError(error.args[0] if error.args else "no such image") from None
    picture.save(args.out)
    print(f"{args.out}: {count} instances drawn on {args.image} ({picture.width}x{picture.height})")
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["show", *sys.argv[1:]]))
