"""Where the ``dlearner`` logger's records go while a command runs: stderr, at the ``-v/-q`` level."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture swaps it between tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _CliFormatter(logging.Formatter):
    """``dlearner: message`` for INFO, ``dlearner: warning: message`` above, the logger's name for DEBUG."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.levelno == logging.INFO:
            return f"dlearner: {message}"
        if record.levelno < logging.INFO:
            return f"dlearner: debug: [{record.name}] {message}"
        return f"dlearner: {record.levelname.lower()}: {message}"


@contextlib.contextmanager
def logging_to_stderr(level: str) -> Iterator[None]:
    """Show the ``dlearner`` logger's records at ``level`` and above on stderr while a command runs;
    afterwards the logger is as it was (``main`` may run several times in one process, e.g. in tests)."""
    logger = logging.getLogger("dlearner")
    handler = _StderrHandler()
    handler.setFormatter(_CliFormatter())
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # our handler prints them; a root handler would print them twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]
