"""The LocalCluster dlearner starts itself (no ``.cluster(...)`` named): it keeps the number of worker
processes it was built with, its worker processes leave SIGINT and SIGTERM to the driver, and closing
it lets every worker process exit on its own, with nothing logged.

Dask's ``LocalCluster`` gives up on a worker that is not back within
``distributed.deploy.lost-worker-timeout`` (its nanny is closed for good), and gives a closing worker
process 4 s to exit before killing it with a warning; a worker that used torch on a busy machine can
need more than either. The cluster is dlearner's own, so dlearner takes care of both.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import time
from pathlib import Path

import dask
import pytest

from dlearner import PPOConfig
from dlearner.backends.dask.cluster import connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_a_worker_that_dask_gave_up_on_is_replaced_by_a_new_worker_process(caplog):
    # A lost-worker-timeout far below any restart time: LocalCluster always gives up on the killed worker.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.1s"}), caplog.at_level(logging.WARNING):
        connection = connect(PPOConfig(), num_workers=2)
        try:
            client, cluster = connection.client, connection.cluster
            lost = sorted(client.scheduler_info()["workers"])[0]
            os.kill(client.run(os.getpid, workers=[lost])[lost], signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:
                names = {str(name): nanny.status.name for name, nanny in cluster.workers.items()}
                registered = {w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
                replaced = [name for name in names if name.endswith("-r1")]
                if replaced and set(names.values()) == {"running"} and len(registered) == 2 and len(names) == 2:
                    break
                assert time.monotonic() < deadline, f"no replacement worker: nannies {names}, scheduler {registered}"
                time.sleep(0.2)
            assert client.submit(sum, [1, 2], workers=[replaced[0]]).result(timeout=60) == 3
        finally:
            connection.close()
    assert any("gave up on its worker" in record.getMessage() for record in caplog.records)


def exit_slowly(marker: str, seconds: float) -> None:
    """Runs on a worker: make its process take ``seconds`` to exit (as torch's teardown does on a busy
    machine), then leave ``marker`` behind, proof that it exited on its own rather than being killed."""

    def finish() -> None:
        time.sleep(seconds)
        Path(marker).write_text("exited on its own")

    atexit.register(finish)


def test_closing_lets_each_worker_process_exit_on_its_own(tmp_path):
    connection = connect(PPOConfig(), num_workers=2)
    try:
        markers = {
            address: str(tmp_path / f"worker-{i}") for i, address in enumerate(connection.client.scheduler_info()["workers"])
        }
        for address, marker in markers.items():
            connection.client.run(exit_slowly, marker, 5.0, workers=[address])  # longer than Dask's 4 s
    finally:
        connection.close()
    # Dask alone kills a worker process still running after 4 s ("Worker process still alive after 4.0 seconds, killing").
    assert all(Path(marker).is_file() for marker in markers.values()), "a worker process was killed instead of exiting"


def test_worker_processes_leave_sigint_and_sigterm_to_the_driver():
    # Ctrl-C in a terminal (and `timeout`, `scancel`) signals the worker processes too; the driver
    # finishes its iteration on them before it closes them.
    connection = connect(PPOConfig(), num_workers=1)
    try:
        (address, pid), *_ = connection.client.run(os.getpid).items()
        for signum in (signal.SIGINT, signal.SIGTERM):
            os.kill(pid, signum)
        time.sleep(1.0)  # a worker process that took a signal would be gone (or restarted) by now
        assert connection.client.run(os.getpid) == {address: pid}
        assert connection.client.submit(sum, [1, 2], workers=[address]).result(timeout=60) == 3
    finally:
        connection.close()


def test_closing_while_a_heartbeat_is_in_flight_logs_nothing(capfd):
    connection = connect(PPOConfig(), num_workers=2)
    try:
        # A scheduler slow to answer heartbeats, as on a busy machine: each worker sends one within
        # 0.5 s, which is still waiting for its answer when the workers close.
        scheduler = connection.cluster.scheduler
        answer = scheduler.handlers["heartbeat_worker"]

        async def slow_heartbeat_worker(*args, **kwargs):
            await asyncio.sleep(2.0)
            return answer(*args, **kwargs)

        scheduler.handlers["heartbeat_worker"] = slow_heartbeat_worker
        time.sleep(1.0)
    finally:
        connection.close()
    # Dask's worker alone closes its connections under the heartbeat in flight and logs
    # "Failed to communicate with scheduler during heartbeat" with a traceback.
    assert capfd.readouterr().err == ""
