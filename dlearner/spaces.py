"""JSON descriptions of gymnasium spaces, so specs and checkpoints never need pickle."""

from __future__ import annotations

from typing import Any, Dict

import gymnasium as gym
import numpy as np


def space_to_json(space: gym.Space) -> Dict[str, Any]:
    """Describe a ``Box``, ``Discrete``, ``MultiDiscrete`` or ``MultiBinary`` space as JSON."""
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "low": _floats_to_json(space.low),
            "high": _floats_to_json(space.high),
            "shape": list(space.shape),
            "dtype": str(space.dtype),
        }
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    raise ValueError(f"Cannot describe space {space} as JSON; supported: Box, Discrete, MultiDiscrete, MultiBinary.")


def space_from_json(data: Dict[str, Any]) -> gym.Space:
    """Inverse of :func:`space_to_json`."""
    kind = data.get("type")
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        shape = tuple(data["shape"])
        low = np.array(_floats_from_json(data["low"]), dtype=dtype).reshape(shape)
        high = np.array(_floats_from_json(data["high"]), dtype=dtype).reshape(shape)
        return gym.spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
    if kind == "Discrete":
        return gym.spaces.Discrete(data["n"], start=data.get("start", 0))
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(data["nvec"])
    if kind == "MultiBinary":
        return gym.spaces.MultiBinary(data["n"])
    raise ValueError(f"Unknown space description {data!r}.")


def _floats_to_json(array: np.ndarray) -> list:
    # Strict JSON has no Infinity/NaN, and unbounded Box spaces are common: write those as strings.
    flat = [v if np.isfinite(v) else str(v) for v in array.astype(np.float64).ravel().tolist()]
    return flat


def _floats_from_json(values: list) -> list:
    return [float(v) for v in values]
