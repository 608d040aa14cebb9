"""dlearner on a TLS-secured Dask cluster, and through the scheduler's proxy.

Every request, reply and batch shard between the driver, the learners and the env runners travels
over the cluster's own comms, so a cluster started with ``distributed.Security`` needs nothing
more than a client that holds the same security: ``.cluster(client=Client(cluster, security=sec))``.
The only other traffic is the learners' collective (torch.distributed: rank 0's TCPStore
rendezvous and gloo's connections between learner processes).

One TLS cluster of two worker processes is shared by the module (a real ``LocalCluster`` with
``Security.temporary()``, which needs the ``cryptography`` package), plus one plain-TCP cluster for
a client made with ``direct_to_workers=False``. Nothing here mocks Dask or torch.distributed.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

import dask
import distributed
import gymnasium as gym
import numpy as np
import psutil
import pytest
from conftest import ppo_batch

from dlearner import ALL_MODULES, COMPONENT_LEARNER, DEFAULT_MODULE_ID, PPOConfig

pytest.importorskip("cryptography", reason="distributed.Security.temporary() needs the cryptography package")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))
TINY_MODEL = {"fcnet_hiddens": [16, 16]}
ROWS = 128


def group_config(num_learners=2):
    return (
        PPOConfig()
        .learners(num_learners=num_learners, learner_startup_timeout_s=30)
        .rl_module(model_config=TINY_MODEL)
        .training(minibatch_size=64, num_epochs=1, lr=1e-3)
        .debugging(seed=3)
    )


def start_cluster(**kwargs):
    return distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR, **kwargs
    )


@pytest.fixture(scope="module")
def security():
    return distributed.Security.temporary()  # a self-signed CA and certificate, in memory


@pytest.fixture(scope="module")
def tls_cluster(security):
    with start_cluster(security=security) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tls_client(tls_cluster, security):
    with distributed.Client(tls_cluster, security=security) as client:
        yield client


def trained_rows(result):
    return result[ALL_MODULES]["num_env_steps_trained"]


def weights_of(lg):
    return lg.get_weights()[DEFAULT_MODULE_ID]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def port(address):
    return urlparse(address).port


def listening_ports(pid):
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def dask_ports(client, worker):
    """The ports Dask itself listens on for ``worker``: the worker, its dashboard, its nanny."""
    info = client.scheduler_info(n_workers=-1)["workers"][worker]
    ports = {port(worker), *info.get("services", {}).values()}
    if info.get("nanny"):
        ports.add(port(info["nanny"]))
    return ports


# ------------------------------------------------------------------ a LearnerGroup over TLS
@pytest.fixture(scope="class")
def group(tls_client):
    """A 2-learner group on the TLS cluster; it holds both workers until its class of tests ends."""
    with group_config().cluster(client=tls_client).build_learner_group(spaces=SPACES) as lg:
        yield lg


class TestLearnerGroupOverTLS:
    """Everything a LearnerGroup does, over TLS, on one shared group."""

    def test_the_cluster_and_every_learner_speak_tls(self, tls_client, group):
        workers = tls_client.scheduler_info(n_workers=-1)["workers"]
        assert tls_client.scheduler.address.startswith("tls://")
        assert len(workers) == 2 and all(address.startswith("tls://") for address in workers)
        assert all(info["nanny"].startswith("tls://") for info in workers.values())
        assert len(group.learner_workers) == 2
        assert all(address.startswith("tls://") for address in group.learner_workers)
        assert group.collective_backend == "gloo"

    def test_a_blocking_update_trains_on_the_whole_batch(self, group):
        result = group.update(ppo_batch(ROWS, seed=1))
        assert trained_rows(result) == ROWS
        assert np.isfinite(result[DEFAULT_MODULE_ID]["total_loss"])

    def test_async_updates_report_their_results_in_order(self, group):
        assert group.update(ppo_batch(ROWS, seed=2), async_update=True, timesteps={"num_env_steps_sampled_lifetime": 10}) == []
        earlier = group.update(ppo_batch(ROWS, seed=3), async_update=True, timesteps={"num_env_steps_sampled_lifetime": 20})
        results = earlier + group.drain_async_results()
        assert len(results) == 2
        assert [trained_rows(r) for r in results] == [ROWS, ROWS]

    def test_update_async_returns_dask_futures(self, group):
        first = group.update_async(ppo_batch(ROWS, seed=4))
        second = group.update_async(ppo_batch(ROWS, seed=5))
        assert isinstance(first, distributed.Future)
        done, not_done = distributed.wait([first, second], timeout=60)
        assert len(done) == 2 and not not_done
        assert trained_rows(first.result()) == ROWS
        assert trained_rows(second.result()) == ROWS

    def test_get_state_and_set_state_round_trip(self, group):
        state = group.get_state()
        assert set(state) == {COMPONENT_LEARNER}
        before = weights_of(group)
        group.update(ppo_batch(ROWS, seed=6))
        assert any(not np.array_equal(before[n], w) for n, w in weights_of(group).items())
        group.set_state(state)
        assert_same_weights(weights_of(group), before)

    @pytest.mark.parametrize("where", ["memory", "disk"])
    def test_a_checkpoint_round_trips(self, group, tmp_path, where):
        path = f"memory://tls-{group.group_id}" if where == "memory" else str(tmp_path / "learner_group")
        saved = weights_of(group)
        assert group.save_to_path(path) == path
        group.update(ppo_batch(ROWS, seed=7))
        group.restore_from_path(path)
        assert_same_weights(weights_of(group), saved)


def test_attaching_by_tls_address_takes_the_security_from_the_dask_config(tls_cluster, security, tmp_path):
    """``.cluster(address="tls://...")``: the group's own client reads its certificates from the
    ``distributed.comm.tls`` settings, as every Dask client does."""
    # Security.temporary() holds PEM texts in memory (one self-signed certificate for every role);
    # the config names files.
    (tmp_path / "ca.pem").write_text(security.tls_ca_file)
    (tmp_path / "client.pem").write_text(security.tls_client_cert)
    (tmp_path / "client-key.pem").write_text(security.tls_client_key)
    tls_settings = {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": str(tmp_path / "ca.pem"),
        "distributed.comm.tls.client.cert": str(tmp_path / "client.pem"),
        "distributed.comm.tls.client.key": str(tmp_path / "client-key.pem"),
    }
    with dask.config.set(tls_settings):
        config = group_config().cluster(address=tls_cluster.scheduler_address)
        with config.build_learner_group(spaces=SPACES) as lg:
            assert lg.client.scheduler.address.startswith("tls://")
            assert trained_rows(lg.update(ppo_batch(ROWS, seed=10))) == ROWS
        assert lg.client.status == "closed"  # its own client, closed on shutdown; the cluster runs on
    assert len(tls_cluster.scheduler_info["workers"]) == 2


# ------------------------------------------------- what the learners listen on, and shutdown
def test_learners_listen_only_on_dask_ports_and_gloos_which_close_with_the_group(tls_client):
    """No private channel: besides Dask's own ports, a learner process listens only for its
    collective (gloo's listener for its peers), and that closes when the group shuts down. Rank 0's
    TCPStore rendezvous is gone as soon as the group has formed. The client and workers keep running."""
    with group_config().cluster(client=tls_client).build_learner_group(spaces=SPACES) as lg:
        lg.update(ppo_batch(ROWS, seed=8))
        pids = tls_client.run(os.getpid, workers=lg.learner_workers)
        store_port = lg._pool.store_port  # the rendezvous port rank 0 opened (the pool's own record)
        extra = {}
        for rank, worker in enumerate(lg.learner_workers):
            extra[rank] = listening_ports(pids[worker]) - dask_ports(tls_client, worker)
        assert store_port not in extra[0]  # closed once every rank had joined
        # What is left is gloo's own listener, one per learner process.
        assert [len(extra[rank]) for rank in range(2)] == [1, 1], extra

    assert tls_client.status == "running"
    workers = tls_client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == 2
    for worker in lg.learner_workers:
        assert listening_ports(pids[worker]) <= dask_ports(tls_client, worker)


def test_the_rendezvous_store_listens_only_on_the_interface_it_is_given():
    from dlearner.collective import open_store

    store = open_store("127.0.0.1", 1, timeout_s=5)
    hosts = {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port
    }
    del store
    assert hosts == {"127.0.0.1"}


# --------------------------------------------------------------------- an Algorithm over TLS
def test_an_algorithm_with_an_env_runner_trains_over_tls(tls_client):
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1)
        .learners(num_learners=1, learner_startup_timeout_s=30)
        .cluster(client=tls_client)
        .training(train_batch_size=200, minibatch_size=100, num_epochs=1)
        .rl_module(model_config=TINY_MODEL)
        .debugging(seed=0)
    )
    algo = config.build_algo()
    try:
        assert algo.learner_group.learner_workers[0].startswith("tls://")
        assert all(address.startswith("tls://") for address in algo.env_runner_group.workers)
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    assert [r["training_iteration"] for r in results] == [1, 2]
    assert results[-1]["num_env_steps_sampled_lifetime"] >= 400
    assert results[-1]["num_env_steps_trained_lifetime"] > 0
    assert tls_client.status == "running"


# ------------------------------------------------------------ through the scheduler's proxy
@pytest.fixture(scope="module")
def tcp_cluster():
    with start_cluster() as cluster:
        yield cluster


def test_a_client_without_direct_worker_connections_goes_through_the_scheduler(tcp_cluster):
    """``direct_to_workers=False`` (workers the driver cannot reach): every request is relayed by
    the scheduler's ``proxy`` handler (``distributed.actor.ProxyRPC``)."""
    scheduler = tcp_cluster.scheduler  # a LocalCluster's scheduler lives in this process
    relayed = []
    proxy = scheduler.handlers["proxy"]

    async def counting_proxy(msg, worker, serializers=None):
        relayed.append(worker)
        return await proxy(msg=msg, worker=worker, serializers=serializers)

    scheduler.handlers["proxy"] = counting_proxy
    try:
        with distributed.Client(tcp_cluster, direct_to_workers=False, set_as_default=False) as client:
            with group_config().cluster(client=client).build_learner_group(spaces=SPACES) as lg:
                relayed.clear()
                result = lg.update(ppo_batch(ROWS, seed=9))
                assert trained_rows(result) == ROWS
                assert set(relayed) == set(lg.learner_workers)  # the update reached each learner through the scheduler
            assert client.status == "running"
    finally:
        scheduler.handlers["proxy"] = proxy


def test_attaching_by_tls_address_with_cluster_security(tls_cluster, security):
    """``.cluster(address="tls://...", security=...)``: the certificates come with the config."""
    config = group_config().cluster(address=tls_cluster.scheduler_address, security=security)
    with config.build_learner_group(spaces=SPACES) as lg:
        assert all(worker.startswith("tls://") for worker in lg.learner_workers)
        assert trained_rows(lg.update(ppo_batch(ROWS, seed=11))) == ROWS
    # Credentials never travel to the learners, nor into a checkpoint's config.
    assert "security" not in config.to_dict() and config.copy_for_learner().security is None


def test_an_embedded_cluster_is_secured_by_cluster_security(security):
    config = group_config().cluster(security=security, cluster_kwargs={"silence_logs": logging.ERROR})
    with config.build_learner_group(spaces=SPACES) as lg:
        assert lg.client.scheduler.address.startswith("tls://")
        assert all(worker.startswith("tls://") for worker in lg.learner_workers)
        assert trained_rows(lg.update(ppo_batch(ROWS, seed=12))) == ROWS
