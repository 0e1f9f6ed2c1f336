"""The jobs' arguments: the options of a settings dataclass, and the argument types they use.

A settings dataclass (``SegmentJob``, ``TrainSettings``) is the one statement of a command's
options: each field's metadata says how it is given on the command line, and
``add_dataclass_arguments`` turns the fields into argparse options, ``dataclass_from_namespace``
the parsed arguments back into the dataclass (whose own checks then run). Field metadata:

- ``help`` (required): the option's help; ``%(default)s`` shows the field's default.
- ``type``: what parses the text (default: the field's type, ``int``, ``float`` or ``str``); an
  option parsed by ``storage_options`` defaults to the environment's MASKRAY_STORAGE_OPTIONS. A
  number's range is never checked here but by the dataclass (``validate`` or ``__post_init__``),
  so that the command line and the Python API refuse the same values with the same message.
- ``choices``, ``metavar``, ``nargs``, ``action``: as in ``add_argument``.
- ``flag``: the option's name when it is not ``--field-name`` (``--no-amp``, ``--model-option``).
- ``dest``: the namespace attribute when it is not the field's name.
- ``positional``: a positional argument (``INPUT``) instead of an option.
- ``group``: the title of the section of ``--help`` it is listed in.

A field without a default is a required option (or positional argument); a bool field is a
switch: ``--field`` when it defaults to False, ``--no-field`` when it defaults to True.

The parsers of the fields' values live in ``maskray.pipeline.options``; this module imports
nothing heavy either.
"""

import argparse
import dataclasses
import types
import typing
from typing import Any

from maskray.pipeline.options import (
    STORAGE_OPTIONS_HELP,
    command_line_default,
    storage_options,
    storage_options_default,
)


def add_storage_options_argument(parser: argparse.ArgumentParser) -> None:
    """``--storage-options JSON|@FILE``, by default the environment's MASKRAY_STORAGE_OPTIONS."""
    parser.add_argument("--storage-options", type=storage_options, default=storage_options_default(),
                        metavar="JSON|@FILE", help=STORAGE_OPTIONS_HELP)


def add_dataclass_arguments(parser: argparse.ArgumentParser, settings_class: type) -> dict[str, Any]:
    """Adds an argument per field of ``settings_class`` (see the module's docstring); returns the
    help sections made ({title: group}), for the caller's own arguments."""
    annotations = typing.get_type_hints(settings_class)
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(settings_class):
        spec = dict(field.metadata)
        if "help" not in spec:
            raise TypeError(f"{settings_class.__name__}.{field.name} has no help: every field is an option")
        title = spec.pop("group", None)
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = parser if title is None else groups[title]
        kind = _plain_type(annotations[field.name])
        default = _default_of(field)
        if spec.pop("positional", False):
            target.add_argument(field.name, type=spec.pop("type", kind), **spec)
            continue
        dashed = field.name.replace("_", "-")
        if kind is bool and "action" not in spec:
            spec["action"] = "store_false" if default else "store_true"
            dashed = "no-" + dashed if default else dashed
        if spec.get("action") not in ("store_true", "store_false") and "type" not in spec:
            if kind not in (int, float, str):
                raise TypeError(f"{settings_class.__name__}.{field.name}: say in its metadata what parses a {kind}")
            spec["type"] = kind
        if default is dataclasses.MISSING:
            spec["required"] = True
        else:  # a value from the environment for some (storage options): maskray.pipeline.options
            spec["default"] = command_line_default(spec.get("type"), default)
        flag = spec.pop("flag", "--" + dashed)
        target.add_argument(flag, dest=spec.pop("dest", field.name), **spec)
    return groups


def dataclass_from_namespace(settings_class: type, namespace: argparse.Namespace):
    """The ``settings_class`` that ``namespace`` (parsed after ``add_dataclass_arguments``) gives,
    checked by its ``validate()`` if it has one (``__post_init__`` checks the others): ValueError."""
    settings = settings_class(**{f.name: getattr(namespace, f.metadata.get("dest", f.name))
                                 for f in dataclasses.fields(settings_class)})
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def _default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _plain_type(annotation: Any) -> Any:
    """``int`` for ``int`` and ``int | None``; the annotation itself for anything else."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation
