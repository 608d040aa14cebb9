"""gymnasium spaces as JSON (for specs, configs and checkpoints) and flattened observations."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from dlearner.spaces import (
    flatten_observations,
    observation_row_shape,
    space_from_json,
    space_to_json,
)

SUPPORTED_SPACES = {
    "box-float32-finite": spaces.Box(-1.0, 2.5, (3,), np.float32),
    "box-float32-infinite": spaces.Box(-np.inf, np.inf, (2, 2), np.float32),
    "box-mixed-bounds": spaces.Box(np.array([-np.inf, 0.0, -1.5]), np.array([0.0, np.inf, 1.5]), dtype=np.float64),
    "box-float16": spaces.Box(-1.0, 1.0, (2,), np.float16),
    "box-uint8-image": spaces.Box(0, 255, (4, 4, 3), np.uint8),
    "box-int64": spaces.Box(-(2**40), 2**40, (2,), np.int64),
    "box-bool": spaces.Box(0, 1, (3,), np.bool_),
    "box-scalar": spaces.Box(0.0, 1.0, (), np.float32),
    "discrete": spaces.Discrete(4),
    "discrete-start": spaces.Discrete(3, start=-1),
    "discrete-int32": spaces.Discrete(5, start=7, dtype=np.int32),
    "multidiscrete": spaces.MultiDiscrete([3, 4]),
    "multidiscrete-start": spaces.MultiDiscrete([3, 4], start=[1, -2]),
    "multidiscrete-2d-int32": spaces.MultiDiscrete(np.array([[2, 3], [4, 5]]), dtype=np.int32),
    "multibinary": spaces.MultiBinary(5),
    "multibinary-2d": spaces.MultiBinary([2, 3]),
    "dict-keeps-key-order": spaces.Dict({"zeta": spaces.Box(-1, 1, (2,)), "alpha": spaces.Discrete(3, start=1)}, sort_keys=False),
    "tuple": spaces.Tuple([spaces.Discrete(2), spaces.Box(0, 1, (1,)), spaces.MultiBinary(2)]),
    "nested": spaces.Dict(
        {"pos": spaces.Box(-np.inf, np.inf, (2,)), "inner": spaces.Tuple([spaces.MultiDiscrete([2, 2], start=[5, 5])])}
    ),
}


@pytest.mark.parametrize("space", SUPPORTED_SPACES.values(), ids=SUPPORTED_SPACES.keys())
def test_every_supported_space_round_trips_through_strict_json(space):
    text = json.dumps(space_to_json(space), allow_nan=False)  # strict JSON: no Infinity or NaN literals
    restored = space_from_json(json.loads(text))
    assert restored == space
    assert restored.dtype == space.dtype
    assert str(restored) == str(space)


def test_round_trip_keeps_discrete_start_and_dtype():
    restored = space_from_json(space_to_json(spaces.Discrete(5, start=7, dtype=np.int32)))
    assert (restored.n, restored.start, restored.dtype) == (5, 7, np.dtype(np.int32))


def test_round_trip_keeps_multidiscrete_start():
    restored = space_from_json(space_to_json(spaces.MultiDiscrete([3, 4], start=[1, -2])))
    np.testing.assert_array_equal(restored.start, [1, -2])


def test_round_trip_keeps_dict_key_order():
    space = spaces.Dict({"zeta": spaces.Discrete(2), "alpha": spaces.Discrete(3)}, sort_keys=False)
    assert list(space_from_json(space_to_json(space)).keys()) == ["zeta", "alpha"]


def test_descriptions_of_spaces_older_versions_wrote_are_unchanged():
    # Checkpoints compare stored descriptions with the target's, so these must not change.
    assert space_to_json(spaces.Discrete(2)) == {"type": "Discrete", "n": 2, "start": 0}
    assert space_to_json(spaces.MultiDiscrete([3, 4])) == {"type": "MultiDiscrete", "nvec": [3, 4]}
    assert space_to_json(spaces.Box(-np.inf, 1.0, (2,), np.float32)) == {
        "type": "Box",
        "low": ["-inf", "-inf"],
        "high": [1.0, 1.0],
        "shape": [2],
        "dtype": "float32",
    }


@pytest.mark.parametrize(
    "space",
    [spaces.Text(5), spaces.Sequence(spaces.Discrete(2)), spaces.Dict({"ok": spaces.Discrete(2), "bad": spaces.Text(3)})],
    ids=["text", "sequence", "dict-with-text"],
)
def test_unsupported_spaces_raise_value_error_naming_the_space(space):
    with pytest.raises(ValueError, match="Text|Sequence"):
        space_to_json(space)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"type": "Graph"}, "Unknown space type 'Graph'"),
        ([1, 2], "must be a JSON object"),
        ({"type": "Discrete", "n": "two"}, "'n' must be an integer"),
        ({"type": "Discrete", "n": 0}, "Invalid Discrete"),
        ({"type": "Box", "low": [0.0], "high": [1.0], "shape": [2], "dtype": "float32"}, "flat list of 2 numbers"),
        ({"type": "Box", "low": [0.0], "high": [1.0], "shape": [1], "dtype": "object"}, "not a real numeric dtype"),
        ({"type": "Box", "low": 0.0, "high": 1.0, "shape": [10**9, 10**9], "dtype": "float32"}, "more than"),
        ({"type": "Dict", "spaces": {"a": {"type": "Discrete", "n": 2}}}, "list of \\[key, space\\] pairs"),
    ],
)
def test_malformed_descriptions_raise_value_error_saying_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        space_from_json(data)


def test_deeply_nested_descriptions_are_refused():
    data = {"type": "Discrete", "n": 2}
    for _ in range(100):
        data = {"type": "Tuple", "spaces": [data]}
    with pytest.raises(ValueError, match="deeper than"):
        space_from_json(data)


FLATTENABLE = {
    "dict": spaces.Dict({"b": spaces.Box(-1, 1, (2, 2)), "a": spaces.Discrete(3, start=-1)}),
    "tuple": spaces.Tuple([spaces.MultiDiscrete([2, 3], start=[1, 0]), spaces.MultiBinary(2)]),
    "discrete": spaces.Discrete(4, start=10),
}


@pytest.mark.parametrize("space", FLATTENABLE.values(), ids=FLATTENABLE.keys())
def test_flatten_observations_matches_gymnasium_flatten_row_by_row(space):
    space.seed(0)
    samples = [space.sample() for _ in range(5)]
    batched = gym.vector.utils.concatenate(space, samples, gym.vector.utils.create_empty_array(space, n=5))
    flat = flatten_observations(space, batched)
    assert flat.dtype == np.float32
    assert flat.shape == (5,) + observation_row_shape(space)
    for row, sample in zip(flat, samples):
        np.testing.assert_array_equal(row, spaces.flatten(space, sample).astype(np.float32))


def test_box_observations_keep_their_own_shape():
    assert observation_row_shape(spaces.Box(0, 255, (4, 4, 3), np.uint8)) == (4, 4, 3)


def test_observations_without_a_flat_form_raise_value_error_naming_the_alternative():
    with pytest.raises(ValueError, match="ObservationWrapper"):
        observation_row_shape(spaces.Dict({"text": spaces.Text(4)}))
