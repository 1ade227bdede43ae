"""User-facing errors.

Everything a user can get wrong (paths, data, config values, checkpoints) raises a
subclass of :class:`FewshotError`. The CLI prints such errors as one line and exits
non-zero; anything else is a bug and keeps its traceback.
"""


class FewshotError(ValueError):
    """A problem with the user's input, reported as one line by the CLI."""


class DataError(FewshotError):
    """Missing, empty or unreadable data, or a request the data cannot satisfy."""


class ConfigError(FewshotError):
    """An unknown key, a wrong type or an out-of-range value in a recipe or override."""


class CheckpointError(FewshotError):
    """A file that is not a fewshot checkpoint, or one that does not match the run."""


class TrainingDiverged(FewshotError):
    """The loss, a gradient or a parameter became NaN or infinite; the last good checkpoint is kept."""


class EncoderMismatch(ConfigError):
    """An adaptation method that does not fit this encoder (prompts on a CNN, ``partial`` on an unknown
    architecture, no module for the method's targets); a benchmark lists such a row as n/a."""
