"""SIGTERM and SIGINT while ``train`` runs: stop between iterations, never in the middle of one, and
say what was saved and how to continue."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from typing import Any, Iterator, Optional

from dlearner.cli.errors import EXIT_INTERRUPTED, EXIT_OK
from dlearner.cli.runs import resume_command


class StopSignals:
    """SIGTERM and SIGINT while ``train`` runs: stop between iterations, never in the middle of one.

    What a signal does depends on the phase the run is in:

    * ``start`` (connecting, building, restoring): nothing is under way, so it stops at once.
    * ``iterate`` (inside ``algo.train()``): the first signal lets the iteration finish, then the run
      saves a checkpoint and stops; a second abandons the iteration at once (``KeyboardInterrupt``)
      without saving, so the newest checkpoint on disk stays the last complete one.
    * ``idle`` (metrics, progress between iterations): the iteration is complete; stop after it.
    * ``save`` (a checkpoint is being written): never interrupted, since a half-written checkpoint
      would leave no valid one; the run stops once the write is complete.
    * ``finish`` (after the loop): a second signal stops the remaining clean-up at once.
    """

    def __init__(self) -> None:
        self.phase = "start"
        self.requested: Optional[int] = None  # the first signal: stop after the current iteration
        self.aborted_by: Optional[int] = None  # the signal that raised KeyboardInterrupt
        self.aborted_in: Optional[str] = None  # the phase it interrupted
        self.iteration = 0  # the iteration under way (for the messages)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Handle SIGTERM and SIGINT while the block runs (only the main thread may set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """Run the block in ``phase``, then return to the phase before it."""
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.phase == "start" or (self.phase in ("iterate", "finish") and self.requested is not None):
            self.aborted_by, self.aborted_in = signum, self.phase
            raise KeyboardInterrupt
        if self.phase == "save":
            self.requested = self.requested if self.requested is not None else signum
            notice(
                f"dlearner: {name} received while a checkpoint is being written: stopping once it is complete "
                "(SIGKILL would stop at once but could leave the checkpoint incomplete)"
            )
            return
        if self.requested is not None:
            return  # idle: already stopping after this iteration
        self.requested = signum
        if self.phase == "iterate":
            notice(
                f"dlearner: {name} received: finishing iteration {self.iteration}, then saving a checkpoint "
                f"and stopping (send {name} again to abandon the iteration and stop at once)"
            )
        elif self.phase == "idle":
            notice(f"dlearner: {name} received: stopping after iteration {self.iteration}")


def notice(text: str) -> None:
    """Write a line to stderr from a signal handler too: ``os.write`` on the descriptor, since a handler
    that runs while the main thread is inside ``sys.stderr.write`` must not re-enter the buffered stream."""
    os.write(2, (text + "\n").encode("utf-8", "replace"))


def signal_summary(args: argparse.Namespace, signum: int, last_saved: Optional[int]) -> str:
    """The last line of a run stopped by ``signum``: what the checkpoint holds and how to continue."""
    name = signal.Signals(signum).name
    if not args.checkpoint:
        return f"dlearner: stopped by {name}; no --checkpoint was given, so nothing was saved."
    return (
        f"dlearner: stopped by {name}: the checkpoint {args.checkpoint} holds iteration {last_saved}. "
        f"Continue with: {resume_command(args)}"
    )


def aborted(args: argparse.Namespace, signals: StopSignals, last_saved: Optional[int]) -> int:
    """Exit after a signal stopped ``train`` at once (see :class:`StopSignals`); returns the exit status.

    ``last_saved``: the iteration of the newest complete checkpoint (``None`` if none was written).
    """
    signum = signals.aborted_by
    assert signum is not None
    name = signal.Signals(signum).name
    graceful = EXIT_OK if signum == signal.SIGTERM else EXIT_INTERRUPTED
    if signals.aborted_in == "start":
        notice(
            f"dlearner: stopped by {name} before training started"
            + (f"; the checkpoint {args.checkpoint} is unchanged" if args.checkpoint else "")
        )
        return graceful
    if signals.aborted_in == "finish":
        # The loop had ended and its checkpoint was written: only the clean-up was cut short.
        notice(signal_summary(args, signum, last_saved))
        return graceful
    where = (
        (
            f"the checkpoint {args.checkpoint} holds iteration {last_saved} (the last one written). "
            f"Continue with: {resume_command(args)}"
        )
        if args.checkpoint
        else "nothing was saved (no --checkpoint)"
    )
    notice(f"dlearner: {name} again: abandoned iteration {signals.iteration} and stopped at once; {where}")
    return 128 + signum
