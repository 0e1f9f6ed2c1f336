"""The ``maskray`` command: one subcommand per job.

Each subcommand lives in a module of jobs/ with ``add_arguments(parser)`` and ``run(args)``;
those modules import torch and the rest inside ``run``, so that ``maskray --help`` and argument
errors come back at once.

User errors are caught in one place, ``reports_user_errors`` below, which every command's
``run`` is wrapped in (so that a script or test calling ``run`` itself gets the same exit status):
a ``MaskrayError`` (storage refused, a job that cannot run, bad training data), a ``ValueError``
(a bad value, a wrong weights file) or an ``OSError`` (a missing file) is printed as
``maskray COMMAND: error: MESSAGE`` on one line, credentials redacted, with exit status 2.
Ctrl-C is one line too (``maskray COMMAND: interrupted: ...``, what is kept and how to go on),
with exit status 130, the shell's for SIGINT. ``--debug`` (or MASKRAY_DEBUG=1) lets the error
through with its traceback. Anything else is a bug and keeps its traceback.
"""

import argparse
import functools
import importlib
import os
import re
import sys

from maskray.pipeline.errors import Interrupted, MaskrayError

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
    "browse": ("maskray.jobs.browse", "serve a web gallery of a segmentation output on 127.0.0.1 (filters, masks)"),
    "export": ("maskray.jobs.export", "write a segmentation output as COCO JSON (instances file or results list)"),
    "selfcheck": ("maskray.jobs.selfcheck", "check the compiled RoI operators against torchvision"),
    "cluster": ("maskray.jobs.cluster", "start or stop a Ray cluster on 127.0.0.1 for `ray job submit` (token auth)"),
}

# What the user got wrong, or storage refused: said in one line, exit status 2.
USER_ERRORS = (MaskrayError, ValueError, OSError)
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
DEBUG_VARIABLE = "MASKRAY_DEBUG"


def reports_user_errors(run):
    """``run(args)`` of a command, with its user errors printed as one line and exit status 2,
    and Ctrl-C as one line and exit status 130; with ``args.debug``, both raised as they are."""

    @functools.wraps(run)
    def run_reporting_user_errors(args: argparse.Namespace) -> int:
        command = getattr(args, "command", None) or _command_of(run.__module__)
        try:
            return run(args)
        except (*USER_ERRORS, KeyboardInterrupt) as error:
            if getattr(args, "debug", False) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
                raise
            interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
            kind = "interrupted" if interrupted else "error"
            print(error_line(command, error, getattr(args, "storage_options", None), kind), file=sys.stderr)
            return INTERRUPTED_STATUS if interrupted else USER_ERROR_STATUS

    return run_reporting_user_errors


def error_line(command: str, error: BaseException, storage_options: dict | None = None, kind: str = "error") -> str:
    """``maskray COMMAND: error: MESSAGE`` on one line, without the credentials of ``storage_options``
    or the environment, nor a terminal's colour codes."""
    from maskray.pipeline.storage import redact, secret_values

    text = _TERMINAL_CODES.sub("", str(error))
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not message:
        message = "stopped by Ctrl-C" if isinstance(error, KeyboardInterrupt) else type(error).__name__
    return redact(f"maskray {command}: {kind}: {message}", secret_values(storage_options))


# ANSI escape sequences (colours, cursor moves) that some libraries put in their messages.
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _command_of(module_name: str) -> str:
    return next((name for name, (module, _) in SUBCOMMANDS.items() if module == module_name),
                module_name.rsplit(".", 1)[-1])


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake in the arguments said in one line (and where the usage is), not
    the usage block and then the line: one line for every mistake, as for the rest."""

    def error(self, message: str):
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="maskray",
        description="Instance segmentation (Mask R-CNN) of image buckets on Ray, written to Parquet.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
        sub.add_argument("--debug", action="store_true",
                         help=f"let an error through with its traceback (also {DEBUG_VARIABLE}=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
