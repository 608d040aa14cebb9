"""Algorithms: each is a config plus a Learner subclass that overrides a few methods."""

from dlearner.algorithms.appo import APPOConfig, APPOTorchLearner
from dlearner.algorithms.bc import BCConfig, BCTorchLearner
from dlearner.algorithms.impala import IMPALAConfig, IMPALATorchLearner, vtrace
from dlearner.algorithms.ppo import PPOConfig, PPOTorchLearner, compute_gae
from dlearner.algorithms.sac import SACConfig, SACTorchLearner

__all__ = [
    "APPOConfig",
    "APPOTorchLearner",
    "BCConfig",
    "BCTorchLearner",
    "IMPALAConfig",
    "IMPALATorchLearner",
    "PPOConfig",
    "PPOTorchLearner",
    "SACConfig",
    "SACTorchLearner",
    "compute_gae",
    "vtrace",
]
