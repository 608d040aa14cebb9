"""Exit statuses and how a failed command is reported: one line on stderr, the traceback with ``--debug``."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

EXIT_OK = 0
EXIT_FAILED = 1  # training (or another command) failed for a reason other than the flags
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for a command whose reader closed the pipe


class UsageError(Exception):
    """A user mistake (bad flag, path or setting): reported as ``dlearner: error: ...``, exit status 2."""


class TrainingFailed(Exception):
    """Wraps an exception raised while ``train`` ran (after its flags were checked): exit status 1."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def flag(name: str) -> Iterator[None]:
    """Report a ``ValueError``/``TypeError`` from a config setter as an error of the flag ``name``."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(f"argument {name}: {err}") from err


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (learner tracebacks ride along as notes, shown by ``--debug``)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    name = type(err).__name__
    if isinstance(err, (UsageError, FileNotFoundError)) or not first:
        return first or name
    return f"{name}: {first}"


def report_error(err: BaseException, debug: bool) -> None:
    """Print ``dlearner: error: ...`` for ``err`` on stderr (preceded by its traceback with ``debug``)."""
    import traceback

    if debug:
        traceback.print_exception(err, file=sys.stderr)
    hint = "" if debug or isinstance(err, UsageError) else "  (--debug shows the full traceback)"
    print(f"dlearner: error: {_one_line(err)}{hint}", file=sys.stderr)
