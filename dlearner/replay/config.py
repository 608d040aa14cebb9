"""``replay_buffer_config``: its settings checked and filled in, and the buffer built from it.

A config is a dict such as ``{"type": "uniform", "capacity": 1_000_000}`` or ``{"type": "prioritized",
"capacity": 1_000_000, "alpha": 0.6, "beta": 0.4, "epsilon": 1e-6}``; missing keys take those defaults
(``type`` defaults to ``"uniform"``). Each bad setting raises a ``ValueError`` that names it as
``replay_buffer_config['capacity']`` and says what to change.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from dlearner.replay.buffer import ReplayBuffer
from dlearner.replay.prioritized import PrioritizedReplayBuffer
from dlearner.validation import non_negative, positive, positive_int, unit_interval

REPLAY_BUFFER_TYPES = ("uniform", "prioritized")

# Each type's settings, their defaults and checks (the same checks the buffers' constructors make).
_SETTINGS = {
    "uniform": {"capacity": (1_000_000, positive_int)},
    "prioritized": {
        "capacity": (1_000_000, positive_int),
        "alpha": (0.6, non_negative),
        "beta": (0.4, unit_interval),
        "epsilon": (1e-6, positive),
    },
}
_BUFFER_CLASSES = {"uniform": ReplayBuffer, "prioritized": PrioritizedReplayBuffer}


def validate_replay_buffer_config(config: Optional[Mapping[str, Any]], *, train_batch_size: int) -> Dict[str, Any]:
    """``config`` checked and with every key filled in (``None``: the uniform default).

    The capacity must hold at least one train batch (``train_batch_size`` rows).
    """
    normalised = _normalise(config)
    train_batch_size = positive_int("train_batch_size", train_batch_size)
    if normalised["capacity"] < train_batch_size:
        raise ValueError(
            f"replay_buffer_config['capacity'] is {normalised['capacity']}, less than train_batch_size "
            f"({train_batch_size}); raise the capacity (1_000_000 is usual) or lower train_batch_size."
        )
    return normalised


def make_replay_buffer(config: Mapping[str, Any], *, seed: Optional[int]) -> ReplayBuffer:
    """The buffer ``config`` describes (see :func:`validate_replay_buffer_config`), seeded with ``seed``."""
    settings = _normalise(config)
    kind = settings.pop("type")
    return _BUFFER_CLASSES[kind](**settings, seed=seed)


def _normalise(config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(
            f"replay_buffer_config must be a dict such as {{'type': 'uniform', 'capacity': 1_000_000}}, got {config!r:.100}."
        )
    kind = config.get("type", "uniform")
    if kind not in REPLAY_BUFFER_TYPES:
        raise ValueError(f"replay_buffer_config['type'] must be one of {REPLAY_BUFFER_TYPES}, got {kind!r:.100}.")
    settings = _SETTINGS[kind]
    unknown = [key for key in config if key != "type" and key not in settings]
    if unknown:
        hint = " (alpha, beta and epsilon belong to type 'prioritized')" if kind == "uniform" else ""
        raise ValueError(
            f"replay_buffer_config has unknown key(s) {unknown!r:.200}; a {kind!r} buffer takes {['type', *settings]}{hint}."
        )
    normalised: Dict[str, Any] = {"type": kind}
    for name, (default, check) in settings.items():
        normalised[name] = check(f"replay_buffer_config[{name!r}]", config.get(name, default))
    return normalised
