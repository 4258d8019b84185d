"""The error hierarchy, one class per documented exit code (README "Exit codes"); the CLI maps them in one place.

Errors are matched by class, never by message text. Where a library gives no class (MLflow, PuLP), the one helper
that reads its message says which version it was observed on.
"""

from __future__ import annotations


class EnginewrightError(Exception):
    """Base of the project's own errors; exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class BadInput(EnginewrightError, ValueError):
    """A recipe, override, argument or input file is wrong: nothing heavy ran (exit 2)."""

    exit_code = 2


class Refused(EnginewrightError, RuntimeError):
    """An artifact does not match what was recorded or this machine: it is not used or served (exit 3)."""

    exit_code = 3


class NotCertified(EnginewrightError, LookupError):
    """Nothing is certified for what was asked (exit 4)."""

    exit_code = 4


def exit_code_of(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, EnginewrightError) else 1
