"""Shared fixtures: small environments, batches and learners that make tests fast on 2 cores, and
clusters of worker processes that tests kill workers of."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any, Iterator

import dask
import distributed
import gymnasium as gym
import numpy as np
import pytest
import torch

from dlearner import Columns
from dlearner.algorithms.ppo import PPOTorchLearner

torch.set_num_threads(1)

SMALL_MODEL = {"fcnet_hiddens": [32, 32]}

#: A ``LocalCluster`` gives up on a worker that left the scheduler and has not registered again (under
#: the same name) within ``distributed.deploy.lost-worker-timeout`` (Dask's default: 15 s): it closes
#: that worker's nanny for good ("Nanny asking worker to close. Reason: nanny-close") and the cluster
#: stays a worker short. A nanny restarting a SIGKILLed worker on a loaded 2-core machine can take
#: longer than 15 s, so clusters whose workers tests kill wait this long instead. Dask reads the
#: setting when a worker is lost, so it must be in force for the cluster's whole life.
KEEP_KILLED_WORKERS = {"distributed.deploy.lost-worker-timeout": "600s"}


@contextlib.contextmanager
def killable_cluster(n_workers: int, **cluster_kwargs: Any) -> Iterator[distributed.Client]:
    """A client of a ``LocalCluster`` of ``n_workers`` worker processes (one thread each) whose killed
    workers are restarted by their nannies however long that takes (see :data:`KEEP_KILLED_WORKERS`)."""
    options = dict(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL
    )
    options.update(cluster_kwargs)
    with (
        dask.config.set(KEEP_KILLED_WORKERS),
        distributed.LocalCluster(**options) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def wait_for_workers(client: distributed.Client, count: int, timeout: float = 120) -> None:
    """Wait until the cluster of ``client`` has ``count`` workers again (a nanny restarts a killed worker
    in seconds; a loaded CI machine can take much longer). On timeout, the failure says how many workers
    there are and whether the ``LocalCluster`` gave up on one (closed its nanny for good)."""
    deadline = time.monotonic() + timeout
    while (have := len(client.scheduler_info(n_workers=-1)["workers"])) < count:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"the cluster did not get back to {count} workers within {timeout:g} s: {have} now. " + _nannies(client)
            )
        time.sleep(0.2)


def kill_worker(client: distributed.Client, address: str) -> None:
    """SIGKILL the worker process at ``address`` (its nanny starts a new one)."""
    os.kill(client.run(os.getpid, workers=[address])[address], signal.SIGKILL)


class SleepyPPOLearner(PPOTorchLearner):
    """PPO that sleeps before its gradient steps when ``timesteps`` asks: time to kill a peer mid-update."""

    def before_gradient_based_update(self, *, timesteps):
        super().before_gradient_based_update(timesteps=timesteps)
        time.sleep(timesteps.get("sleep_s", 0))


def identical_weights(group) -> dict:
    """The weights of a learner group's learners, after checking that every learner has the same bits."""
    per_learner = group.foreach_learner(lambda learner: learner.module.get_state())
    for other in per_learner[1:]:
        for mid in per_learner[0]:
            for name, value in per_learner[0][mid].items():
                np.testing.assert_array_equal(value, other[mid][name])
    return per_learner[0]


def assert_close_weights(actual: dict, expected: dict) -> None:
    for mid in expected:
        for name, value in expected[mid].items():
            np.testing.assert_allclose(actual[mid][name], value, rtol=1e-5, atol=1e-6)


def ppo_algo_config(client: distributed.Client, *, num_learners: int = 1, **fault_tolerance: Any):
    """A small PPO Algorithm on CartPole (one env-runner actor, ``num_learners`` learner actors) on the
    cluster of ``client``, with ``config.fault_tolerance(**fault_tolerance)``."""
    from dlearner import PPOConfig

    return (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1, num_envs_per_env_runner=2)
        .learners(num_learners=num_learners, learner_startup_timeout_s=60)
        .training(train_batch_size=200, minibatch_size=100, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
        .fault_tolerance(**fault_tolerance)
        .cluster(client=client)
    )


def _nannies(client: distributed.Client) -> str:
    """What the ``LocalCluster`` behind ``client`` (if any) says about its nannies."""
    cluster = getattr(client, "cluster", None)
    if cluster is None:
        return "(not a LocalCluster of this process: no nannies to look at)"
    given_up = sorted(set(cluster.worker_spec) - set(cluster.workers), key=str)
    states = {name: str(nanny.status.name) for name, nanny in cluster.workers.items()}
    if given_up:
        return (
            f"The LocalCluster gave up on worker(s) {given_up} and closed their nannies for good "
            f"(distributed.deploy.lost-worker-timeout = {dask.config.get('distributed.deploy.lost-worker-timeout')}); "
            f"its nannies: {states}."
        )
    return f"The LocalCluster still has all its nannies ({states}): a worker is still restarting."


@pytest.fixture
def cartpole():
    env = gym.make("CartPole-v1")
    yield env
    env.close()


def ppo_batch(rows: int = 256, seed: int = 0, obs_dim: int = 4, num_actions: int = 2) -> dict:
    """A synthetic but well-formed PPO training batch for CartPole-shaped spaces."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=0.1, size=(rows, num_actions)).astype(np.float32)
    actions = rng.integers(0, num_actions, size=rows)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return {
        Columns.OBS: rng.normal(size=(rows, obs_dim)).astype(np.float32),
        Columns.ACTIONS: actions,
        Columns.ACTION_DIST_INPUTS: logits,
        Columns.ACTION_LOGP: log_probs[np.arange(rows), actions].astype(np.float32),
        Columns.ADVANTAGES: rng.normal(size=rows).astype(np.float32),
        Columns.VALUE_TARGETS: rng.normal(size=rows).astype(np.float32),
    }


@pytest.fixture
def batch():
    return ppo_batch()


def usage_error(capsys, *args: str) -> str:
    """Run ``dlearner ARGS`` in this process, expect a usage error (status 2, no traceback), return its message."""
    from dlearner.cli import main

    try:
        status = main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err
