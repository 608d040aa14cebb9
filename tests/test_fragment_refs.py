"""IMPALA / APPO with Dask learners and env runners: the driver out of the data path (issue 20).

Fragments stay on the env runner that sampled them; the driver queues references (ids, rows, env
steps, module, weights version) and each learner fetches its shard straight from the runners'
workers. The shards and layouts are exactly those the driver would have cut from the fragments'
columns, runners forget fragments once their update ended (or the driver dropped them), and a lost
runner's fragments count as dropped without stopping the run. The weights, too, stay off the
driver: learner rank 0 keeps each broadcast version and the runners pull it from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

import numpy as np
import pytest
from conftest import SMALL_MODEL, kill_worker, killable_cluster, wait_for_workers

from dlearner import DEFAULT_MODULE_ID, APPOConfig, Columns, learner_ops
from dlearner.algorithms.appo import APPOTorchLearner
from dlearner.algorithms.async_pipeline import AsyncPipeline, FragmentRef, _Fragment, fragment_shards
from dlearner.backends.dask.fragments import FragmentsLostError, WeightsRef, assemble_shard
from dlearner.batch import ShardInfo, shard_batch, validate_batch
from dlearner.envs import MultiAgentCartPole

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FRAGMENT_LENGTH = 10


# ------------------------------------------------------------------ the shards: a pure function
def random_fragments(rng, module_ids, count, multi_agent):
    """``count`` fragments of random columns (and, multi-agent, random padding), modules interleaved."""
    fragments, stored = [], {}
    for i in range(count):
        module_id = module_ids[rng.integers(len(module_ids))]
        columns = {
            Columns.OBS: rng.normal(size=(FRAGMENT_LENGTH, 4)).astype(np.float32),
            Columns.REWARDS: rng.normal(size=FRAGMENT_LENGTH).astype(np.float32),
        }
        mask = None
        if multi_agent:
            mask = np.ones(FRAGMENT_LENGTH, bool)
            mask[rng.integers(1, FRAGMENT_LENGTH + 1) :] = False
            columns[Columns.LOSS_MASK] = mask
        runner_key = f"env-runner-{i % 3}"
        stored[(runner_key, i)] = columns
        ref = FragmentRef(runner_key, f"tcp://worker-{i % 3}", i, FRAGMENT_LENGTH, mask)
        fragments.append(_Fragment(columns, 0, i % 3, module_id, float(FRAGMENT_LENGTH), ref=ref))
    return fragments, stored


def payload_batch(fragments):
    """The train batch the driver makes of the fragments' columns (AsyncPipeline._batch_of)."""
    by_module = {}
    for fragment in fragments:
        by_module.setdefault(fragment.module_id, []).append(fragment.columns)
    return {mid: {c: np.concatenate([f[c] for f in frags]) for c in frags[0]} for mid, frags in by_module.items()}


def assert_same_layout(a: ShardInfo, b: ShardInfo):
    assert a.row_offsets == b.row_offsets and a.global_rows == b.global_rows
    assert a.global_loss_masks.keys() == b.global_loss_masks.keys()
    for mid, mask in a.global_loss_masks.items():
        np.testing.assert_array_equal(mask, b.global_loss_masks[mid])


