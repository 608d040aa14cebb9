"""Actor calls' arguments as Dask serializes them (``dlearner.backends.dask.rpc``)."""

from __future__ import annotations

import numpy as np
from distributed.protocol import deserialize, serialize, to_serialize

from dlearner.backends.dask.fragments import WeightsRef
from dlearner.backends.dask.rpc import Whole


def test_an_argument_travels_in_one_piece_and_arrives_as_itself():
    # A sample request's fragment ids: Dask would pickle each of them on its own, with a header each.
    ids = list(range(40))
    header, frames = serialize(to_serialize(Whole(ids)))
    assert "is-collection" not in header and len(frames) == 1
    assert deserialize(header, frames) == ids
    header, frames = serialize(to_serialize(ids))  # what call_actor sent before
    assert header["is-collection"] and len(frames) == 40


def test_arrays_in_an_argument_keep_frames_of_their_own_and_arrive_writeable():
    weights = {"default_policy": {"pi.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}}
    value = (weights, WeightsRef("tcp://127.0.0.1:1", "learner-0", 3), None)
    header, frames = serialize(to_serialize(Whole(value)))
    assert len(frames) == 2  # the pickle, and the array's data out of band (no copy into the pickle)
    arrived = deserialize(header, frames)
    array = arrived[0]["default_policy"]["pi.0.weight"]
    np.testing.assert_array_equal(array, weights["default_policy"]["pi.0.weight"])
    assert array.flags.writeable
    assert arrived[1:] == value[1:]
