"""The ``maskray`` command: one subcommand per job.

Each subcommand lives in a module of jobs/ with ``add_arguments(parser)`` and ``run(args)``;
those modules import torch and the rest inside ``run``, so that ``maskray --help`` and argument
errors come back at once.
"""

import argparse
import importlib
import sys

# name -> (module in jobs/, one-line help). Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("maskray.jobs.demo", "the main job on sample images: segment, query, draw (what `make demo` runs)"),
    "segment": ("maskray.jobs.segment", "segment the images of a bucket or folder into Parquet (resumable)"),
    "train": ("maskray.jobs.train", "train Mask R-CNN on COCO-format data with Ray Train (checkpoints, resume, metrics)"),
    "evaluate": ("maskray.jobs.evaluate", "COCO bbox and segm AP of a model on a COCO-format set; COCO results JSON"),
    "make-shapes": ("maskray.jobs.make_shapes", "write a synthetic COCO instance-segmentation set of overlapping shapes"),
    "query": ("maskray.jobs.query", "run SQL (DuckDB) over a segmentation output: views instances, images"),
    "show": ("maskray.jobs.show", "draw an image's masks, boxes, labels and scores into a PNG"),
    "selfcheck": ("maskray.jobs.selfcheck", "check the compiled RoI operators against torchvision"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskray",
        description="Instance segmentation (Mask R-CNN) of image buckets on Ray, written to Parquet.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
