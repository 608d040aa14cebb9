"""Gymnasium spaces as dlearner sees them: JSON descriptions and flattened observations.

JSON descriptions (:func:`space_to_json`, :func:`space_from_json`) let specs, configs and checkpoints
hold spaces without pickle. They keep everything that defines a space (bounds, shape, ``dtype``,
``start``, the order of ``Dict`` keys); optional fields at their default value are left out, so a
space that older versions could already describe still has the same description.

Observation spaces other than ``Box`` (``Dict``, ``Tuple``, ``Discrete``, ``MultiDiscrete``,
``MultiBinary``) reach modules flattened, as gymnasium's ``spaces.flatten`` / ``FlattenObservation``
would flatten them: one float32 vector per observation (one-hot for discrete parts). Env runners
flatten what they sample; :func:`flatten_observations` does the same for your own inference code.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import gymnasium as gym
import numpy as np

from dlearner.validation import is_int, is_real

#: Largest number of elements a described Box may have (checkpoints are untrusted input).
MAX_SPACE_ELEMENTS = 1 << 24
#: Deepest nesting of Dict/Tuple spaces accepted from a description.
MAX_SPACE_DEPTH = 32

_SUPPORTED = "Box, Discrete, MultiDiscrete, MultiBinary, and Dict/Tuple of these"
_DEFAULT_INT = np.dtype(np.int64)


# ------------------------------------------------------------------------------------------ JSON
def space_to_json(space: gym.Space) -> Dict[str, Any]:
    """Describe ``space`` as JSON-serialisable data; :func:`space_from_json` rebuilds an equal space.

    Supported: ``Box`` (any numeric dtype, infinite bounds written as ``"inf"``/``"-inf"``),
    ``Discrete`` and ``MultiDiscrete`` (with ``start`` and ``dtype``), ``MultiBinary``, and
    ``Dict``/``Tuple`` of these (``Dict`` keeps its key order). Anything else raises ``ValueError``.
    """
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "low": _bounds_to_json(space.low),
            "high": _bounds_to_json(space.high),
            "shape": list(space.shape),
            "dtype": str(space.dtype),
        }
    if isinstance(space, gym.spaces.Discrete):
        out: Dict[str, Any] = {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
        if space.dtype != _DEFAULT_INT:
            out["dtype"] = str(space.dtype)
        return out
    if isinstance(space, gym.spaces.MultiDiscrete):
        out = {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
        if np.any(space.start != 0):
            out["start"] = space.start.tolist()
        if space.dtype != _DEFAULT_INT:
            out["dtype"] = str(space.dtype)
        return out
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": [[key, space_to_json(sub)] for key, sub in space.spaces.items()]}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_json(sub) for sub in space.spaces]}
    raise ValueError(
        f"Cannot describe the space {space!r} ({type(space).__name__}) as JSON; supported: {_SUPPORTED}. "
        "Wrap the environment so that it uses one of these (for example with a gymnasium ObservationWrapper)."
    )


def space_from_json(data: Any) -> gym.Space:
    """Inverse of :func:`space_to_json`. A malformed description raises ``ValueError`` saying what is wrong."""
    return _space_from_json(data, depth=0)


def _space_from_json(data: Any, depth: int) -> gym.Space:
    if depth > MAX_SPACE_DEPTH:
        raise ValueError(f"Space description nests Dict/Tuple spaces deeper than {MAX_SPACE_DEPTH} levels.")
    if not isinstance(data, dict):
        raise ValueError(f"A space description must be a JSON object, got {type(data).__name__}.")
    kind = data.get("type")
    try:
        if kind == "Box":
            dtype = _dtype(data, default=None)
            shape = _shape(data.get("shape"))
            low = _bounds_from_json(data.get("low"), shape, dtype, "low")
            high = _bounds_from_json(data.get("high"), shape, dtype, "high")
            return gym.spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
        if kind == "Discrete":
            return gym.spaces.Discrete(
                _int(data.get("n"), "n"), start=_int(data.get("start", 0), "start"), dtype=_dtype(data, _DEFAULT_INT)
            )
        if kind == "MultiDiscrete":
            nvec = _int_array(data.get("nvec"), "nvec")
            start = _int_array(data["start"], "start") if "start" in data else None
            return gym.spaces.MultiDiscrete(nvec, start=start, dtype=_dtype(data, _DEFAULT_INT))
        if kind == "MultiBinary":
            n = data.get("n")
            return gym.spaces.MultiBinary(_int(n, "n") if not isinstance(n, list) else list(_shape(n)))
        if kind == "Dict":
            pairs = data.get("spaces")
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs
            ):
                raise ValueError("a Dict description needs 'spaces': a list of [key, space] pairs")
            return gym.spaces.Dict([(key, _space_from_json(sub, depth + 1)) for key, sub in pairs])
        if kind == "Tuple":
            subs = data.get("spaces")
            if not isinstance(subs, list):
                raise ValueError("a Tuple description needs 'spaces': a list of spaces")
            return gym.spaces.Tuple([_space_from_json(sub, depth + 1) for sub in subs])
    except (AssertionError, TypeError, ValueError, OverflowError) as err:
        # gymnasium checks its arguments with asserts; a bad description must still end in ValueError.
        raise ValueError(f"Invalid {kind} space description {_short(data)}: {err}") from err
    raise ValueError(f"Unknown space type {kind!r} in {_short(data)}; dlearner describes {_SUPPORTED}.")


def _short(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 200 else text[:200] + "..."


def _int(value: Any, name: str) -> int:
    if not is_int(value):
        raise ValueError(f"{name!r} must be an integer, got {value!r}")
    return int(value)


def _int_array(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name!r} must be a (nested) list of integers")
    if array.size > MAX_SPACE_ELEMENTS:
        raise ValueError(f"{name!r} has {array.size} elements, more than {MAX_SPACE_ELEMENTS}")
    return array


def _shape(value: Any) -> Tuple[int, ...]:
    if not isinstance(value, list) or not all(is_int(v) and v >= 0 for v in value):
        raise ValueError(f"'shape' must be a list of non-negative integers, got {value!r}")
    shape = tuple(int(v) for v in value)  # Python ints: their product cannot overflow
    if math.prod(shape) > MAX_SPACE_ELEMENTS:
        raise ValueError(f"shape {value} has more than {MAX_SPACE_ELEMENTS} elements")
    return shape


def _dtype(data: Dict[str, Any], default: Any) -> np.dtype:
    if "dtype" not in data:
        if default is None:
            raise ValueError("'dtype' is missing")
        return np.dtype(default)
    name = data["dtype"]
    if not isinstance(name, str):
        raise ValueError(f"'dtype' must be a string such as 'float32', got {name!r}")
    try:
        dtype = np.dtype(name)
    except TypeError as err:
        raise ValueError(f"'dtype' {name!r} is not a numpy dtype") from err
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"'dtype' {name!r} is not a real numeric dtype")
    return dtype


def _bounds_to_json(array: np.ndarray) -> list:
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return [int(v) for v in array.ravel().tolist()]
    # Strict JSON has no Infinity/NaN, and unbounded Box spaces are common: write those as strings.
    return [v if math.isfinite(v) else str(v) for v in array.astype(np.float64).ravel().tolist()]


def _bounds_from_json(values: Any, shape: Tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != math.prod(shape):
        raise ValueError(f"{name!r} must be a flat list of {math.prod(shape)} numbers (one per element of {shape})")
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        if not all(is_real(v) and float(v).is_integer() for v in values):
            raise ValueError(f"{name!r} of a {dtype} Box must hold integers")
        return np.array([int(v) for v in values], dtype=dtype).reshape(shape)
    floats = []
    for v in values:
        if isinstance(v, str) and v in ("inf", "-inf", "nan"):
            floats.append(float(v))
        elif is_real(v):
            floats.append(float(v))
        else:
            raise ValueError(f"{name!r} holds {v!r}; bounds are numbers or 'inf'/'-inf'")
    return np.array(floats, dtype=np.float64).astype(dtype).reshape(shape)


# ------------------------------------------------------------------------------- flattening
def needs_flattening(space: gym.Space) -> bool:
    """Whether observations of ``space`` reach modules flattened (every space but ``Box``)."""
    return not isinstance(space, gym.spaces.Box)


def check_flattenable(space: gym.Space, what: str = "Observation space") -> None:
    """Raise ``ValueError`` unless ``space`` is a Box or can be flattened to one vector."""
    if isinstance(space, (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)):
        return
    if isinstance(space, gym.spaces.Dict):
        for sub in space.spaces.values():
            check_flattenable(sub, what)
        return
    if isinstance(space, gym.spaces.Tuple):
        for sub in space.spaces:
            check_flattenable(sub, what)
        return
    raise ValueError(
        f"{what} {space!r} contains a {type(space).__name__} space, which has no fixed-size flat form; "
        f"dlearner flattens {_SUPPORTED}. Wrap the environment with a gymnasium ObservationWrapper that maps "
        "observations to one of these, or write an RLModule subclass (and env runner) for it."
    )


def observation_row_shape(space: gym.Space) -> Tuple[int, ...]:
    """Shape of one row of the ``obs`` column: a Box's own shape, else ``(flatdim,)`` of the flattened space."""
    if isinstance(space, gym.spaces.Box):
        return tuple(space.shape)
    check_flattenable(space)
    return (int(gym.spaces.flatdim(space)),)


