"""Tests of the replay buffers (dlearner.replay): the ring of columns, uniform and prioritized
sampling, priorities, states (and their checkpoints), and replay_buffer_config."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict

import fsspec
import numpy as np
import pytest

from dlearner.checkpoint import load_state_tree, save_state_tree
from dlearner.replay import (
    REPLAY_BUFFER_TYPES,
    PrioritizedReplayBuffer,
    ReplayBuffer,
    make_replay_buffer,
    validate_replay_buffer_config,
)


def rows(start: int, stop: int) -> Dict[str, np.ndarray]:
    """Rows numbered ``start .. stop - 1``: each column says which row it is."""
    numbers = np.arange(start, stop)
    return {
        "obs": np.stack([numbers, -numbers], axis=1).astype(np.float32),
        "rewards": numbers.astype(np.float32),
        "terminateds": numbers % 2 == 0,
    }


def held_rewards(buffer: ReplayBuffer) -> list:
    return buffer.gather(np.arange(len(buffer)))["rewards"].tolist()


def make(kind: str, capacity: int = 10, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, seed=seed) if kind == "uniform" else PrioritizedReplayBuffer(capacity, seed=seed)


# ----------------------------------------------------------------------------------------- adding
def test_a_full_buffer_overwrites_its_oldest_rows():
    buffer = ReplayBuffer(5, seed=0)
    buffer.add(rows(0, 3))
    buffer.add(rows(3, 8))
    assert len(buffer) == 5 and buffer.num_added_lifetime == 8
    assert held_rewards(buffer) == [5, 6, 7, 3, 4]  # rows 0..2 were the oldest
    assert buffer.gather(np.array([0]))["obs"].tolist() == [[5, -5]]


def test_an_add_larger_than_capacity_keeps_its_last_rows_as_adding_them_one_by_one_would():
    block, one_by_one = ReplayBuffer(4, seed=0), ReplayBuffer(4, seed=0)
    for buffer in (block, one_by_one):
        buffer.add(rows(0, 3))
    block.add(rows(3, 13))
    for i in range(3, 13):
        one_by_one.add(rows(i, i + 1))
    assert sorted(held_rewards(block)) == [9, 10, 11, 12]
    assert held_rewards(block) == held_rewards(one_by_one)
    assert block.num_added_lifetime == one_by_one.num_added_lifetime == 13


def test_add_copies_the_values_in():
    buffer, new_rows = ReplayBuffer(4), rows(0, 2)
    buffer.add(new_rows)
    new_rows["rewards"][:] = 99
    assert held_rewards(buffer) == [0, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: {k: v for k, v in r.items() if k != "rewards"}, r"missing \['rewards'\]"),
        (lambda r: {**r, "extra": r["rewards"]}, r"unexpected \['extra'\]"),
        (
            lambda r: {**r, "rewards": r["rewards"].astype(np.float64)},
            "Column 'rewards' has dtype float64, the buffer's is float32",
        ),
        (
            lambda r: {**r, "obs": np.zeros((2, 3), np.float32)},
            r"Column 'obs' has rows of shape \(3,\), the buffer's has rows of shape \(2,\)",
        ),
    ],
    ids=["missing column", "extra column", "other dtype", "other row shape"],
)
def test_adds_must_match_the_columns_of_the_first_add(change: Callable, message: str):
    buffer = ReplayBuffer(10)
    buffer.add(rows(0, 2))
    with pytest.raises(ValueError, match=message):
        buffer.add(change(rows(2, 4)))
    assert held_rewards(buffer) == [0, 1]


@pytest.mark.parametrize(
    "columns, message",
    [
        ({}, "non-empty dict"),
        ({"a": np.zeros(2), "b": np.zeros(3)}, "same number of rows"),
        ({"a": np.zeros(0)}, "same number of rows"),
        ({"a": np.array([{}, {}], dtype=object)}, "bool or real numbers"),
        ({"a": np.float32(1.0)}, r"ndim >= 1"),
    ],
    ids=["no columns", "unequal lengths", "no rows", "objects", "a scalar"],
)
def test_add_refuses_what_is_not_rows_of_numbers(columns: dict, message: str):
    buffer = ReplayBuffer(10)
    with pytest.raises(ValueError, match=message):
        buffer.add(columns)
    assert len(buffer) == 0 and buffer.nbytes == 0


def test_nbytes_of_a_million_pendulum_transitions_is_at_most_1_2x_their_raw_bytes():
    pendulum_row = {
        "obs": np.zeros((1, 3), np.float32),
        "new_obs": np.zeros((1, 3), np.float32),
        "actions": np.zeros((1, 1), np.float32),
        "rewards": np.zeros(1, np.float32),
        "terminateds": np.zeros(1, bool),
        "truncateds": np.zeros(1, bool),
        "n_step": np.ones(1, np.uint8),
    }
    raw_bytes = 1_000_000 * sum(column.nbytes for column in pendulum_row.values())
    for buffer in (ReplayBuffer(1_000_000), PrioritizedReplayBuffer(1_000_000)):
        buffer.add(pendulum_row)  # preallocates every row (untouched pages cost no time)
        assert raw_bytes <= buffer.nbytes <= 1.2 * raw_bytes, buffer.buffer_type


# --------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", REPLAY_BUFFER_TYPES)
def test_the_same_seed_and_adds_sample_the_same_rows(kind: str):
    first, second, other_seed = make(kind, seed=7), make(kind, seed=7), make(kind, seed=8)
    for buffer in (first, second, other_seed):
        buffer.add(rows(0, 10))
    batches = [buffer.sample(64) for buffer in (first, second, other_seed)]
    assert all(np.array_equal(batches[0][k], batches[1][k]) for k in batches[0])
    assert not np.array_equal(batches[0]["rewards"], batches[2]["rewards"])


@pytest.mark.parametrize("kind", REPLAY_BUFFER_TYPES)
def test_sampling_an_empty_buffer_raises(kind: str):
    with pytest.raises(ValueError, match="empty; add rows"):
        make(kind).sample_indices(4)


def test_a_sample_is_the_gather_of_its_indices_in_order():
    buffer = ReplayBuffer(10, seed=3)
    buffer.add(rows(0, 10))
    indices, weights = buffer.sample_indices(32)
    assert indices.dtype == np.int64 and indices.shape == (32,) and weights is None
    assert buffer.gather(indices)["rewards"].tolist() == indices.tolist()
    assert buffer.gather(indices[::-1])["rewards"].tolist() == indices[::-1].tolist()


def test_gather_refuses_indices_of_rows_not_held():
    buffer = ReplayBuffer(10)
    buffer.add(rows(0, 4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        buffer.gather(np.array([1, 4]))


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


def test_uniform_sampling_draws_every_row_equally_often():
    buffer = ReplayBuffer(16, seed=1)
    buffer.add(rows(0, 20))  # wrapped around: 16 rows held
    counts = np.bincount(buffer.sample_indices(200_000)[0], minlength=16)
    # 15 degrees of freedom: the statistic exceeds 45 with probability < 1e-4.
    assert chi_square(counts, np.full(16, 1 / 16)) < 45


def test_prioritized_sampling_frequencies_are_proportional_to_priorities():
    buffer = PrioritizedReplayBuffer(4, alpha=1.0, seed=2)
    buffer.add(rows(0, 4))
    buffer.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    frequencies = np.bincount(buffer.sample_indices(200_000)[0], minlength=4) / 200_000
    np.testing.assert_allclose(frequencies, [0.1, 0.2, 0.3, 0.4], atol=0.005)


def test_prioritized_sampling_follows_priorities_across_many_tree_blocks():
    buffer = PrioritizedReplayBuffer(300, alpha=0.5, seed=3)  # 10 blocks of 32 rows; 250 held
    buffer.add(rows(0, 250))
    td_errors = 1.0 + np.arange(250) % 7
    buffer.update_priorities(np.arange(250), td_errors)
    priorities = (td_errors + buffer.epsilon) ** 0.5
    counts = np.bincount(buffer.sample_indices(200_000)[0], minlength=300)
    assert counts[250:].sum() == 0  # rows never added are never drawn
    # 249 degrees of freedom: the statistic exceeds 350 with probability < 1e-4.
    assert chi_square(counts[:250], priorities / priorities.sum()) < 350


def test_prioritized_sampling_with_alpha_zero_is_uniform():
    buffer = PrioritizedReplayBuffer(8, alpha=0.0, seed=4)
    buffer.add(rows(0, 8))
    buffer.update_priorities(np.arange(8), np.arange(8) * 100.0)
    indices, weights = buffer.sample_indices(200_000)
    assert chi_square(np.bincount(indices, minlength=8), np.full(8, 1 / 8)) < 35  # 7 d.o.f., p < 1e-4
    assert (weights == 1).all()


def test_importance_weights_are_n_times_p_to_the_minus_beta_over_their_maximum():
    buffer = PrioritizedReplayBuffer(8, alpha=1.0, beta=0.5, epsilon=1e-6, seed=5)
    buffer.add(rows(0, 4))
    buffer.update_priorities(np.arange(4), np.array([-1.0, 2.0, 3.0, -4.0]))
    priorities = np.array([1.0, 2.0, 3.0, 4.0]) + 1e-6
    n_times_p = 4 * priorities / priorities.sum()
    expected = n_times_p**-0.5 / (n_times_p**-0.5).max()
    indices, weights = buffer.sample_indices(1000)
    assert weights.dtype == np.float32 and set(indices.tolist()) == {0, 1, 2, 3}
    np.testing.assert_allclose(weights, expected[indices], rtol=1e-6)
    batch = buffer.sample(16)
    assert batch["weights"].dtype == np.float32 and ((batch["weights"] > 0) & (batch["weights"] <= 1)).all()


# ------------------------------------------------------------------------------------- priorities
def test_new_rows_get_the_highest_priority_seen():
    buffer = PrioritizedReplayBuffer(8, alpha=1.0, epsilon=1e-6)
    buffer.add(rows(0, 2))
    assert buffer.get_state()["priorities"].tolist() == [1.0, 1.0]
    buffer.update_priorities(np.array([0, 1]), np.array([9.0, 0.5]))
    buffer.add(rows(2, 3))
    np.testing.assert_allclose(buffer.get_state()["priorities"], np.array([9.0, 0.5, 9.0]) + 1e-6, rtol=1e-7)


def test_update_priorities_with_repeated_indices_keeps_the_last_td_error():
    buffer = PrioritizedReplayBuffer(8, alpha=1.0, epsilon=1e-6)
    buffer.add(rows(0, 3))
    buffer.update_priorities(np.array([2, 0, 2, 2]), np.array([5.0, 1.0, 6.0, 3.0]))
    np.testing.assert_allclose(buffer.get_state()["priorities"], [1.0 + 1e-6, 1.0, 3.0 + 1e-6], rtol=1e-7)


def test_non_finite_td_errors_are_refused_and_change_nothing():
    buffer = PrioritizedReplayBuffer(8, seed=6)
    buffer.add(rows(0, 3))
    before = buffer.get_state()
    with pytest.raises(ValueError, match="non-finite TD errors"):
        buffer.update_priorities(np.array([0, 1]), np.array([1.0, np.nan]))
    assert_same_state(buffer.get_state(), before)


def test_update_priorities_refuses_rows_not_held_and_mismatched_td_errors():
    buffer = PrioritizedReplayBuffer(8)
    buffer.add(rows(0, 3))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        buffer.update_priorities(np.array([3]), np.array([1.0]))
    with pytest.raises(ValueError, match="one real TD error per index"):
        buffer.update_priorities(np.array([0, 1]), np.array([1.0]))


def test_a_uniform_buffer_takes_no_priorities():
    buffer = ReplayBuffer(8)
    buffer.add(rows(0, 3))
    with pytest.raises(ValueError, match="Only prioritized replay buffers take priorities"):
        buffer.update_priorities(np.array([0]), np.array([1.0]))


# ------------------------------------------------------------------------------------------ state
def assert_same_state(state: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert isinstance(state, dict) and list(state) == list(expected)
        for key in expected:
            assert_same_state(state[key], expected[key])
    elif isinstance(expected, np.ndarray):
        assert state.dtype == expected.dtype and np.array_equal(state, expected)
    else:
        assert state == expected and type(state) is type(expected)


def used_buffer(kind: str) -> ReplayBuffer:
    """A buffer that has wrapped around, sampled, and (prioritized) learned priorities."""
    buffer = make(kind, capacity=40, seed=11)
    buffer.add(rows(0, 30))
    buffer.add(rows(30, 50))
    indices, _ = buffer.sample_indices(16)
    if kind == "prioritized":
        buffer.update_priorities(indices, np.linspace(-3, 3, 16))
    return buffer


def continue_training(buffer: ReplayBuffer) -> list:
    """What the buffer samples next while rows and priorities keep coming."""
    batches = []
    for step in range(3):
        buffer.add(rows(100 + 10 * step, 110 + 10 * step))
        indices, weights = buffer.sample_indices(32)
        batches.append((indices, weights, buffer.gather(indices)))
        if buffer.buffer_type == "prioritized":
            buffer.update_priorities(indices, np.cos(indices.astype(np.float64)))
    return batches


def assert_same_batches(batches: list, expected: list) -> None:
    for (indices, weights, columns), (want_indices, want_weights, want_columns) in zip(batches, expected):
        assert np.array_equal(indices, want_indices) and np.array_equal(weights, want_weights)
        assert all(np.array_equal(columns[k], want_columns[k]) for k in want_columns)


@pytest.mark.parametrize("kind", REPLAY_BUFFER_TYPES)
def test_a_restored_buffer_samples_exactly_what_the_saved_one_would_have(kind: str):
    saved = used_buffer(kind)
    restored = make(kind, capacity=40, seed=999)  # fresh: never added to, another seed
    restored.set_state(saved.get_state())
    assert len(restored) == len(saved) and restored.num_added_lifetime == saved.num_added_lifetime
    assert_same_batches(continue_training(restored), continue_training(saved))


@pytest.mark.parametrize("kind", REPLAY_BUFFER_TYPES)
def test_a_state_holds_plain_values_and_only_the_rows_held(kind: str):
    buffer = make(kind, capacity=40)
    buffer.add(rows(0, 5))
    state = buffer.get_state()

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return isinstance(value, (np.ndarray, int, float, str, bool))

    assert plain(state)
    assert state["type"] == kind and state["capacity"] == 40 and state["next_index"] == 5
    assert all(len(column) == 5 for column in state["columns"].values())
    state["columns"]["rewards"][:] = -1  # a copy, not a view
    assert held_rewards(buffer) == [0, 1, 2, 3, 4]


def corrupt(state: dict, path: str, value: Any) -> dict:
    """A deep-enough copy of ``state`` with ``value`` at ``path`` ("columns/rewards")."""
    state = {**state, "columns": dict(state["columns"]), "rng": {**state["rng"], "state": dict(state["rng"]["state"])}}
    *parents, key = path.split("/")
    node = state
    for parent in parents:
        node = node[parent]
    node[key] = value(node[key]) if callable(value) else value
    return state


BAD_STATES = {
    "other capacity": ("capacity", 41, "capacity 41, this one has 40"),
    "other type": ("type", "uniform", "'uniform' replay buffer, this one is 'prioritized'"),
    "NaN priority": ("priorities", lambda p: np.where(np.arange(len(p)) == 3, np.nan, p), "finite and > 0"),
    "negative priority": ("priorities", lambda p: -p, "finite and > 0"),
    "one priority too few": ("priorities", lambda p: p[:-1], "array of 40 real numbers"),
    "columns of unequal lengths": ("columns/rewards", lambda c: c[:-1], "different row counts"),
    "next_index out of range": ("next_index", 40, "next_index 40 must be num_added_lifetime % capacity"),
    "object column": ("columns/rewards", lambda c: c.astype(object), "dtype object"),
    "more rows than capacity": ("columns", lambda cs: {k: np.concatenate([c, c]) for k, c in cs.items()}, "do not fit"),
    "unknown key": ("extra", 1, r"unknown keys \['extra'\]"),
    "bad generator state": ("rng/state/state", {"state": "x", "inc": 1}, "no valid PCG64 state"),
    "other generator": ("rng/bit_generator", "MT19937", "is not this buffer's 'PCG64'"),
    "max priority below a priority": ("max_priority", 1e-9, "at least the highest priority"),
    "beta above 1": ("beta", 1.5, r"replay buffer state\['beta'\] must be in \[0, 1\]"),
}


@pytest.mark.parametrize("path, value, message", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_set_state_refuses_a_bad_state_and_changes_nothing(path: str, value: Any, message: str):
    buffer = used_buffer("prioritized")
    bad = corrupt(used_buffer("prioritized").get_state(), path, value)
    before = buffer.get_state()
    with pytest.raises(ValueError, match=message):
        buffer.check_state(bad)
    with pytest.raises(ValueError, match=message):
        buffer.set_state(bad)
    assert_same_state(buffer.get_state(), before)


@pytest.mark.parametrize("location", ["local", "memory"])
@pytest.mark.parametrize("kind", REPLAY_BUFFER_TYPES)
def test_a_state_survives_a_checkpoint_round_trip(kind: str, location: str, tmp_path):
    saved = used_buffer(kind)
    path = str(tmp_path / "ckpt") if location == "local" else f"memory://dlearner-replay-{uuid.uuid4().hex}/ckpt"
    try:
        save_state_tree(path, {"replay_buffer": saved.get_state()}, metadata={"kind": "test"})
        tree, _ = load_state_tree(path)
    finally:
        if location == "memory":
            fsspec.filesystem("memory").rm(path.rsplit("/", 1)[0], recursive=True)
    restored = make(kind, capacity=40)
    restored.set_state(tree["replay_buffer"])
    assert_same_batches(continue_training(restored), continue_training(saved))


# ----------------------------------------------------------------------------------------- config
def test_a_config_is_filled_in_with_the_defaults():
    assert validate_replay_buffer_config(None, train_batch_size=256) == {"type": "uniform", "capacity": 1_000_000}
    assert validate_replay_buffer_config({"type": "prioritized", "capacity": 1000}, train_batch_size=256) == {
        "type": "prioritized",
        "capacity": 1000,
        "alpha": 0.6,
        "beta": 0.4,
        "epsilon": 1e-6,
    }


BAD_CONFIGS = {
    "capacity below the batch": (
        {"capacity": 100},
        r"replay_buffer_config\['capacity'\] is 100, less than train_batch_size \(256\)",
    ),
    "unknown type": ({"type": "ring"}, r"replay_buffer_config\['type'\] must be one of \('uniform', 'prioritized'\)"),
    "unknown key": ({"capacity": 1000, "size": 3}, r"unknown key\(s\) \['size'\]; a 'uniform' buffer takes"),
    "alpha of a uniform buffer": ({"alpha": 0.5}, "belong to type 'prioritized'"),
    "negative alpha": ({"type": "prioritized", "alpha": -0.1}, r"replay_buffer_config\['alpha'\] must be a finite number >= 0"),
    "beta above 1": ({"type": "prioritized", "beta": 1.5}, r"replay_buffer_config\['beta'\] must be in \[0, 1\]"),
    "zero epsilon": ({"type": "prioritized", "epsilon": 0}, r"replay_buffer_config\['epsilon'\] must be > 0"),
    "float capacity": ({"capacity": 1e6}, r"replay_buffer_config\['capacity'\] must be an int"),
    "bool capacity": ({"capacity": True}, r"replay_buffer_config\['capacity'\] must be an int, got True"),
    "not a dict": ([("capacity", 1000)], "replay_buffer_config must be a dict"),
}


@pytest.mark.parametrize("config, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_bad_config_names_the_setting(config: Any, message: str):
    with pytest.raises(ValueError, match=message):
        validate_replay_buffer_config(config, train_batch_size=256)


def test_make_replay_buffer_builds_the_configured_buffer():
    config = validate_replay_buffer_config({"type": "prioritized", "capacity": 500, "alpha": 0.7}, train_batch_size=256)
    buffer = make_replay_buffer(config, seed=3)
    assert isinstance(buffer, PrioritizedReplayBuffer)
    assert (buffer.capacity, buffer.alpha, buffer.beta, buffer.epsilon) == (500, 0.7, 0.4, 1e-6)
    uniform = make_replay_buffer({"type": "uniform", "capacity": 500}, seed=3)
    assert type(uniform) is ReplayBuffer and uniform.capacity == 500
