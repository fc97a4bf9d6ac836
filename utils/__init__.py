"""Utilities of the MAS reference implementation (Aljundi et al., ECCV 2018).

`UserError` is the one exception type that reaches the command line as a single
`error: ...` line and a non-zero exit code; everything else is a bug.
"""


class UserError(Exception):
    """A problem with the user's input, files or machine, reported in one line."""


class Diverged(UserError):
    """The training loss became NaN or infinite: the run's hyperparameters, not its input, are at fault.

    ``results.json`` records it (``"diverged"``), so that a sweep reports the run as diverged, not failed."""
