"""How the settings' fields are given as text (on the command line): the parsers of their
values and the help they share. Each parser's error reads like argparse's own, never a traceback.

The settings dataclasses (``maskray.pipeline.segment.settings``, ``maskray.pipeline.train.settings``)
name these in their fields' metadata for values that are not plain numbers (JSON, KEY=VALUE);
``maskray.jobs.arguments`` turns the fields into options. Their numbers are parsed as plain int
or float and their ranges checked by the dataclasses themselves, in one place. ``positive_int``
is for the small commands whose options are not a dataclass (demo, evaluate, show).
This module imports nothing heavy, so that ``--help`` comes back at once.
"""

import argparse
import json

STORAGE_OPTIONS_HELP = ('fsspec storage options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\' '
                        "(never written to the output or the logs; credentials are better left to the environment)")


def storage_options(text: str) -> dict:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        # The text may hold credentials: say where it breaks, never echo it.
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
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