@pytest.mark.parametrize("multi_agent", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_referenced_shards_are_exactly_those_the_driver_cuts_from_the_batch(multi_agent, world, seed):
    rng = np.random.default_rng(seed)
    module_ids = ["p0", "p1"] if multi_agent else [DEFAULT_MODULE_ID]
    # Any fragment count: a fault-tolerant group may run with fewer learners than the batch was made for.
    fragments, stored = random_fragments(rng, module_ids, int(rng.integers(1, 13)), multi_agent)
    batch = payload_batch(fragments)
    expected = [(batch, ShardInfo.whole(batch))] if world == 1 else shard_batch(batch, world)
    got = fragment_shards(fragments, world)
    assert len(got) == world
    for (shard, layout), (sources, pieces, info) in zip(expected, got):
        assembled = assemble_shard(stored, pieces)
        assert list(assembled) == list(shard)  # the same modules, in the same order
        for mid, columns in shard.items():
            assert list(assembled[mid]) == list(columns)
            for column, array in columns.items():
                np.testing.assert_array_equal(assembled[mid][column], array)
        assert_same_layout(info, layout)
        assert set(sources) == {key for ps in pieces.values() for key, _, _, _ in ps}


def test_fragments_lost_error_travels_pickled_with_the_runners_it_names():
    import cloudpickle

    err = cloudpickle.loads(cloudpickle.dumps(FragmentsLostError("gone", ["env-runner-0-x"])))
    assert isinstance(err, FragmentsLostError) and str(err) == "gone" and err.runner_keys == ["env-runner-0-x"]


# ------------------------------------------------------------------------- on Dask actors
@pytest.fixture(scope="module")
def client():
    # Two learners, two env runners; a killed worker is restarted by its nanny.
    with killable_cluster(4) as client:
        yield client


def _digest(batch, shard) -> str:
    digest = hashlib.sha256()
    for mid, columns in batch.items():
        digest.update(mid.encode())
        for column, array in columns.items():
            digest.update(f"{column}{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(repr((sorted(shard.row_offsets.items()), sorted(shard.global_rows.items()))).encode())
    for mid, mask in sorted(shard.global_loss_masks.items()):
        digest.update(mid.encode() + np.asarray(mask).tobytes())
    return digest.hexdigest()


class RecordingAPPOLearner(APPOTorchLearner):
    """APPO that records a digest of every shard it trains on (after validating it, as update does)."""

    def update(self, batch, timesteps=None, *, shard=None, **kwargs):
        recorded = self.__dict__.setdefault("recorded", [])
        recorded.append(_digest(validate_batch(batch, self.batch_specs()) if batch else {}, shard))
        return super().update(batch, timesteps, shard=shard, **kwargs)


class SleepyAPPOLearner(APPOTorchLearner):
    """APPO whose updates take a while: sample references pile up in the queue and in flight."""

    def update(self, batch, timesteps=None, **kwargs):
        time.sleep(0.3)
        return super().update(batch, timesteps, **kwargs)


def appo(client, **training):
    return (
        APPOConfig()
        .environment("CartPole-v1")
        .rl_module(model_config=SMALL_MODEL)
        .env_runners(num_env_runners=1, num_envs_per_env_runner=2, rollout_fragment_length=FRAGMENT_LENGTH)
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .training(train_batch_size=40, min_time_s_per_iteration=None, **training)
        .cluster(client=client)
        .debugging(seed=5)
    )


def recorded_shards(config, fragment_refs: bool, iterations: int = 4):
    with config.build_algo() as algo:
        algo._pipeline = AsyncPipeline(algo, fragment_refs=fragment_refs)
        for _ in range(iterations):
            algo.train()
        algo._pipeline.finish_updates()
        return algo.learner_group.foreach_learner(lambda learner: list(learner.recorded))


def test_learners_train_on_the_same_shards_whether_the_driver_carries_fragments_or_references(client):
    # The runner never gets new weights, so it samples the same fragments whatever the timing, and
    # train batches take the oldest fragments: both paths must feed every learner the same shards.
    config = appo(client, learner_class=RecordingAPPOLearner, broadcast_interval=10_000)
    payload = recorded_shards(config, fragment_refs=False)
    refs = recorded_shards(config, fragment_refs=True)
    assert len(payload) == len(refs) == 2
    for rank in range(2):
        common = min(len(payload[rank]), len(refs[rank]))
        assert common >= 4
        assert refs[rank][:common] == payload[rank][:common], f"rank {rank}"
    assert payload[0][:common] != payload[1][:common]  # each rank trained its own shard


def stored_fragments(algo):
    return algo.env_runner_group._all("num_stored_fragments", [()] * algo.env_runner_group.num_runners)


def test_runners_forget_fragments_once_trained_or_dropped_and_the_driver_gets_references_only(client):
    config = appo(client).env_runners(num_env_runners=2)
    with config.build_algo() as algo:
        pipeline = algo.pipeline
        assert pipeline.fragment_refs
        bound = (int(config.learner_queue_size) + config.resolved_max_requests_in_flight() + 2) * pipeline.fragments_per_batch
        held = []
        for _ in range(15):
            result = algo.train()
            held.append(max(stored_fragments(algo)))
            assert all(f.columns is None and f.ref is not None for f in pipeline._queue)
        assert max(held) <= bound, held
        assert result["num_env_steps_dropped_lifetime"] == 0
        assert result["num_env_steps_trained_lifetime"] >= 15 * 40
        # A restore drops what the old weights sampled: the runners forget it with their next request.
        algo.learner_group.set_weights(algo.learner_group.get_weights())
        algo.pipeline.finish_updates()
        algo.pipeline.reset_after_restore()
        result = algo.train()
        assert max(stored_fragments(algo)) <= bound


def test_a_killed_env_runner_costs_its_fragments_counted_as_dropped_never_the_run(client):
    config = (
        appo(client, learner_class=SleepyAPPOLearner)
        .env_runners(num_env_runners=2)
        .learners(num_learners=1)
        .fault_tolerance(restart_failed_env_runners=True)
    )
    algo = config.build_algo()
    try:
        before = algo.train()
        # Updates are slow: the queue and the updates in flight hold references to both runners' fragments.
        kill_worker(client, algo.env_runner_group.workers[0])
        results = [algo.train() for _ in range(4)]
        last = results[-1]
        assert last["num_env_runner_restarts"] == 1
        assert last["num_env_steps_dropped_lifetime"] > 0
        assert last["num_env_steps_trained_lifetime"] > before["num_env_steps_trained_lifetime"]
        assert all(r["num_learner_updates"] >= 1 for r in results)
    finally:
        algo.stop()
    wait_for_workers(client, 4)


def test_multi_agent_fragments_with_padding_and_a_frozen_module_travel_as_references(client):
    config = (
        APPOConfig()
        .environment(MultiAgentCartPole, env_config={"num_agents": 2})
        .multi_agent(
            policies={"p0", "p1"},
            policy_mapping_fn=lambda agent_id, episode, **kwargs: f"p{agent_id[-1]}",
            policies_to_train=["p0"],
        )
        .rl_module(model_config=SMALL_MODEL)
        .env_runners(num_env_runners=1, num_envs_per_env_runner=2, rollout_fragment_length=FRAGMENT_LENGTH)
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .training(train_batch_size=60, min_time_s_per_iteration=None)
        .cluster(client=client)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        assert algo.pipeline.fragment_refs
        before = algo.learner_group.get_weights(["p1"])
        results = [algo.train() for _ in range(4)]
        after = algo.learner_group.get_weights(["p1"])
        # p1's fragments are never queued, and its runner forgets them with its next request.
        assert all(f.module_id == "p0" for f in algo.pipeline._queue)
        assert max(stored_fragments(algo)) <= 4 * algo.pipeline.fragments_per_batch * 2
    last = results[-1]
    assert "p0" in last["learners"] and "p1" not in last["learners"]
    assert 0 < last["num_env_steps_trained_lifetime"] <= last["num_env_steps_sampled_lifetime"]
    assert last["num_env_steps_dropped_lifetime"] == 0
    for name, value in before["p1"].items():
        np.testing.assert_array_equal(value, after["p1"][name])


# --------------------------------------------------------------------- weights by reference
def runner_weights(algo):
    return algo.env_runner_group._all("get_weights", [()] * algo.env_runner_group.num_runners)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for mid in a:
        assert a[mid].keys() == b[mid].keys()
        for name in a[mid]:
            np.testing.assert_array_equal(a[mid][name], b[mid][name], err_msg=f"{mid}/{name}")


def test_runners_pull_each_weights_version_from_rank_0_and_the_driver_receives_only_its_number(client):
    config = appo(client).env_runners(num_env_runners=2)
    with config.build_algo() as algo:
        pipeline = algo.pipeline
        assert pipeline.fragment_refs and pipeline.weights_refs
        for _ in range(4):
            result = algo.train()
        pipeline.finish_updates()
        # Weights never came to the driver: it holds where version k is kept, and the version number.
        assert pipeline._weights is None
        ref = pipeline._weights_ref
        assert ref.version == pipeline._weights_version == pipeline._num_updates_requested  # broadcast_interval=1
        assert (ref.worker, ref.learner_key) == (algo.learner_group.learner_workers[0], algo.learner_group.learner_keys[0])
        assert result["weights_version"] > 0 and result["num_weights_pulls_failed_lifetime"] == 0
        assert 0 <= result["policy_lag_mean"] <= result["policy_lag_max"]
        # No update in flight: version k is the learners' weights now, and a runner that pulls it acts with them.
        group = algo.env_runner_group
        assert group._all("load_weights_ref", [(ref,)] * group.num_runners) == [None, None]
        learner_weights = algo.learner_group.get_weights()
        for weights in runner_weights(algo):
            assert_same_weights(weights, learner_weights)
        # A runner already acting with version k does not pull it again; the learner keeps only the newest few.
        assert group._all("load_weights_ref", [(dataclasses.replace(ref, learner_key="no-such-learner"),)] * 2) == [None, None]
        old = dataclasses.replace(ref, version=ref.version - learner_ops.KEPT_WEIGHTS_VERSIONS)
        errors = group._all("load_weights_ref", [(old,)] * 2)
        assert all("WeightsVersionGoneError" in e for e in errors), errors


def test_a_failed_weights_pull_leaves_the_runner_on_its_weights_and_is_logged_and_counted(client, caplog):
    # No broadcast of its own (broadcast_interval is huge): the only weights the runners are sent
    # are a reference to a learner that does not exist.
    config = appo(client, broadcast_interval=10_000).env_runners(num_env_runners=2)
    with config.build_algo() as algo:
        pipeline = algo.pipeline
        algo.train()
        before = runner_weights(algo)
        worker = algo.learner_group.learner_workers[0]
        pipeline._weights_ref = WeightsRef(worker, "learner-that-was-replaced", 1)
        pipeline._weights_version = 1
        with caplog.at_level(logging.WARNING, logger="dlearner.algorithms.async_pipeline"):
            results = [algo.train() for _ in range(2)]
            # A runner may still be sampling after a request that carried the reference (its pull
            # failed, but its reply is not in yet): train until every such reply was received.
            for _ in range(10):
                if all(version != 1 for _, version, _ in pipeline._sampling.values()):
                    break
                results.append(algo.train())
        # Each runner sent the reference before the driver forgot it (after the first failure) tried
        # once: one or both, depending on which replies came first.
        failed = results[-1]["num_weights_pulls_failed_lifetime"]
        assert failed in (1, 2)
        assert pipeline._weights_ref is None
        assert sum("could not pull weights version 1" in r.getMessage() for r in caplog.records) == failed
        # The runners sampled with the weights they had (version 0): the policy lag counts from there.
        assert pipeline._runner_versions == [0, 0]
        for weights, had in zip(runner_weights(algo), before):
            assert_same_weights(weights, had)
        assert results[-1]["policy_lag_max"] >= results[-1]["num_learner_updates"]
        assert results[-1]["num_env_steps_trained_lifetime"] > 0


def test_losing_the_learner_that_keeps_the_weights_never_stops_the_runners(client):
    config = (
        appo(client)
        .env_runners(num_env_runners=1)
        .fault_tolerance(restart_failed_learners=True)
        .learners(num_learners=2, learner_startup_timeout_s=60)
    )
    algo = config.build_algo()
    try:
        before = algo.train()
        lost = algo.learner_group.learner_workers[0]
        kill_worker(client, lost)  # rank 0 keeps the weights the runner is about to pull
        results = [algo.train() for _ in range(4)]
        last = results[-1]
        assert last["num_learner_restarts"] == 1
        assert last["num_env_steps_trained_lifetime"] > before["num_env_steps_trained_lifetime"]
        assert all(r["num_learner_updates"] >= 1 for r in results)
        pipeline = algo.pipeline
        pipeline.finish_updates()
        assert pipeline._weights_ref.worker != lost and pipeline._weights_ref.worker in algo.learner_group.learner_workers
        assert pipeline._runner_versions[0] > 0
    finally:
        algo.stop()
    wait_for_workers(client, 4)
