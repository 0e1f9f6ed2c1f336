"""How the settings' fields are given as text (on the command line): the parsers of their
values and the help they share. Each parser's error reads like argparse's own, never a traceback.

The settings dataclasses (``maskray.pipeline.segment.settings``, ``maskray.pipeline.train.settings``)
name these in their fields' metadata for values that are not plain numbers (JSON, KEY=VALUE);
``maskray.jobs.arguments`` turns the fields into options. Their numbers are parsed as plain int
or float and their ranges checked by the dataclasses themselves, in one place. ``positive_int``
and ``positive_float`` are for the small commands whose options are not a dataclass (demo, evaluate, show).
This module imports nothing heavy, so that ``--help`` comes back at once.
"""

import argparse
import json
import os
from pathlib import Path

# Where the storage options come from when --storage-options is not given: JSON, or @FILE.
STORAGE_OPTIONS_VARIABLE = "MASKRAY_STORAGE_OPTIONS"

STORAGE_OPTIONS_HELP = (
    "fsspec storage options (endpoint, credentials, anon): JSON, e.g. '{\"anon\": true}', or @FILE, a JSON file "
    f"(relative to the working directory); default: the environment's {STORAGE_OPTIONS_VARIABLE} (JSON or @FILE), "
    "else none. Never written to the output or maskray's logs. Inline JSON is on the command line (ps, shell "
    f"history, and Ray's job table under ray job submit): give credentials by @FILE or {STORAGE_OPTIONS_VARIABLE}")


# --precision of segment, evaluate and train: maskray.model.precision.PRECISIONS, here without torch.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str) -> str:
    """``precision`` when it is one of PRECISIONS; else ValueError, in the one wording every command gives."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


PRECISION_HELP = ("what the model computes in: auto (default) is bf16 on CPUs that have it natively (AVX512-BF16, "
                  "AMX), fp16 on GPUs, fp32 elsewhere")


class _FromEnvironment(str):
    """The text of the variable above, as the option's default (argparse parses a str default with
    the option's type, and reports its errors as the option's): marked so that errors name it."""


def storage_options(text: str) -> dict:
    """Storage options from their text: a JSON object, or ``@FILE`` (a file holding one). The
    text may hold credentials: no error echoes it or the file's content, only where it breaks."""
    source = f"{STORAGE_OPTIONS_VARIABLE}: " if isinstance(text, _FromEnvironment) else ""
    if text.startswith("@"):
        path = text[1:]
        if not path.strip():
            raise argparse.ArgumentTypeError(f"{source}@ must be followed by a file name, e.g. @options.json")
        source = f"{path} (from {STORAGE_OPTIONS_VARIABLE}): " if source else f"{path}: "
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise argparse.ArgumentTypeError(f"{source}not UTF-8 text") from None
        except (OSError, ValueError) as error:  # ValueError: a NUL in the name
            reason = getattr(error, "strerror", None) or "cannot be read"
            raise argparse.ArgumentTypeError(f"{source}{reason[0].lower()}{reason[1:]}") from None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}" if "\n" in text.strip() else f"character {error.pos}"
        raise argparse.ArgumentTypeError(f"{source}not valid JSON ({error.msg} at {where})") from None
    except (ValueError, RecursionError):  # nested too deep, numbers too long
        raise argparse.ArgumentTypeError(f"{source}not valid JSON") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{source}must be a JSON object, e.g. '{{\"anon\": true}}'")
    return options


def storage_options_default() -> dict | str:
    """The default of a --storage-options option: the environment's MASKRAY_STORAGE_OPTIONS when
    set, parsed by argparse (only if the option is not given, with its errors), else none."""
    text = os.environ.get(STORAGE_OPTIONS_VARIABLE, "")
    return _FromEnvironment(text) if text.strip() else {}


def command_line_default(parse, default):
    """The argparse default of an option whose values ``parse`` reads: for storage options, the
    environment's (``storage_options_default``); for any other, ``default`` itself."""
    return storage_options_default() if parse is storage_options else default


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """A number above zero, said like argparse's own errors when it is not."""
    value = _number(text)
    if not value > 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def score(text: str) -> float:
    """A detection score: a number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a score in [0, 1], got {text}")
    return value


def json_key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (a plain string if it is not JSON; a list becomes a tuple)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a plain string: roi_pool, resnet34, ...
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key.strip(), parsed


class GatherPairs(argparse.Action):
    """A repeatable option whose (key, value) pairs (from its ``type``) gather into one dict; a later key wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, value = values
        # A new dict each time: the default one is shared by every parse.
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), key: value})
