"""A Dask cluster started the way a batch job starts one: a ``dask scheduler --scheduler-file``
process and ``dask worker`` processes, each its own command, as separate OS processes.

Used by the CLI and HPC tests; every process it starts is ended by :meth:`DaskProcesses.close`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, List, Optional, Sequence

_BESIDE_PYTHON = Path(sys.executable).with_name("dask")
DASK = str(_BESIDE_PYTHON) if _BESIDE_PYTHON.is_file() else "dask"
#: One thread per process for torch and BLAS: the suite runs on 2 shared cores.
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class DaskProcesses:
    """``dask scheduler`` + ``n_workers`` x ``dask worker --nworkers 1 --nthreads 1``, sharing a scheduler file.

    Each process runs in a session of its own, so :meth:`close` can end a worker's nanny and the worker
    process it spawned together. Their output goes to ``*.log`` files in ``directory`` (shown by
    :meth:`logs` when a test fails).
    """

    def __init__(self, directory: Path, n_workers: int, *, worker_args: Sequence[str] = (), timeout: float = 90):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = self.directory / "scheduler.json"
        self.env = {**os.environ, **QUIET_THREADS}
        self._procs: List[subprocess.Popen] = []
        self._logs: List[IO[str]] = []
        try:
            self.scheduler = self._start(
                "scheduler",
                [
                    DASK,
                    "scheduler",
                    "--scheduler-file",
                    str(self.scheduler_file),
                    "--port",
                    "0",
                    "--dashboard-address",
                    ":0",
                    "--no-show",
                ],
            )
            self.address = self._wait_for_scheduler_file(timeout)
            self.workers = [self.start_worker(worker_args) for _ in range(n_workers)]
            if n_workers:
                self.wait_for_workers(n_workers, timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, command: List[str]) -> subprocess.Popen:
        log = (self.directory / f"{name}-{len(self._procs)}.log").open("w")
        self._logs.append(log)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._procs.append(proc)
        return proc

    def start_worker(self, extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """One more ``dask worker`` process (it joins on its own; see :meth:`wait_for_workers`)."""
        return self._start(
            "worker",
            [
                DASK,
                "worker",
                "--scheduler-file",
                str(self.scheduler_file),
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--memory-limit",
                "0",
                "--local-directory",
                str(self.directory / "dask-scratch"),
                "--death-timeout",
                "60",
                *extra_args,
            ],
        )

    def _wait_for_scheduler_file(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited with {self.scheduler.returncode}:\n{self.logs()}")
            try:
                return json.loads(self.scheduler_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.1)  # not written yet, or half-written
        raise TimeoutError(f"dask scheduler wrote no scheduler file within {timeout} s:\n{self.logs()}")

    def worker_count(self) -> int:
        from distributed import Client

        with Client(scheduler_file=str(self.scheduler_file), timeout="30s", set_as_default=False) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        from distributed import Client

        with Client(scheduler_file=str(self.scheduler_file), timeout="30s", set_as_default=False) as client:
            try:
                client.wait_for_workers(n, timeout=timeout)
            except TimeoutError as err:
                raise TimeoutError(f"{n} dask workers did not join within {timeout} s:\n{self.logs()}") from err

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL a worker's nanny and worker process at once (a node that vanished)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.directory.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def close(self, timeout: float = 30) -> None:
        """Workers first (SIGTERM: they close cleanly), then the scheduler; SIGKILL what is left after ``timeout``."""
        for proc in [p for p in self._procs if p is not getattr(self, "scheduler", None)] + [
            p for p in self._procs if p is getattr(self, "scheduler", None)
        ]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            _killpg_quietly(proc.pid)  # the nanny's worker child, should it have outlived the nanny
            if proc.poll() is None:
                proc.wait(timeout=timeout)
        for log in self._logs:
            log.close()
        self._procs.clear()
        self._logs.clear()


def _killpg_quietly(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has exited: what we want


def wait_for(predicate, timeout: float, proc: Optional[subprocess.Popen] = None, what: str = "condition") -> None:
    """Poll ``predicate()`` every 0.1 s; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)
