"""dlearner: data-parallel reinforcement-learning learners on Dask.

Example::

    import gymnasium as gym
    from dlearner import PPOConfig

    env = gym.make("CartPole-v1")
    learner = PPOConfig().build_learner(env=env)
    learner.build()
"""

from dlearner.algorithms import BCConfig, PPOConfig
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
from dlearner.rl_module import MultiRLModule, MultiRLModuleSpec, RLModule, RLModuleSpec

__version__ = "0.1.0"

__all__ = [
    "AlgorithmConfig",
    "PPOConfig",
    "BCConfig",
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
