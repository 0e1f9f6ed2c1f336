"""The ``maskray`` command: one subcommand per job.

Each subcommand lives in a module of jobs/ with ``add_arguments(parser)`` and ``run(args)``;
those modules import torch and the rest inside ``run``, so that ``maskray --help`` and argument
errors come back at once.

User errors are caught in one place, ``reports_user_errors`` below, which every command's
``run`` is wrapped in (so that a script or test calling ``run`` itself gets the same exit status):
a ``MaskrayError`` (storage refused, a job that cannot run, bad training data), a ``ValueError``
(a bad value, a wrong weights file) or an ``OSError`` (a missing file) is printed as
``maskray COMMAND: error: MESSAGE`` on one line, credentials redacted, with exit status 2.
Anything else is a bug and keeps its traceback.
"""

import argparse
import functools
import importlib
import sys

from maskray.pipeline.errors import MaskrayError

# name -> (module in jobs/, one-line help). Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("maskray.jobs.demo", "the main job on sample images: segment, query, draw (what `make demo` runs)"),
    "segment": ("maskray.jobs.segment", "segment the images of a bucket or folder into Parquet (resumable)"),
    "train": ("maskray.jobs.train",
              "train Mask R-CNN on COCO-format data with Ray Train (checkpoints, resume, metrics)"),
    "evaluate": ("maskray.jobs.evaluate", "COCO bbox and segm AP of a model on a COCO-format set; COCO results JSON"),
    "make-shapes": ("maskray.jobs.make_shapes",
                    "write a synthetic COCO instance-segmentation set of overlapping shapes"),
    "query": ("maskray.jobs.query", "run SQL (DuckDB) over a segmentation output: views instances, images"),
    "show": ("maskray.jobs.show", "draw an image's masks, boxes, labels and scores into a PNG"),
    "selfcheck": ("maskray.jobs.selfcheck", "check the compiled RoI operators against torchvision"),
}

# What the user got wrong, or storage refused: said in one line, exit status 2.
USER_ERRORS = (MaskrayError, ValueError, OSError)
USER_ERROR_STATUS = 2


def reports_user_errors(run):
    """``run(args)`` of a command, with its user errors printed as one line and exit status 2."""

    @functools.wraps(run)
    def run_reporting_user_errors(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except USER_ERRORS as error:
            command = getattr(args, "command", None) or _command_of(run.__module__)
            print(error_line(command, error, getattr(args, "storage_options", None)), file=sys.stderr)
            return USER_ERROR_STATUS

    return run_reporting_user_errors


def error_line(command: str, error: BaseException, storage_options: dict | None = None) -> str:
    """``maskray COMMAND: error: MESSAGE`` on one line, without the credentials of ``storage_options``
    or the environment."""
    from maskray.pipeline.storage import redact, secret_values

    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return redact(f"maskray {command}: error: {message}", secret_values(storage_options))


def _command_of(module_name: str) -> str:
    return next((name for name, (module, _) in SUBCOMMANDS.items() if module == module_name),
                module_name.rsplit(".", 1)[-1])


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
