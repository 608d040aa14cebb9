"""Behaviour cloning: maximise the log-likelihood of the demonstrated actions.

This is also the example of a custom Learner: one method, the loss, on top of :class:`TorchLearner`.
"""

from __future__ import annotations

import torch

from dlearner.columns import Columns
from dlearner.config import AlgorithmConfig
from dlearner.learner import TorchLearner


class BCTorchLearner(TorchLearner):
    """``loss = -mean(log pi(a_demo | s))``."""

    required_columns = (Columns.OBS, Columns.ACTIONS)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        dist_cls = self.module[module_id].get_train_action_dist_cls()
        dist = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        return -torch.mean(dist.logp(batch[Columns.ACTIONS]))


class BCConfig(AlgorithmConfig):
    """Config of behaviour cloning from a batch of ``obs`` and ``actions``.

    Example::

        learner = BCConfig().training(lr=1e-3).build_learner(env=env)
        learner.build()
        learner.update({Columns.OBS: obs, Columns.ACTIONS: expert_actions})
    """

    default_learner_class = BCTorchLearner

    def __init__(self) -> None:
        super().__init__()
        self.lr = 1e-3
        self.minibatch_size = 256
        self.num_epochs = 1
