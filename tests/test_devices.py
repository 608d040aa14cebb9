"""The GPU path's decisions, checked on CPU: every function takes the facts it depends on.

Where does each learner rank compute, how many learners share a GPU, when is NCCL used, when are
batches copied through pinned memory, and why learner state is always plain CPU numpy.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL, ppo_batch

from dlearner import COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE, PPOConfig
from dlearner.backends.dask import cluster
from dlearner.devices import (
    choose_backend,
    device_facts,
    device_for_rank,
    gpu_packing,
    host_transfer,
)
from dlearner.errors import ClusterResourceError


def gpu(host: str, index: int, gpu_id: str, nccl: bool = True) -> dict:
    """Device facts as a learner on ``cuda:index`` of ``host`` reports them."""
    return {"host": host, "device": f"cuda:{index}", "gpu_id": gpu_id, "nccl_available": nccl}


# --------------------------------------------------------------------------- device of each rank
def test_cpu_learners_compute_on_the_cpu_on_any_cluster():
    assert device_for_rank(0, 0, embedded=True, visible_gpus=4) == "cpu"
    assert device_for_rank(3, 0.0, embedded=False, visible_gpus=0) == "cpu"


def test_whole_gpus_on_the_embedded_cluster_give_each_rank_its_own_device():
    assert [device_for_rank(r, 1, embedded=True, visible_gpus=4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_two_gpus_per_learner_start_each_rank_on_the_first_of_its_pair():
    assert [device_for_rank(r, 2, embedded=True, visible_gpus=4) for r in range(2)] == ["cuda:0", "cuda:2"]


def test_half_a_gpu_puts_two_ranks_on_each_device():
    devices = [device_for_rank(r, 0.5, embedded=True, visible_gpus=2) for r in range(4)]
    assert devices == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_a_fraction_that_does_not_divide_one_packs_whole_learners_per_gpu():
    # 0.3 GPU each: three learners fit on a GPU (0.9 of it), the fourth goes to the next GPU.
    devices = [device_for_rank(r, 0.3, embedded=True, visible_gpus=2) for r in range(4)]
    assert devices == ["cuda:0", "cuda:0", "cuda:0", "cuda:1"]


def test_a_rank_beyond_the_visible_gpus_is_refused_rather_than_doubled_up():
    with pytest.raises(ClusterResourceError, match="rank 2 .* 2 visible CUDA device"):
        device_for_rank(2, 1, embedded=True, visible_gpus=2)
    with pytest.raises(ClusterResourceError, match="GPU index 1"):
        device_for_rank(0, 2, embedded=True, visible_gpus=1)


def test_attached_clusters_leave_the_gpu_to_the_worker():
    # dask-cuda and CUDA_VISIBLE_DEVICES give each worker its GPU as device 0: the learner uses it.
    assert device_for_rank(5, 1, embedded=False, visible_gpus=0) is None
    assert device_for_rank(1, 0.5, embedded=False, visible_gpus=0) is None


@pytest.mark.parametrize("bad", [-1, 1.5, 2.25, float("nan"), float("inf"), "1", True])
def test_impossible_gpu_counts_are_refused_with_a_message(bad):
    with pytest.raises(ValueError, match="num_gpus_per_learner"):
        device_for_rank(0, bad, embedded=True, visible_gpus=8)


def test_the_embedded_cluster_device_follows_the_same_rules():
    class Embedded:
        cluster = object()

    class Attached:
        cluster = None

    assert cluster.device_for(1, 0, Embedded()) == "cpu"
    assert cluster.device_for(1, 1, Attached()) is None
    # This machine has no GPU: an embedded rank asking for one is refused with the reason.
    with pytest.raises(ClusterResourceError, match="0 visible CUDA device"):
        cluster.device_for(0, 1, Embedded())


# -------------------------------------------------------------------------------- GPU packing
def test_packing_counts_learners_per_gpu_and_gpus_needed():
    assert (gpu_packing(0.5).learners_per_gpu, gpu_packing(0.5).gpus_needed(3)) == (2, 2)
    assert (gpu_packing(0.25).learners_per_gpu, gpu_packing(0.25).gpus_needed(8)) == (4, 2)
    assert (gpu_packing(0.1).learners_per_gpu, gpu_packing(0.1).gpus_needed(10)) == (10, 1)
    assert (gpu_packing(1 / 3).learners_per_gpu, gpu_packing(1 / 3).gpus_needed(3)) == (3, 1)
    assert (gpu_packing(0.3).learners_per_gpu, gpu_packing(0.3).gpus_needed(4)) == (3, 2)
    assert (gpu_packing(1).learners_per_gpu, gpu_packing(1).gpus_needed(4)) == (1, 4)
    assert (gpu_packing(2).gpus_per_rank, gpu_packing(2).gpus_needed(3)) == (2, 6)
    assert gpu_packing(0.5).shares_gpus and not gpu_packing(1).shares_gpus
    assert gpu_packing(0.5).gpus_needed(0) == 0


def test_packing_needs_a_positive_gpu_count():
    with pytest.raises(ValueError, match="CPU"):
        gpu_packing(0)


# ------------------------------------------------------------------------------- NCCL or gloo
def test_cpu_and_fractional_learners_use_gloo_without_asking_the_learners():
    assert choose_backend(0).backend == "gloo"
    choice = choose_backend(0.5)
    assert choice.backend == "gloo" and "share GPUs" in choice.reason and not choice.fell_back


def test_learners_each_on_their_own_gpu_use_nccl():
    facts = [gpu("node-a", 0, "GPU-aaa"), gpu("node-a", 1, "GPU-bbb"), gpu("node-b", 0, "GPU-ccc")]
    assert choose_backend(1, facts).backend == "nccl"


def test_two_ranks_on_one_gpu_never_use_nccl():
    # Two workers that both see the same physical GPU as cuda:0 (no CUDA_VISIBLE_DEVICES split).
    choice = choose_backend(1, [gpu("node-a", 0, "GPU-aaa"), gpu("node-a", 0, "GPU-aaa")])
    assert choice.backend == "gloo" and choice.fell_back
    assert "ranks 0 and 1" in choice.reason and "GPU-aaa" in choice.reason


def test_the_same_device_index_on_different_gpus_is_not_a_conflict():
    # CUDA_VISIBLE_DEVICES=0 and =1: both workers say cuda:0, but the GPUs differ.
    assert choose_backend(1, [gpu("node-a", 0, "GPU-aaa"), gpu("node-a", 0, "GPU-bbb")]).backend == "nccl"


def test_gloo_when_a_learner_is_on_the_cpu_lacks_nccl_or_cannot_name_its_gpu():
    on_cpu = {"host": "node-a", "device": "cpu", "gpu_id": None, "nccl_available": True}
    assert "rank(s) [1]" in choose_backend(1, [gpu("node-a", 0, "GPU-aaa"), on_cpu]).reason
    no_nccl = choose_backend(1, [gpu("node-a", 0, "GPU-aaa"), gpu("node-a", 1, "GPU-bbb", nccl=False)])
    assert no_nccl.backend == "gloo" and "no NCCL" in no_nccl.reason
    unknown = choose_backend(1, [gpu("node-a", 0, "GPU-aaa"), gpu("node-a", 1, None)])
    assert unknown.backend == "gloo" and "identify" in unknown.reason
    assert choose_backend(1, []).backend == "gloo"


def test_device_facts_of_a_cpu_learner():
    facts = device_facts("cpu")
    assert facts["host"] == socket.gethostname() and facts["device"] == "cpu" and facts["gpu_id"] is None
    assert isinstance(facts["nccl_available"], bool)
    assert choose_backend(1, [facts, facts]).backend == "gloo"


# ------------------------------------------------------------------------- host → device copies
def test_pinned_non_blocking_copies_only_towards_an_available_cuda_device():
    assert host_transfer("cuda", True).pin_memory and host_transfer("cuda", True).non_blocking
    for device_type, available in (("cpu", True), ("cpu", False), ("cuda", False), ("meta", True)):
        plan = host_transfer(device_type, available)
        assert not plan.pin_memory and not plan.non_blocking


def test_a_cpu_learner_converts_batches_without_pinning(cartpole):
    learner = PPOConfig().rl_module(model_config=SMALL_MODEL).build_learner(env=cartpole)
    learner.build()
    tensors = learner._to_tensors({"default_policy": ppo_batch(16)})["default_policy"].columns
    assert all(t.device.type == "cpu" and not t.is_pinned() for t in tensors.values())


# ------------------------------------------------------------------------ state is CPU numpy
def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def test_learner_state_is_plain_cpu_numpy_whatever_the_device(cartpole):
    learner = PPOConfig().training(minibatch_size=32).rl_module(model_config=SMALL_MODEL).build_learner(env=cartpole)
    learner.build()
    learner.update(ppo_batch(64))
    state = learner.get_state()
    assert set(state) >= {COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER}
    leaves = list(_leaves(state))
    assert not any(isinstance(v, torch.Tensor) for v in leaves)
    assert any(isinstance(v, np.ndarray) for v in leaves)
    assert all(isinstance(v, (np.ndarray, str, int, float, bool, type(None))) for v in leaves)
    # A snapshot: changing the live parameters leaves the returned state alone.
    before = {k: v.copy() for k, v in state[COMPONENT_RL_MODULE]["default_policy"].items()}
    learner.update(ppo_batch(64, seed=1))
    assert all(np.array_equal(before[k], v) for k, v in state[COMPONENT_RL_MODULE]["default_policy"].items())
