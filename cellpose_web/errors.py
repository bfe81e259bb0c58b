"""The exceptions cellpose-web raises for a person to read.

- :class:`CellposeWebError`: the base; a problem with the user's input (bad file, bad parameter) or
  with what the machine can do, with a message that says what was wrong and what to do. It
  subclasses ValueError so code written for Cellpose that catches ValueError keeps working.
  Most input checks raise it directly.
- :class:`BadInputError`: an input (image, parameter, file) that cannot be used.
- :class:`ModelNotAvailableError`: a model name or file with no weights on this machine (also a
  FileNotFoundError).
- :class:`OutOfMemoryError`: the work does not fit in the (GPU) memory even at the smallest batch
  (also a MemoryError).
- :class:`NonFiniteFlowsError`: flows or cell probabilities with NaN / infinite values (a BadInputError).
- :class:`TrainingDivergedError`: a training run whose loss stopped being a finite number (too high a
  learning rate for the data); nothing is saved.
- :class:`RunCancelled`: a run someone cancelled; not a user error (not a CellposeWebError).

The message is meant for a biologist: say what was wrong and what to do.
"""

__all__ = ["CellposeWebError", "BadInputError", "ModelNotAvailableError", "OutOfMemoryError", "NonFiniteFlowsError", "TrainingDivergedError",
           "RunCancelled"]


class CellposeWebError(ValueError):
    """A problem with the user's input or the run, with a message that says what to do."""


class BadInputError(CellposeWebError):
    """An image, parameter or file that cannot be used as given."""


class ModelNotAvailableError(CellposeWebError, FileNotFoundError):
    """A model name or file could not be resolved to weights on this machine."""


class OutOfMemoryError(CellposeWebError, MemoryError):
    """The run did not fit in memory, even after lowering the batch size to 1 (GPU), or the host's
    memory ran out; the message says what to do (smaller image or scale, fewer other programs)."""


class NonFiniteFlowsError(BadInputError):
    """The flows (``dP``) or cell probability given to mask reconstruction hold NaN or infinite values.
    A caller that knows its image was finite (``CellposeModel.eval`` checks it first) catches this type
    and blames the model's output instead."""


class TrainingDivergedError(CellposeWebError):
    """Training stopped because the loss became NaN or infinite: the weights are ruined and no model
    was saved; the message names the epoch and the learning rate to lower."""


class RunCancelled(Exception):
    """A run stopped because someone cancelled it (Cancel button, the browser went away, a job's
    cancel flag). Not a user error: callers catch it by type and report "cancelled"."""
