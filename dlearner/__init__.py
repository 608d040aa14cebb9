"""dlearner: data-parallel reinforcement-learning learners on Dask.

Example::

    import gymnasium as gym
    from dlearner import PPOConfig

    env = gym.make("CartPole-v1")
    learner = PPOConfig().build_learner(env=env)
    learner.build()

The public names below are imported on first use (PEP 562), not with the package: most of them
pull in torch, which takes seconds, and ``dlearner --help`` or a Dask scheduler's
``--preload dlearner.dashboard`` should not pay for that. ``from dlearner import PPOConfig`` works
exactly as an eager import would.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Dict, List

#: The package version; pyproject.toml reads it from here (``dynamic = ["version"]``).
__version__ = "0.1.0"

#: Public name -> the module that defines it. Add a name here and to ``__all__`` to export it.
_EXPORTS: Dict[str, str] = {
    "AlgorithmConfig": "dlearner.config",
    "PPOConfig": "dlearner.algorithms",
    "APPOConfig": "dlearner.algorithms",
    "IMPALAConfig": "dlearner.algorithms",
    "BCConfig": "dlearner.algorithms",
    "SACConfig": "dlearner.algorithms",
    "Callbacks": "dlearner.callbacks",
    "MultiAgentEnv": "dlearner.multi_agent.env",
    "Learner": "dlearner.learner",
    "TorchLearner": "dlearner.learner",
    "LearnerGroup": "dlearner.learner_group",
    "RLModule": "dlearner.rl_module",
    "MultiRLModule": "dlearner.rl_module",
    "RLModuleSpec": "dlearner.rl_module",
    "MultiRLModuleSpec": "dlearner.rl_module",
    "Columns": "dlearner.columns",
    "DEFAULT_MODULE_ID": "dlearner.columns",
    "ALL_MODULES": "dlearner.columns",
    "COMPONENT_LEARNER": "dlearner.columns",
    "COMPONENT_RL_MODULE": "dlearner.columns",
    "COMPONENT_OPTIMIZER": "dlearner.columns",
}

__all__ = [
    "AlgorithmConfig",
    "PPOConfig",
    "APPOConfig",
    "IMPALAConfig",
    "BCConfig",
    "SACConfig",
    "Callbacks",
    "MultiAgentEnv",
    "Learner",
    "TorchLearner",
    "LearnerGroup",
    "RLModule",
    "MultiRLModule",
    "RLModuleSpec",
    "MultiRLModuleSpec",
    "Columns",
    "DEFAULT_MODULE_ID",
    "ALL_MODULES",
    "COMPONENT_LEARNER",
    "COMPONENT_RL_MODULE",
    "COMPONENT_OPTIMIZER",
]

if TYPE_CHECKING:  # static type checkers and IDEs see ordinary imports
    from dlearner.algorithms import APPOConfig, BCConfig, IMPALAConfig, PPOConfig, SACConfig
    from dlearner.callbacks import Callbacks
    from dlearner.columns import (
        ALL_MODULES,
        COMPONENT_LEARNER,
        COMPONENT_OPTIMIZER,
        COMPONENT_RL_MODULE,
        DEFAULT_MODULE_ID,
        Columns,
    )
    from dlearner.config import AlgorithmConfig
    from dlearner.learner import Learner, TorchLearner
    from dlearner.learner_group import LearnerGroup
    from dlearner.multi_agent.env import MultiAgentEnv
    from dlearner.rl_module import MultiRLModule, MultiRLModuleSpec, RLModule, RLModuleSpec


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule such as ``dlearner.checkpoint``) on first access."""
    module_name = _EXPORTS.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(module_name), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # ``import dlearner; dlearner.checkpoint.read_metadata(...)`` worked when the eager imports
        # happened to load the submodule; keep it working.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted({*globals(), *__all__})
