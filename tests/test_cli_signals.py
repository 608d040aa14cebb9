"""SIGTERM and SIGINT sent to a running `dlearner train` (real signals to a real subprocess).

The contract: the iteration under way finishes (or, on a second signal, is abandoned whole), the
final checkpoint's weights and counters belong to one and the same iteration, the message says how
to resume, the exit status is 0 for SIGTERM and 130 for SIGINT, and `--resume` goes on from there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from dask_processes import QUIET_THREADS, wait_for
from test_cli import DLEARNER, FAST

from dlearner.reporting import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]


def dlearner(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([DLEARNER, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **QUIET_THREADS})


def start_dlearner(*args: str, own_process_group: bool = False) -> subprocess.Popen:
    """``own_process_group``: the command and every process it starts form a process group of their
    own, as a command typed in a terminal does (its Ctrl-C signals the whole group)."""
    return subprocess.Popen(
        [DLEARNER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **QUIET_THREADS},
        start_new_session=own_process_group,
    )


def start_training(run: Path, *extra: str, own_process_group: bool = False) -> subprocess.Popen:
    return start_dlearner(
        "train",
        "--env",
        "CartPole-v1",
        "--checkpoint",
        str(run),
        "--stop-iters",
        "100000",
        *FAST,
        *extra,
        own_process_group=own_process_group,
    )


def iterations_logged(run: Path) -> List[int]:
    path = run / "metrics.jsonl"
    return [row["training_iteration"] for row in read_metrics(path)] if path.is_file() else []


def inspect_metadata(run: Path) -> Dict:
    proc = dlearner("inspect", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["metadata"]


def checkpoint_weights(run: Path) -> np.ndarray:
    """The module weights of a checkpoint, through the public restore path, flattened in a fixed order."""
    from dlearner.cli import config_from_dict

    config = config_from_dict(inspect_metadata(run)["config"])
    config.learners(num_learners=0)
    config.env_runners(num_env_runners=0)
    with config.build_algo() as algo:
        algo.restore_from_path(str(run))
        weights = algo.learner_group.get_weights()
    return np.concatenate([np.ravel(np.asarray(weights[m][k])) for m in sorted(weights) for k in sorted(weights[m])])


def stop_with(proc: subprocess.Popen, signum: int, run: Path, after_iterations: int = 3, to_group: bool = False):
    """Send ``signum`` to ``proc`` (``to_group``: to its whole process group) once ``run`` has
    ``after_iterations`` iterations; returns its stdout and stderr."""
    try:
        wait_for(
            lambda: len(iterations_logged(run)) >= after_iterations, timeout=120, proc=proc, what=f"{after_iterations} iterations"
        )
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# SIGTERM as `kill PID` sends it, to the driver alone; SIGINT as Ctrl-C in a terminal sends it, to the
# whole process group, so the embedded cluster's worker processes get it too and leave it to the driver.
@pytest.mark.parametrize(
    "signum, status, to_group", [(signal.SIGTERM, 0, False), (signal.SIGINT, 130, True)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_finishes_the_iteration_saves_it_whole_and_resume_goes_on(tmp_path, signum, status, to_group):
    run = tmp_path / "run"
    # A learner actor on the embedded cluster: the signal reaches the driver while it waits on the actor.
    proc = start_training(run, "--num-learners", "1", "--checkpoint-every", "0", own_process_group=to_group)
    out, err = stop_with(proc, signum, run, to_group=to_group)
    name = signal.Signals(signum).name
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert f"{name} received" in err
    done = iterations_logged(run)[-1]
    assert iterations_logged(run) == list(range(1, done + 1))
    assert f"stopped by {name}: the checkpoint {run} holds iteration {done}" in err
    assert f"dlearner train --checkpoint {run} --resume" in err  # how to resume

    counters = inspect_metadata(run)["counters"]
    assert counters["iteration"] == done
    if signum != signal.SIGTERM:
        return  # the checkpoint's contents and --resume are the same for both signals: checked once, below

    # Counters and weights of the checkpoint belong to the last iteration logged: the same weights as
    # a run that stops after exactly `done` iterations (training is deterministic with --seed). That
    # reference run trains in the background while the checkpoint is read and resumed.
    assert counters["iteration"] == done
    assert counters["num_env_steps_sampled_lifetime"] == read_metrics(run / "metrics.jsonl")[-1]["num_env_steps_sampled_lifetime"]
    reference = tmp_path / "reference"
    ref = start_dlearner(
        "train",
        "--env",
        "CartPole-v1",
        "--checkpoint",
        str(reference),
        "--stop-iters",
        str(done),
        "--num-learners",
        "0",
        "-q",
        *FAST,
    )
    try:
        saved = checkpoint_weights(run)

        resumed = dlearner("train", "--checkpoint", str(run), "--resume", "--stop-iters", str(done + 2))
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed {run} at iteration {done}" in resumed.stdout
        assert iterations_logged(run) == list(range(1, done + 3))
        assert inspect_metadata(run)["counters"]["iteration"] == done + 2

        _, ref_err = ref.communicate(timeout=180)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()
    assert ref.returncode == 0, ref_err
    np.testing.assert_array_equal(saved, checkpoint_weights(reference))


def test_a_second_signal_abandons_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    # Long iterations (a big batch, several epochs) so that both signals land inside one; no periodic
    # checkpoint, so the only one is the one written at the start (iteration 0).
    proc = start_training(
        run, "--num-learners", "0", "--checkpoint-every", "0", "--train-batch-size", "4096", "--num-epochs", "8"
    )
    try:
        wait_for(lambda: len(iterations_logged(run)) >= 1, timeout=120, proc=proc, what="one iteration")
        time.sleep(0.3)  # into the next iteration
        proc.send_signal(signal.SIGTERM)
        # Second signal once the first is acknowledged (the driver is inside the next iteration).
        lines: List[str] = []
        wait_for(
            lambda: lines.append(proc.stderr.readline()) or "SIGTERM received" in lines[-1],
            timeout=60,
            proc=proc,
            what="the first signal's notice",
        )
        assert "finishing iteration" in lines[-1], lines
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "abandoned iteration" in err and "--resume" in err
    # The checkpoint on disk is still the last complete one, and whole; --resume continues from it.
    assert iterations_logged(run)[-1] >= 1
    assert inspect_metadata(run)["counters"]["iteration"] == 0
    assert "holds iteration 0" in err


def test_sigterm_before_training_starts_stops_at_once(tmp_path):
    """During start-up (here: waiting for workers that never come) nothing is under way: SIGTERM ends it."""
    from dask_processes import DaskProcesses

    cluster = DaskProcesses(tmp_path / "dask", n_workers=0)
    try:
        proc = subprocess.Popen(
            [
                DLEARNER,
                "train",
                "--env",
                "CartPole-v1",
                "--num-learners",
                "1",
                "--startup-timeout",
                "300",
                "--scheduler-file",
                str(cluster.scheduler_file),
                *FAST,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **QUIET_THREADS},
        )
        try:
            lines: List[str] = []
            wait_for(
                lambda: lines.append(proc.stderr.readline()) or "wait" in lines[-1].lower(),
                timeout=120,
                proc=proc,
                what="the 'waiting for workers' message",
            )
            proc.send_signal(signal.SIGTERM)
            out, rest = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        cluster.close()
    err = "".join(lines) + rest
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM before training started" in err
    assert "Traceback" not in err
