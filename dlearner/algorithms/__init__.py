"""Algorithms: each is a config plus a Learner subclass that overrides a few methods."""

from dlearner.algorithms.bc import BCConfig, BCTorchLearner
from dlearner.algorithms.ppo import PPOConfig, PPOTorchLearner, compute_gae

__all__ = ["BCConfig", "BCTorchLearner", "PPOConfig", "PPOTorchLearner", "compute_gae"]
