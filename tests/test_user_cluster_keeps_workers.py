"""A cluster you bring stays yours: after env-runner and learner restarts and ``algo.stop()``, it
has every worker it started with, and your client still works.

dlearner never closes a nanny or a worker of a cluster it attached to; a SIGKILLed worker comes back
through its own nanny. (The cluster below waits for that however long it takes, see
``conftest.KEEP_KILLED_WORKERS``: a nanny it closed would be dlearner's doing.) A cluster attached
through a scheduler file is covered by ``test_cli.py::test_train_attaches_with_a_scheduler_file_and_leaves_the_cluster_running``.
"""

from __future__ import annotations

import pytest
from conftest import kill_worker, killable_cluster, ppo_algo_config, wait_for_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NUM_WORKERS = 4  # two learners, one env runner and a spare


def test_restarts_and_stop_leave_every_worker_of_the_users_cluster_running():
    with killable_cluster(NUM_WORKERS) as client:
        cluster = client.cluster
        names = set(cluster.workers)
        config = ppo_algo_config(
            client, num_learners=2, restart_failed_learners=True, restart_failed_env_runners=True, learner_restart_timeout_s=60
        )
        algo = config.build_algo()
        try:
            algo.train()
            kill_worker(client, algo.env_runner_group.workers[0])
            algo.train()
            kill_worker(client, algo.learner_group.learner_workers[1])
            algo.train()
            result = algo.train()
            assert result["num_env_runner_restarts"] == 1 and result["num_learner_restarts"] == 1
            assert result["num_healthy_env_runners"] == 1 and result["num_healthy_learners"] == 2
        finally:
            algo.stop()

        wait_for_workers(client, NUM_WORKERS)
        assert set(cluster.workers) == names, "a nanny of the user's cluster was closed"
        assert {nanny.status.name for nanny in cluster.workers.values()} == {"running"}
        assert client.status == "running"
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3
