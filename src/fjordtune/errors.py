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


def find_fjordtune_error(exc: BaseException | None) -> FjordtuneError | None:
    """The first fjordtune error in an exception's chain (Ray wraps worker exceptions, and Ray Data
    wraps them again), so a user error raised on a worker still reads as a user error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(cause, FjordtuneError):
            return cause
        if isinstance(exc, FjordtuneError) and hasattr(exc, "lines"):
            return exc
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def reraise_as_fjordtune(exc: BaseException) -> None:
    """Raise the fjordtune error inside `exc` as itself (no Ray wrapping), if there is one."""
    found = find_fjordtune_error(exc)
    if found is not None:
        raise type(found)(*found.lines) from None
