"""The errors that mean "the user asked for something that cannot be done", or storage refused it.

Every command catches ``MaskrayError`` in one place (``maskray.jobs.cli``) and prints its message
as one line, without a traceback; anything else is a bug and keeps its traceback.
"""


class MaskrayError(RuntimeError):
    """Base of what a user did wrong or what storage refused; the message says what and where."""


class StorageError(MaskrayError):
    """Storage that cannot be used as asked: a missing bucket, a wrong endpoint, refused credentials."""


class JobError(MaskrayError):
    """The segmentation job cannot run as asked (the message says why); nothing was processed."""


class TrainingError(MaskrayError):
    """The training run cannot start or go on as asked; the message says why."""
