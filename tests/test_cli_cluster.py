"""`dlearner train` attached to a cluster the way a batch job starts one: a separate `dask scheduler
--scheduler-file` process and `dask worker` processes, then the driver with `--scheduler-file`.

Also the exit codes of failures inside training (status 1, a one-line summary, the traceback with
--debug): a cluster that lacks workers, a learner's own exception, a worker lost mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from dask_processes import QUIET_THREADS, DaskProcesses, wait_for
from test_cli import DLEARNER, FAST, side_by_side

from dlearner.reporting import read_metrics

pytestmark = pytest.mark.slow


def dlearner(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([DLEARNER, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **QUIET_THREADS})


def checkpoint_iteration(run: Path) -> int:
    """The iteration a checkpoint holds, as `dlearner inspect` reports it."""
    proc = dlearner("inspect", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["metadata"]["counters"]["iteration"]


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("dlearner: error:")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[DaskProcesses]:
    """One scheduler and two single-threaded workers for the whole module (each test's actors are
    released when its `dlearner train` ends, so the tests can share it)."""
    processes = DaskProcesses(tmp_path_factory.mktemp("dask"), n_workers=2)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def one_worker(tmp_path) -> Iterator[DaskProcesses]:
    processes = DaskProcesses(tmp_path / "dask", n_workers=1)
    try:
        yield processes
    finally:
        processes.close()


@pytest.mark.parametrize("num_env_runners", [1, 2])
def test_train_with_env_runners_on_a_scheduler_file_cluster_then_resume(cluster, tmp_path, num_env_runners):
    run = tmp_path / "run"
    attach = ["--scheduler-file", str(cluster.scheduler_file)]
    first = dlearner(
        "train",
        "--env",
        "CartPole-v1",
        "--num-learners",
        "1",
        "--num-env-runners",
        str(num_env_runners),
        "--stop-iters",
        "2",
        "--checkpoint",
        str(run),
        *attach,
        *FAST,
    )
    assert first.returncode == 0, first.stderr + cluster.logs()
    assert "Traceback" not in first.stderr
    assert f"{num_env_runners} env-runner actor" in first.stdout
    assert [r["training_iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert checkpoint_iteration(run) == 2

    # A later job on the same cluster continues the run (settings from the checkpoint).
    second = dlearner("train", "--checkpoint", str(run), "--resume", "--stop-iters", "3", *attach)
    assert second.returncode == 0, second.stderr + cluster.logs()
    assert "resumed" in second.stdout and "iteration 2" in second.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["training_iteration"] for r in rows] == [1, 2, 3]
    assert rows[2]["num_env_steps_sampled_lifetime"] > rows[1]["num_env_steps_sampled_lifetime"]
    assert checkpoint_iteration(run) == 3
    # The cluster outlives the runs, with its workers.
    assert cluster.worker_count() == 2


def test_fewer_workers_than_learners_says_what_it_waits_for_and_fails_in_one_line(cluster, tmp_path):
    args = [
        "train",
        "--env",
        "CartPole-v1",
        "--num-learners",
        "3",  # the cluster has two workers
        "--startup-timeout",
        "1",
        "--stop-iters",
        "1",
        "--scheduler-file",
        str(cluster.scheduler_file),
        *FAST,
    ]
    start = time.monotonic()
    proc, quiet, debug = side_by_side(args, [*args, "-q"], [*args, "--debug"])  # each waits on its own
    assert time.monotonic() - start < 60  # --startup-timeout 1, not the 60 s default
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (error,) = error_lines(proc.stderr)
    assert "num_learners=3" in error and "--debug" in error
    # The INFO messages of the `dlearner` logger say what start-up waits for, before the error.
    waiting = [line for line in proc.stderr.splitlines() if "wait" in line.lower() and line != error]
    assert waiting, proc.stderr

    assert quiet.returncode == 1
    assert quiet.stderr.strip().splitlines() == error_lines(quiet.stderr), quiet.stderr  # -q: the error only

    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert error_lines(debug.stderr)[-1].startswith(error.split("  (--debug")[0])


def test_a_learners_exception_exits_1_with_its_summary(cluster, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the learner's error here is 'no CUDA device'; this machine has one")
    # A worker that declares a GPU on a machine without one: the learner placed there raises while it builds.
    gpu_worker = cluster.start_worker(["--resources", "GPU=1"])
    try:
        cluster.wait_for_workers(3)
        args = [
            "train",
            "--env",
            "CartPole-v1",
            "--num-learners",
            "1",
            "--num-gpus-per-learner",
            "1",
            "--stop-iters",
            "1",
            "--scheduler-file",
            str(cluster.scheduler_file),
            *FAST,
        ]
        proc = dlearner(*args)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        (error,) = error_lines(proc.stderr)
        assert "ValueError" in error and "CUDA" in error
        debug = dlearner(*args, "--debug")
        assert debug.returncode == 1
        # The full traceback reaches into the learner's own code on the worker.
        assert "Traceback (most recent call last)" in debug.stderr and "learner/core.py" in debug.stderr
    finally:
        os.killpg(gpu_worker.pid, signal.SIGTERM)
        gpu_worker.wait(timeout=30)
    cluster.wait_for_workers(2)


def test_a_lost_worker_exits_1_and_says_where_the_checkpoint_is(one_worker, tmp_path):
    run = tmp_path / "lost"
    proc = subprocess.Popen(
        [
            DLEARNER,
            "train",
            "--env",
            "CartPole-v1",
            "--num-learners",
            "1",
            "--stop-iters",
            "100000",
            "--checkpoint",
            str(run),
            "--checkpoint-every",
            "1",
            "--scheduler-file",
            str(one_worker.scheduler_file),
            *FAST,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **QUIET_THREADS},
    )
    try:
        wait_for(
            lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run / "metrics.jsonl")) >= 2,
            timeout=120,
            proc=proc,
            what="two iterations",
        )
        one_worker.kill_worker(one_worker.workers[0])
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    # The last line is the summary (the backend may also have logged the death as it happened).
    last = err.strip().splitlines()[-1]
    assert last.startswith("dlearner: error: LearnerDiedError: ") and "--debug" in last, err
    assert "--resume" in err  # how to continue from the last checkpoint
    saved = checkpoint_iteration(run)
    assert saved >= 1 and f"holds iteration {saved}" in err
