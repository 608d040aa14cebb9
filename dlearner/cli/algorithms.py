"""The algorithms ``dlearner train --algo`` can train, and configs rebuilt from a checkpoint's settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Tuple

if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig

#: Algorithms ``dlearner train --algo`` can train on an environment: name -> ``(module, config class)``,
#: imported when a run starts. BC learns from a fixed dataset (offline), so it has no place here; add
#: online algorithms as they are written. ``cli.TRAINABLE_ALGORITHMS`` gives name -> config class.
ALGORITHMS: Dict[str, Tuple[str, str]] = {
    "PPO": ("dlearner.algorithms", "PPOConfig"),
    "APPO": ("dlearner.algorithms", "APPOConfig"),
    "IMPALA": ("dlearner.algorithms", "IMPALAConfig"),
    "SAC": ("dlearner.algorithms", "SACConfig"),
}


def algorithm_classes() -> Dict[str, Callable[[], "AlgorithmConfig"]]:
    """Name -> config class of every trainable algorithm (imports them)."""
    import importlib

    return {name: getattr(importlib.import_module(module), cls) for name, (module, cls) in ALGORITHMS.items()}


def algo_name(config: "AlgorithmConfig") -> str:
    """The ``--algo`` name of ``config`` (its class name without ``Config`` for other algorithms)."""
    for name, factory in algorithm_classes().items():
        if type(config) is factory:
            return name
    return type(config).__name__.removesuffix("Config")


def config_from_dict(data: Mapping[str, Any]) -> "AlgorithmConfig":
    """Rebuild a config from ``AlgorithmConfig.to_dict()`` output (see :meth:`AlgorithmConfig.from_dict`)."""
    from dlearner.config import AlgorithmConfig

    return AlgorithmConfig.from_dict(data)
