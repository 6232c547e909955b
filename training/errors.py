"""Errors of the training module. Each is reported as one line by the CLI, before or instead of training."""

from loraplex.errors import LoraplexError


class TrainingError(LoraplexError):
    """Training cannot start or go on (bad config, a resume with nothing to resume from)."""


class DataError(TrainingError):
    """The data file is missing, empty or malformed; the message names the line where it can."""


class CheckpointDamaged(TrainingError):
    """A checkpoint is not as it was written (cut short, emptied, edited, or never finished)."""
