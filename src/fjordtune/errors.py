"""One exception taxonomy for fjordtune, picklable so it survives Ray process boundaries.

- `UserError`: the input is wrong (job file, flags, data). The CLI prints it and exits 2, no traceback.
- `InfraError`: something outside us failed (S3, Ray, a worker died). Exit 3.
- `InternalError`: a bug in fjordtune. Exit 4 with a traceback.
"""

from __future__ import annotations


class FjordtuneError(Exception):
    """Base class. `lines` holds one message per problem so several can be reported at once."""

    exit_code = 1

    def __init__(self, *lines: str) -> None:
        self.lines = tuple(lines) or ("unknown error",)
        super().__init__("\n".join(self.lines))

    def __reduce__(self):  # keep pickling exact across Ray workers
        return (type(self), self.lines)


class UserError(FjordtuneError):
    exit_code = 2


class ConfigError(UserError):
    """A job file or an override is invalid; one line per problem."""


class PreflightRefused(UserError):
    """The job would not fit in memory; raised before any accelerator is allocated."""


class InfraError(FjordtuneError):
    exit_code = 3


class InternalError(FjordtuneError):
    exit_code = 4