def flatten_observations(space: gym.Space, observations: Any) -> np.ndarray:
    """Flatten a batch of observations of ``space`` into a float32 array of shape ``(batch, flatdim)``.

    ``observations`` is batched as a gymnasium vector env returns it (arrays with a leading batch
    axis; a dict of such arrays for ``Dict``, a tuple for ``Tuple``). Each row equals
    ``gymnasium.spaces.flatten(space, obs)``, as ``FlattenObservation`` produces it.

    Example::

        flat = flatten_observations(env.observation_space, {"pos": pos[None], "goal": goal[None]})
        module.forward_inference({Columns.OBS: torch.from_numpy(flat)})
    """
    check_flattenable(space)
    return _flatten_batch(space, observations).astype(np.float32, copy=False)


def _flatten_batch(space: gym.Space, obs: Any) -> np.ndarray:
    if isinstance(space, gym.spaces.Box):
        obs = np.asarray(obs)
        return obs.reshape(obs.shape[0], -1)
    if isinstance(space, gym.spaces.Discrete):
        index = np.asarray(obs, dtype=np.int64).reshape(-1) - int(space.start)
        return _one_hot(index, int(space.n))
    if isinstance(space, gym.spaces.MultiDiscrete):
        obs = np.asarray(obs, dtype=np.int64)
        index = (obs - space.start).reshape(obs.shape[0], -1)
        nvec = space.nvec.reshape(-1)
        return np.concatenate([_one_hot(index[:, j], int(n)) for j, n in enumerate(nvec)], axis=1)
    if isinstance(space, gym.spaces.MultiBinary):
        obs = np.asarray(obs)
        return obs.reshape(obs.shape[0], -1)
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([_flatten_batch(sub, obs[key]) for key, sub in space.spaces.items()], axis=1)
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate([_flatten_batch(sub, part) for sub, part in zip(space.spaces, obs)], axis=1)
    raise ValueError(f"Cannot flatten observations of {space!r}.")  # check_flattenable ran first


def _one_hot(index: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(index), n), dtype=np.float32)
    out[np.arange(len(index)), index] = 1.0
    return out
