"""The worker processes of the LocalCluster that dlearner starts itself: the driver owns them and
closes them (:meth:`dlearner.backends.dask.cluster.ClusterConnection.close`).

Two things differ from Dask's own worker, both about stopping:

* **They ignore SIGINT and SIGTERM.** Ctrl-C in a terminal signals the whole foreground process
  group, and so do ``timeout``, ``scancel`` and systemd with SIGTERM; the worker processes are in
  that group. A signal is the driver's to handle: it finishes the iteration under way, which needs
  its learner and env-runner workers alive, saves a checkpoint and then closes the workers. A worker
  process that took the signal itself would die in the middle of that iteration. A worker process
  still ends with its driver: Dask's worker process exits as soon as its parent process is gone.
* **A closing worker waits for the heartbeat it has in flight.** Dask's ``Worker.close`` stops the
  heartbeat timer but not a heartbeat already sent, then closes the worker's connections to the
  scheduler under it, and that heartbeat logs "Failed to communicate with scheduler during
  heartbeat" with a traceback although nothing failed (a heartbeat is slow on a busy machine, so this
  happens there). A heartbeat that fails while the worker runs is still logged as Dask logs it.

Both classes are picklable by reference: the nanny sends the worker class to the process it spawns.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Optional

from distributed import Nanny, Worker

#: How long a closing worker waits for the answer to its last heartbeat. The scheduler answers in
#: milliseconds; one that does not answer within this is in trouble, and then the error is worth seeing.
_HEARTBEAT_WAIT_S = 5.0


class EmbeddedWorker(Worker):
    """A Dask worker in a process of its own that its driver stops (see the module docstring).

    Created by :class:`EmbeddedNanny` in the worker process, on that process's main thread.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the worker starts: from here on the driver alone decides when this process stops.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        super().__init__(*args, **kwargs)
        self._heartbeat_task: Optional[asyncio.Task] = None
        self._heartbeat_done = asyncio.Event()
        self._heartbeat_done.set()

    async def heartbeat(self) -> None:
        """Dask's heartbeat, remembered while it waits for the scheduler's answer."""
        self._heartbeat_task = asyncio.current_task()
        self._heartbeat_done.clear()
        try:
            await super().heartbeat()
        finally:
            self._heartbeat_task = None
            self._heartbeat_done.set()

    async def close(self, *args: Any, **kwargs: Any) -> Any:
        """Dask's close, once the heartbeat in flight (if any) has its answer."""
        self.periodic_callbacks["heartbeat"].stop()
        # A heartbeat that closes the worker itself (the scheduler no longer knows it) must not wait for itself.
        if self._heartbeat_task is not None and self._heartbeat_task is not asyncio.current_task():
            try:
                await asyncio.wait_for(self._heartbeat_done.wait(), _HEARTBEAT_WAIT_S)
            except TimeoutError:
                pass  # the scheduler did not answer: close anyway, and let the heartbeat report it
        return await super().close(*args, **kwargs)


class EmbeddedNanny(Nanny):
    """A Dask nanny that runs an :class:`EmbeddedWorker` in the worker process it spawns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, worker_class=EmbeddedWorker, **kwargs)
