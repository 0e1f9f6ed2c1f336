"""The errors that mean "the user asked for something that cannot be done", or storage refused it.

Every command catches ``MaskrayError`` (and ValueError, OSError) in one place
(``maskray.jobs.cli.reports_user_errors``) and prints its message as one line, without a
traceback, with exit status 2; anything else is a bug and keeps its traceback.
"""


class MaskrayError(RuntimeError):
    """Base of what a user did wrong or what storage refused; the message says what and where."""


class StorageError(MaskrayError):
    """Storage that cannot be used as asked: a missing bucket, a wrong endpoint, refused credentials."""


class OutputError(MaskrayError):
    """An output that is not maskray's to write into: a folder or prefix holding other files, or a file."""


class JobError(MaskrayError):
    """The segmentation job cannot run as asked (the message says why); nothing was processed."""


class TrainingError(MaskrayError):
    """The training run cannot start or go on as asked; the message says why."""


class StorageWriteError(StorageError):
    """A write that kept failing for reasons that may pass (throttling, 5xx, dropped
    connections): nothing was committed, and a retry or a rerun writes it again."""


class QueryError(MaskrayError):
    """The SQL of ``maskray query`` cannot run: its own mistake, or an output DuckDB cannot read."""


class Interrupted(MaskrayError):
    """Ctrl-C: the command stopped cleanly; the message says what is kept and how to go on."""
