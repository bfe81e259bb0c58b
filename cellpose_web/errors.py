"""The one exception type for user errors (bad file, bad parameter).

It subclasses ValueError so code written for Cellpose that catches ValueError keeps working.
The message is meant for a biologist: say what was wrong and what to do.
"""


class CellposeWebError(ValueError):
    """A problem with the user's input, with a message that says what to do."""


class ModelNotAvailableError(CellposeWebError, FileNotFoundError):
    """A model name or file could not be resolved to weights on this machine."""
