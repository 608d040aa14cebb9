"""LearnerGroup: a local learner and data-parallel learners on a real Dask LocalCluster of processes.

One 2-worker cluster is shared by the module (each test builds its group and shuts it down, since
two learners never share a worker process); tests that destroy workers start their own cluster.
Nothing here mocks Dask or torch.distributed.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import distributed
import gymnasium as gym
import numpy as np
import psutil
import pytest
from conftest import SMALL_MODEL, ppo_batch

from dlearner import ALL_MODULES, COMPONENT_LEARNER, DEFAULT_MODULE_ID, LearnerGroup, PPOConfig, RLModuleSpec
from dlearner.algorithms.ppo import PPOTorchLearner
from dlearner.backends.dask.env_runners import DaskEnvRunnerGroup
from dlearner.backends.dask.pool import DaskLearnerPool
from dlearner.backends.interface import EnvRunnerGroup, LearnerPool
from dlearner.backends.local import LocalEnvRunnerGroup, LocalLearnerPool
from dlearner.errors import ClusterResourceError, LearnerDiedError, ProcessGroupError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))

pytestmark = pytest.mark.timeout(120)


#: Set in a worker process by :func:`wake_probes`: its probes' sleeps end at once.
PROBES_AWAKE = threading.Event()


def wake_probes() -> None:
    """Runs on a worker (``client.run``): end the sleep of the probe learner there."""
    PROBES_AWAKE.set()


class ProbePPOLearner(PPOTorchLearner):
    """PPO with test hooks driven by ``timesteps``: sleep, fail on every rank, fail on one rank."""

    def before_gradient_based_update(self, *, timesteps):
        super().before_gradient_based_update(timesteps=timesteps)
        PROBES_AWAKE.wait(timesteps.get("sleep_s", 0))  # sleeps timesteps["sleep_s"] unless woken
        if "fail_all" in timesteps:
            raise RuntimeError("probe failure on every learner")

    def update(self, batch, timesteps=None, **kwargs):
        self._fail_rank = (timesteps or {}).get("fail_rank", -1)
        return super().update(batch, timesteps, **kwargs)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        rank = self._collective.rank if self._collective is not None else 0
        if self._fail_rank == rank:
            # Mid-step, before the gradient all-reduce: the other ranks are already waiting in it.
            raise RuntimeError(f"probe failure on rank {rank} only")
        return super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)


def config(num_learners=2, **training):
    return (
        PPOConfig()
        .learners(num_learners=num_learners, max_requests_in_flight_per_learner=2, learner_startup_timeout_s=30)
        .rl_module(model_config=SMALL_MODEL)
        .training(**{"minibatch_size": 64, "num_epochs": 2, "lr": 1e-3, **training})
        .debugging(seed=3)
    )


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster) as client:
        yield client


@pytest.fixture
def group(client):
    with config().cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        yield lg


def scheduler_keys(client):
    return client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])


def learner_weights(lg):
    return lg.foreach_learner(lambda learner: learner.module.get_state())


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for mid in a:
        assert a[mid].keys() == b[mid].keys()
        for name in a[mid]:
            if atol == 0.0:
                np.testing.assert_array_equal(a[mid][name], b[mid][name], err_msg=f"{mid}/{name}")
            else:
                np.testing.assert_allclose(a[mid][name], b[mid][name], atol=atol, rtol=0, err_msg=f"{mid}/{name}")


# -------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize(
    "interface, implementations",
    [(LearnerPool, [LocalLearnerPool, DaskLearnerPool]), (EnvRunnerGroup, [LocalEnvRunnerGroup, DaskEnvRunnerGroup])],
    ids=["learners", "env-runners"],
)
def test_every_backend_implements_the_interface_with_its_very_signatures(interface, implementations):
    def parameters(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    methods = [name for name, value in vars(interface).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert methods
    for implementation in implementations:
        for name in methods:
            assert parameters(getattr(implementation, name)) == parameters(getattr(interface, name)), (
                f"{implementation.__name__}.{name}"
            )


# ------------------------------------------------------------------------------------ local group
def test_local_group_has_the_whole_api():
    with config(num_learners=0).training(learner_class=ProbePPOLearner).build_learner_group(spaces=SPACES) as lg:
        assert isinstance(lg, LearnerGroup) and lg.is_local and lg.learner_workers == [] and lg.client is None
        assert isinstance(lg._pool, LearnerPool)  # every attribute of the interface, too
        result = lg.update(ppo_batch(128), timesteps={"num_env_steps_sampled_lifetime": 128})
        assert result[ALL_MODULES]["num_env_steps_trained"] == 256
        assert isinstance(result[DEFAULT_MODULE_ID]["total_loss"], float)

        assert lg.update(ppo_batch(64), async_update=True) == []
        future = lg.update_async(ppo_batch(64))
        assert isinstance(future, concurrent.futures.Future)
        assert future.result()[ALL_MODULES]["num_env_steps_trained"] == 128
        reported = lg.update(ppo_batch(64), async_update=True) + lg.drain_async_results()
        assert [r[ALL_MODULES]["num_env_steps_trained_lifetime"] for r in reported] == [384, 640]

        state = lg.get_state()
        assert set(state) == {COMPONENT_LEARNER}
        weights = lg.get_weights()
        lg.update(ppo_batch(64))
        lg.set_state(state)
        assert_same_weights(lg.get_weights(), weights)
        lg.set_weights(weights)
        assert lg.foreach_learner(lambda learner: type(learner).__name__) == ["ProbePPOLearner"]

        spec = RLModuleSpec(observation_space=SPACES[0], action_space=SPACES[1], model_config=SMALL_MODEL)
        assert "other" in lg.add_module(module_id="other", module_spec=spec).rl_module_specs
        lg.update({"other": ppo_batch(16)})
        assert "other" not in lg.remove_module("other").rl_module_specs
        with pytest.raises(ValueError, match="unknown module"):
            lg.update({"other": ppo_batch(16)})
    with pytest.raises(RuntimeError, match="shut down"):
        lg.update(ppo_batch(8))


# ---------------------------------------------------------------------------- data parallel math
def test_two_learners_equal_one_local_learner_on_a_full_batch_step(client):
    batch = ppo_batch(257, seed=1)  # odd: the shards are uneven (128 / 129 rows)
    local = config(num_learners=0, minibatch_size=None, num_epochs=1).build_learner_group(spaces=SPACES)
    with config(minibatch_size=None, num_epochs=1).cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        assert len(set(lg.learner_workers)) == 2
        assert isinstance(lg._pool, LearnerPool)  # every attribute of the interface, too
        assert all(key.startswith(f"learner-{rank}-{lg.group_id}") for rank, key in enumerate(lg.learner_keys))
        assert set(lg.learner_keys) <= set(scheduler_keys(client))
        lg.set_weights(local.get_weights())
        result = lg.update(batch)
        expected = local.update(batch)
        assert_same_weights(lg.get_weights(), local.get_weights(), atol=1e-5)
        assert result[ALL_MODULES]["num_env_steps_trained"] == 257
        for name in ("total_loss", "policy_loss", "vf_loss", "entropy", "mean_kl_loss"):
            assert result[DEFAULT_MODULE_ID][name] == pytest.approx(expected[DEFAULT_MODULE_ID][name], abs=1e-5)
    local.shutdown()


def test_minibatched_epochs_keep_every_learner_identical(client):
    batch = ppo_batch(301, seed=2)
    local = config(num_learners=0).build_learner_group(spaces=SPACES)
    with config().cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        lg.set_weights(local.get_weights())
        for _ in range(2):
            result = lg.update(batch, timesteps={"num_env_steps_sampled_lifetime": 301})
            local.update(batch, timesteps={"num_env_steps_sampled_lifetime": 301})
        rank0, rank1 = learner_weights(lg)
        assert_same_weights(rank0, rank1)  # bit-identical on every learner
        # One shared shuffling generator: the same minibatches as the single learner, up to rounding.
        assert_same_weights(rank0, local.get_weights(), atol=1e-4)
        assert result[ALL_MODULES]["num_env_steps_trained"] == 602
        assert result[ALL_MODULES]["num_env_steps_trained_lifetime"] == 1204
    local.shutdown()


class StepMetricsPPOLearner(PPOTorchLearner):
    """PPO that counts its log_step_metrics calls in a summed metric."""

    def log_step_metrics(self):
        super().log_step_metrics()
        self.metrics.log_value("log_step_metrics_calls", 1, reduce="sum")


def test_log_step_metrics_runs_once_per_update_on_every_learner(client):
    with config(learner_class=StepMetricsPPOLearner).cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        for _ in range(3):  # the first update reduces metrics apart, the later ones in the gradient all-reduce
            assert lg.update(ppo_batch(64, seed=3))[ALL_MODULES]["log_step_metrics_calls"] == 2  # one per learner


def test_after_the_first_update_the_metrics_ride_in_the_last_gradient_all_reduce(client):
    batch = ppo_batch(64, seed=3)  # one minibatch per epoch, 2 epochs: two gradient steps
    local = config(num_learners=0, grad_clip=0.5).build_learner_group(spaces=SPACES)
    with config(grad_clip=0.5).cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        lg.set_weights(local.get_weights())
        calls = []
        for _ in range(3):
            before = lg.foreach_learner(lambda learner: learner._collective.num_collective_calls)
            result = lg.update(batch)
            expected = local.update(batch)
            after = lg.foreach_learner(lambda learner: learner._collective.num_collective_calls)
            calls.append([b - a for a, b in zip(before, after)])
            # The same numbers as one learner: means, sums, and the replicated gradient norm.
            for name in ("total_loss", "policy_loss", "vf_loss", "mean_kl_loss", "gradients_default_optimizer_global_norm"):
                assert result[DEFAULT_MODULE_ID][name] == pytest.approx(expected[DEFAULT_MODULE_ID][name], rel=1e-4, abs=1e-6)
            assert result[ALL_MODULES]["num_env_steps_trained"] == expected[ALL_MODULES]["num_env_steps_trained"]
        # The first update agrees on the metric keys and reduces them with a collective of its own;
        # later ones fold the sums into the last gradient all-reduce: one all-reduce per gradient step.
        assert all(n > 2 for n in calls[0])
        assert calls[1:] == [[2, 2], [2, 2]]
    local.shutdown()


def test_multi_module_batch_with_a_module_smaller_than_the_group(group):
    spec = RLModuleSpec(observation_space=SPACES[0], action_space=SPACES[1], model_config=SMALL_MODEL)
    group.add_module(module_id="tiny", module_spec=spec)
    ranks = learner_weights(group)
    assert_same_weights(ranks[0], ranks[1])  # the new module starts from the same weights everywhere
    local = config(num_learners=0).build_learner_group(spaces=SPACES)
    local.add_module(module_id="tiny", module_spec=spec)
    local.set_weights(group.get_weights())
    batch = {DEFAULT_MODULE_ID: ppo_batch(90, seed=4), "tiny": ppo_batch(1, seed=5)}  # rank 0 gets no "tiny" row
    result = group.update(batch)
    expected = local.update(batch)
    assert result["tiny"]["total_loss"] == pytest.approx(expected["tiny"]["total_loss"], abs=1e-5)
    ranks = learner_weights(group)
    assert_same_weights(ranks[0], ranks[1])
    assert_same_weights(ranks[0], local.get_weights(), atol=1e-4)
    # A batch of one row: rank 0's shard is empty and still takes part in every collective.
    group.update({"tiny": ppo_batch(1, seed=6)})
    ranks = learner_weights(group)
    assert_same_weights(ranks[0], ranks[1])
    group.remove_module("tiny")
    assert group.foreach_learner(lambda learner: sorted(learner.module.keys())) == [[DEFAULT_MODULE_ID]] * 2
    local.shutdown()


def test_state_moves_between_groups_of_different_sizes(group, tmp_path):
    group.update(ppo_batch(64))
    state = group.get_state()
    assert state[COMPONENT_LEARNER]["rl_module"][DEFAULT_MODULE_ID]
    with config(num_learners=0).build_learner_group(spaces=SPACES) as local:
        local.set_state(state)
        assert_same_weights(local.get_weights(), group.get_weights())
        group.save_to_path("memory://lg-test/ckpt")
        local.update(ppo_batch(64))
        local.restore_from_path("memory://lg-test/ckpt")
        assert_same_weights(local.get_weights(), group.get_weights())
    # Any other path: learner rank 0 writes, every learner reads.
    saved = group.get_weights()
    path = group.save_to_path(tmp_path / "ckpt")
    group.update(ppo_batch(64))
    group.restore_from_path(path)
    ranks = learner_weights(group)
    assert_same_weights(ranks[0], saved)
    assert_same_weights(ranks[1], saved)
    only_modules = group.get_state(components="learner/rl_module")
    assert set(only_modules[COMPONENT_LEARNER]) == {"rl_module"}
    with pytest.raises(ValueError, match="learner"):
        group.set_state(state[COMPONENT_LEARNER])


# ---------------------------------------------------------------------------------------- async
def test_async_updates_arrive_in_order_with_bounded_requests_in_flight(client):
    slow = {"sleep_s": 0.3}
    with config().training(learner_class=ProbePPOLearner).cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        batch = ppo_batch(32)
        started = time.perf_counter()
        assert lg.update(batch, async_update=True, timesteps=slow) == []
        assert lg.update(batch, async_update=True, timesteps=slow) == []
        assert time.perf_counter() - started < 0.25  # non-blocking while below the bound of 2
        third = time.perf_counter()
        first = lg.update(batch, async_update=True, timesteps=slow)  # bound reached: waits for the oldest
        assert time.perf_counter() - third > 0.15
        assert sum(not r.future.done() for r in lg._in_flight) <= 2
        rest = lg.drain_async_results()
        lifetimes = [r[ALL_MODULES]["num_env_steps_trained_lifetime"] for r in first + rest]
        assert lifetimes == [64, 128, 192]  # none lost, in submission order

        futures = [lg.update_async(batch, timesteps={"sleep_s": 0.05}) for _ in range(3)]
        assert all(isinstance(f, distributed.Future) and f.key.startswith("learner-update-") for f in futures)
        distributed.wait(futures)
        assert [f.result()[ALL_MODULES]["num_env_steps_trained_lifetime"] for f in futures] == [256, 320, 384]
        assert len(list(distributed.as_completed(futures))) == 3
        blocking = lg.update(batch)  # a blocking update queues behind the async ones
        assert blocking[ALL_MODULES]["num_env_steps_trained_lifetime"] == 448
        events = client.get_events(lg.metrics_topic)
        assert events and "result" in events[-1][1]


# ------------------------------------------------------------------------------------- failures
def test_bad_batch_fails_in_the_driver_and_the_group_stays_usable(group):
    batch = ppo_batch(64)
    del batch["advantages"]
    with pytest.raises(ValueError, match="advantages"):
        group.update(batch)
    bad = ppo_batch(64)
    bad["obs"][3, 1] = np.nan
    with pytest.raises(ValueError, match="obs"):
        group.update(bad, async_update=True)
    result = group.update(ppo_batch(64))
    assert result[ALL_MODULES]["num_env_steps_trained_lifetime"] == 128  # only the good update counted


def test_exceptions_inside_learners_reach_the_driver_and_the_group_recovers(client):
    def boom(learner):
        raise ValueError("boom from inside a learner")

    with config().training(learner_class=ProbePPOLearner).cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        with pytest.raises(ValueError, match="boom from inside") as info:
            lg.foreach_learner(boom)
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "Remote traceback" in notes and "in boom" in notes and "ranks [0, 1]" in notes

        with pytest.raises(RuntimeError, match="probe failure on every learner"):
            lg.update(ppo_batch(64), timesteps={"fail_all": 1})
        started = time.perf_counter()
        with pytest.raises(RuntimeError, match="probe failure on rank 1 only"):
            lg.update(ppo_batch(64), timesteps={"fail_rank": 1})  # rank 0 is inside an all-reduce
        assert time.perf_counter() - started < 10  # rank 0 was released, not left to time out

        result = lg.update(ppo_batch(64))  # the process group is re-formed first
        assert result[ALL_MODULES]["num_env_steps_trained"] == 128
        ranks = learner_weights(lg)
        assert_same_weights(ranks[0], ranks[1])

        # Async failures: raised by the call that collects them, or by the future.
        assert lg.update(ppo_batch(64), async_update=True, timesteps={"fail_all": 1}) == []
        with pytest.raises(RuntimeError, match="probe failure on every learner"):
            lg.drain_async_results()
        future = lg.update_async(ppo_batch(64), timesteps={"fail_rank": 0})
        with pytest.raises(RuntimeError, match="probe failure on rank 0 only"):
            future.result()
        assert lg.update(ppo_batch(64))[ALL_MODULES]["num_env_steps_trained"] == 128
        ranks = learner_weights(lg)
        assert_same_weights(ranks[0], ranks[1])


class NoJoinPPOLearner(PPOTorchLearner):
    """Rank 1 refuses the process group it was given, so the group cannot form."""

    def set_collective(self, collective):
        if collective is not None and collective.rank == 1:
            raise RuntimeError("rank 1 refuses to join")
        super().set_collective(collective)


def test_a_process_group_that_cannot_form_fails_with_a_clear_error(client):
    cfg = config().training(learner_class=NoJoinPPOLearner).cluster(client=client)
    with pytest.raises(ProcessGroupError, match="could not form .* refuses to join"):
        cfg.build_learner_group(spaces=SPACES)
    with config().cluster(client=client).build_learner_group(spaces=SPACES) as lg:  # nothing left behind
        assert lg.update(ppo_batch(32))[ALL_MODULES]["num_env_steps_trained"] == 64


def test_gpu_request_on_a_cpu_cluster_fails_fast_naming_the_resource(client):
    started = time.perf_counter()
    with pytest.raises(ClusterResourceError, match="'GPU'"):
        config().learners(num_gpus_per_learner=1).cluster(client=client).build_learner_group(spaces=SPACES)
    assert time.perf_counter() - started < 10
    # Nothing was left behind: a CPU group still gets both workers.
    with config().cluster(client=client).build_learner_group(spaces=SPACES) as lg:
        assert len(lg.learner_workers) == 2


def test_two_learners_never_share_a_worker_process(group, client):
    with pytest.raises(ClusterResourceError, match="already hosts learner"):
        config(num_learners=1).cluster(client=client).build_learner_group(spaces=SPACES)
    assert group.update(ppo_batch(32))[ALL_MODULES]["num_env_steps_trained"] == 64


# ------------------------------------------------------------------------------ attaching to clusters
def test_attach_by_address_leaves_cluster_and_client_running(cluster, client):
    with config().cluster(address=cluster.scheduler_address).build_learner_group(spaces=SPACES) as lg:
        assert lg.client is not client
        lg.update(ppo_batch(32))
    assert lg.client.status == "closed"  # the group's own client...
    assert cluster.status.name == "running" and client.status == "running"  # ...but not the cluster
    assert len(client.scheduler_info()["workers"]) == 2
    deadline = time.monotonic() + 10  # the scheduler forgets the group's actors once its client left
    while any(lg.group_id in key for key in scheduler_keys(client)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(lg.group_id in key for key in scheduler_keys(client))


def test_attach_by_scheduler_file(cluster, client, tmp_path):
    path = tmp_path / "scheduler.json"
    # What `dask scheduler --scheduler-file` writes. (Client.write_scheduler_file dumps the whole
    # scheduler_info, which fails with a JSON TypeError once workers report tuple-keyed metrics.)
    path.write_text(json.dumps({"type": "Scheduler", "address": cluster.scheduler_address}))
    with config().cluster(scheduler_file=str(path)).build_learner_group(spaces=SPACES) as lg:
        assert lg.update(ppo_batch(32))[ALL_MODULES]["num_env_steps_trained"] == 64
    assert client.status == "running" and len(client.scheduler_info()["workers"]) == 2


@pytest.mark.slow
def test_attach_to_a_scheduler_and_workers_started_from_the_command_line(tmp_path):
    """The HPC way: ``dask scheduler --scheduler-file`` and ``dask worker`` processes."""
    path = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker = [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        "--scheduler-file",
        str(path),
        "--nthreads",
        "1",
        "--no-dashboard",
    ]
    procs = [
        subprocess.Popen(
            dask + ["--scheduler-file", str(path), "--port", "0", "--no-dashboard"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        # Started together, as a batch job starts them: the workers wait for the scheduler file.
        procs += [subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        # The group waits (within learner_startup_timeout_s) for the workers to join.
        with config().cluster(scheduler_file=str(path)).build_learner_group(spaces=SPACES) as lg:
            assert len(set(lg.learner_workers)) == 2
            assert lg.update(ppo_batch(32))[ALL_MODULES]["num_env_steps_trained"] == 64
    finally:
        # The workers first, then their scheduler: a worker whose scheduler is already gone takes
        # seconds to give up on it before it exits.
        for stopping in (procs[1:], procs[:1]):
            for proc in stopping:
                proc.send_signal(signal.SIGINT)
            for proc in stopping:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---------------------------------------------------------------------------- embedded cluster, deaths
def test_shutdown_closes_the_embedded_cluster():
    lg = config(num_learners=1).cluster(cluster_kwargs={"silence_logs": logging.ERROR}).build_learner_group(spaces=SPACES)
    cluster = lg.client.cluster
    assert cluster is not None  # no cluster named: the group started its own
    try:
        assert lg.update(ppo_batch(32))[ALL_MODULES]["num_env_steps_trained"] == 64
        processes = [psutil.Process(pid) for pid in lg.client.run(os.getpid).values()]
    finally:
        lg.shutdown()
    assert cluster.status.name == "closed" and lg.client.status == "closed"
    assert psutil.wait_procs(processes, timeout=10)[1] == [], "worker processes outlived shutdown()"


@pytest.mark.slow
def test_a_dead_worker_makes_calls_fail_fast_naming_the_learner():
    # Three workers: the second group finds two live ones while the nanny restarts the killed one.
    with (
        distributed.LocalCluster(
            n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        pids = client.run(os.getpid)
        cfg = config().training(learner_class=ProbePPOLearner).cluster(client=client)

        # Killed while idle: the next update fails at once.
        with cfg.build_learner_group(spaces=SPACES) as lg:
            lg.update(ppo_batch(32))
            os.kill(pids[lg.learner_workers[1]], signal.SIGKILL)
            started = time.perf_counter()
            with pytest.raises(LearnerDiedError, match=rf"rank 1 .*{lg.learner_workers[1]} is gone"):
                lg.update(ppo_batch(32))
            assert time.perf_counter() - started < 10
            with pytest.raises(LearnerDiedError):
                lg.set_weights(lg.get_weights())  # get_weights reads the survivor; set_weights needs all
        assert client.status == "running"

        # Killed in the middle of an update: the call fails without waiting for the survivor.
        with cfg.build_learner_group(spaces=SPACES) as lg:
            # Asked now: rank 1 may be the worker restarted after the first kill, under a new address.
            pid = client.run(os.getpid, workers=[lg.learner_workers[1]])[lg.learner_workers[1]]
            killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
            killer.start()
            started = time.perf_counter()
            with pytest.raises(LearnerDiedError, match="rank 1"):
                lg.update(ppo_batch(32), timesteps={"sleep_s": 7})
            # The survivor sleeps 7 s in its update; the call ends well before (loaded CI machines included).
            assert time.perf_counter() - started < 5
            killer.join()
            # Shutting the group down waits for the update the survivor is still in: wake it.
            client.run(wake_probes, workers=[lg.learner_workers[0]])


def test_a_two_learner_checkpoint_restores_into_one_dask_learner_and_a_local_one(client, tmp_path):
    path = str(tmp_path / "two-learners")
    with config().cluster(client=client).build_learner_group(spaces=SPACES) as two:
        two.update(ppo_batch(96), timesteps={"num_env_steps_sampled_lifetime": 96})
        two.save_to_path(path)
        saved = two.get_state()
        expected = two.update(ppo_batch(96, seed=5))
    for num_learners in (1, 0):
        with config(num_learners=num_learners).cluster(client=client).build_learner_group(spaces=SPACES) as other:
            other.restore_from_path(path)
            state = other.get_state()[COMPONENT_LEARNER]
            assert_same_weights(state["rl_module"], saved[COMPONENT_LEARNER]["rl_module"])
            assert state["learner_state"] == saved[COMPONENT_LEARNER]["learner_state"]  # counters, RNG, KL coefficient
            result = other.update(ppo_batch(96, seed=5))
            # Same next update, up to the order in which two learners' gradients are summed.
            assert result[DEFAULT_MODULE_ID]["total_loss"] == pytest.approx(expected[DEFAULT_MODULE_ID]["total_loss"], rel=1e-4)
