"""The user's mistakes, as exception types: ``main`` prints these as one ``error:`` line, and only these.

Each also derives from the built-in type it refines, so ``except ValueError`` still
catches a :class:`BadInputError`; but an error raised by JAX, orbax or a bug keeps its
own type and its traceback.
"""


class UsageError(Exception):
    """A mistake in the flags, data, workdir, checkpoint or cluster set-up, said in one line."""


class BadInputError(UsageError, ValueError):
    """A flag, data file or checkpoint whose value is wrong."""


class MissingError(UsageError, FileNotFoundError):
    """Data or a checkpoint that is not where the flags say."""


class ExistsError(UsageError, FileExistsError):
    """A workdir that already holds a run that the flags would overwrite."""


class DivergedError(UsageError, FloatingPointError):
    """Training that the settings make diverge: steps with a non-finite loss or gradient, persisting."""
