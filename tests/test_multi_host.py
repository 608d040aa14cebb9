"""Several hosts, for real: learners on machines with addresses of their own.

Each "host" is a Linux network namespace with its own address on a private /24, joined to the
driver's namespace by a veth pair and a bridge: a ``dask scheduler`` runs in the driver's namespace,
one ``dask worker`` (with its nanny) in each host namespace, attached through a scheduler file as on
an HPC allocation. Gradients travel between the hosts over gloo, requests over Dask's comms.

Building the namespaces needs root and iproute2 (the CI machine has both); elsewhere the module is
skipped with the reason. Every namespace, link and process the module makes is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import gymnasium as gym
import numpy as np
import pytest
from conftest import SMALL_MODEL, ppo_batch

from dlearner import PPOConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))
DASK = str(Path(sys.executable).with_name("dask"))
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """``count`` network namespaces ``<tag>h1``, ``<tag>h2``, ... at ``<subnet>.11``, ``.12``, ...,
    bridged to the driver's namespace at ``<subnet>.1``."""

    def __init__(self, count: int):
        tag = f"dl{os.getpid() % 100000}"
        self.subnet = f"10.213.{os.getpid() % 250}"
        self.bridge = f"{tag}br"
        self.names: List[str] = []
        self.links: List[str] = [self.bridge]
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(1, count + 1):
                name, veth = f"{tag}h{i}", f"{tag}v{i}"
                _ip("netns", "add", name)
                self.names.append(name)
                _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
                self.links.append(veth)
                _ip("link", "set", f"{veth}p", "netns", name)
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", name, "addr", "add", f"{self.address(i - 1)}/24", "dev", f"{veth}p")
                _ip("-n", name, "link", "set", f"{veth}p", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def address(self, host: int) -> str:
        return f"{self.subnet}.{11 + host}"

    def run_in(self, host: int) -> List[str]:
        """The command prefix that runs a program on ``host``."""
        return ["ip", "netns", "exec", self.names[host]]

    def close(self) -> None:
        for name in self.names:
            # Anything still running in the namespace goes first, or its links outlive it.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.names, self.links = [], []


def _netns_unavailable() -> str:
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` to build network namespaces"
    if os.geteuid() != 0:
        return "needs root to build network namespaces (ip netns, veth, bridge)"
    return ""


class Cluster:
    """A ``dask scheduler`` in the driver's namespace and one ``dask worker`` (with nanny) per host."""

    def __init__(self, hosts: Hosts, directory: Path):
        self.hosts = hosts
        self.directory = directory
        self.scheduler_file = directory / "scheduler.json"
        self.env = {**os.environ, **QUIET_THREADS}
        self.procs: List[subprocess.Popen] = []
        self.logs: List = []
        try:
            self._start(
                "scheduler",
                [DASK, "scheduler", "--host", f"{hosts.subnet}.1", "--port", "0", "--dashboard-address", ":0", "--no-show"]
                + ["--scheduler-file", str(self.scheduler_file)],
            )
            deadline = time.monotonic() + 60
            while not self._scheduler_written():
                assert time.monotonic() < deadline, "the scheduler wrote no scheduler file:\n" + self.log_text()
                time.sleep(0.1)
            for host in range(len(hosts.names)):
                self._start(
                    f"worker-h{host + 1}",
                    hosts.run_in(host)
                    + [DASK, "worker", "--scheduler-file", str(self.scheduler_file), "--host", hosts.address(host)]
                    + ["--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--memory-limit", "0"]
                    + ["--local-directory", str(directory / f"scratch-h{host + 1}"), "--death-timeout", "60"],
                )
        except BaseException:
            self.close()
            raise

    def _scheduler_written(self) -> bool:
        try:
            return bool(json.loads(self.scheduler_file.read_text())["address"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    def _start(self, name: str, command: List[str]) -> None:
        log = (self.directory / f"{name}.log").open("w")
        self.logs.append(log)
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.directory.glob("*.log")))

    def close(self) -> None:
        for proc in reversed(self.procs):  # workers first, the scheduler last
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a worker child that outlived its nanny
            except ProcessLookupError:
                pass
        for log in self.logs:
            log.close()
        self.procs, self.logs = [], []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = Hosts(2)
    try:
        running = Cluster(hosts, tmp_path_factory.mktemp("multi-host"))
        try:
            yield running
        finally:
            running.close()
    finally:
        hosts.close()


def config(cluster: Cluster) -> PPOConfig:
    return (
        PPOConfig()
        .learners(num_learners=2, learner_startup_timeout_s=120)
        .training(minibatch_size=32, num_epochs=2)
        .rl_module(model_config=SMALL_MODEL)
        .fault_tolerance(restart_failed_learners=True, learner_restart_timeout_s=120)
        .cluster(scheduler_file=str(cluster.scheduler_file))
        .debugging(seed=5)
    )


def local_weights(batches) -> dict:
    """The weights one local learner ends with after ``batches``: what the hosts must agree on."""
    cfg = PPOConfig().training(minibatch_size=32, num_epochs=2).rl_module(model_config=SMALL_MODEL).debugging(seed=5)
    with cfg.build_learner_group(spaces=SPACES) as group:
        for batch in batches:
            group.update(batch)
        return group.get_weights()


def assert_close(actual: dict, expected: dict) -> None:
    for mid in expected:
        for name, value in expected[mid].items():
            np.testing.assert_allclose(actual[mid][name], value, rtol=1e-5, atol=1e-6)


def test_learners_on_two_hosts_match_one_local_learner_and_survive_losing_a_hosts_worker(cluster):
    batches = [ppo_batch(64, seed=i) for i in range(3)]
    with config(cluster).build_learner_group(spaces=SPACES) as group:
        hosts = sorted(address.split("://")[1].rsplit(":", 1)[0] for address in group.learner_workers)
        assert hosts == [cluster.hosts.address(0), cluster.hosts.address(1)], "one learner per host"

        group.update(batches[0])
        assert_close(group.get_weights(), local_weights(batches[:1]))

        # Host 2's worker process dies (its nanny starts a new one there): the group replaces the
        # learner on a worker that is up, re-forms the process group across the hosts, goes on.
        lost = next(w for w in group.learner_workers if cluster.hosts.address(1) in w)
        pid = group.client.run(os.getpid, workers=[lost])[lost]
        os.kill(pid, signal.SIGKILL)
        for batch in batches[1:]:
            group.update(batch)
        assert group.num_learner_restarts >= 1 and lost not in group.learner_workers
        per_learner = group.foreach_learner(lambda learner: learner.module.get_state())
        for other in per_learner[1:]:
            assert_close(other, per_learner[0])
        assert_close(group.get_weights(), local_weights(batches))


def test_ppo_trains_with_learners_and_an_env_runner_spread_over_the_hosts(cluster):
    algo = (
        config(cluster)
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1, num_envs_per_env_runner=2)
        .training(train_batch_size=256, minibatch_size=64, num_epochs=2)
        .build_algo()
    )
    try:
        results = [algo.train() for _ in range(3)]
        hosts = {address.split("://")[1].rsplit(":", 1)[0] for address in algo.learner_group.learner_workers}
        assert hosts == {cluster.hosts.address(0), cluster.hosts.address(1)}
        assert results[-1]["num_env_steps_sampled_lifetime"] >= 3 * 256
        assert results[-1]["num_healthy_learners"] == 2 and results[-1]["num_healthy_env_runners"] == 1
        assert np.isfinite(results[-1]["env_runners"]["episode_return_mean"])
    finally:
        algo.stop()
