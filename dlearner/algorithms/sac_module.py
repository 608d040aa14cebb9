"""SAC's default RL module: a policy network, twin Q networks, their target copies and ``log_alpha``.

* ``pi``: observations to ``action_dist_inputs``: ``[mean, log_std]`` of a tanh-squashed Gaussian
  rescaled to the bounds of a ``Box`` action space, or the logits of a categorical for ``Discrete``.
* ``qf1``, ``qf2``: Q(s, a). For a ``Box`` they take the observation and the action (rescaled to
  [-1, 1]) and give one value; for ``Discrete(n)`` they take the observation and give n values, one
  per action, so the losses can take exact expectations over actions (Christodoulou 2019).
* ``qf1_target``, ``qf2_target``: lagged copies of the Q networks (no gradients), moved towards them
  by polyak averaging after every update (:class:`~dlearner.algorithms.sac.SACTorchLearner`).
* ``log_alpha``: the temperature's logarithm, trained by its own optimizer.

Everything is part of the module's weights, so checkpoints, rollbacks and restores carry the target
networks and the temperature exactly; env runners act with ``pi`` alone.
"""

from __future__ import annotations

import copy
from typing import Dict

import gymnasium as gym
import torch
from torch import nn

from dlearner.columns import Columns
from dlearner.distributions import TorchSquashedGaussian
from dlearner.rl_module import RLModule, _mlp, _obs_dim


class DefaultSACRLModule(RLModule):
    """SAC's networks (see the module docstring); ``model_config``'s ``fcnet_hiddens`` and
    ``fcnet_activation`` size the policy and each Q network alike."""

    def setup(self) -> None:
        space = self.action_space
        self.is_discrete = isinstance(space, gym.spaces.Discrete)
        if self.is_discrete:
            self.num_actions = int(space.n)
        elif isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
            self.action_dist_cls = TorchSquashedGaussian.for_space(space)  # refuses unbounded boxes
            self.action_dim = int(space.shape[0])
        else:
            raise ValueError(
                f"SAC handles Box (1-D, bounded) and Discrete action spaces, not {space}; for MultiDiscrete or "
                "Tuple actions use PPO, APPO or IMPALA, or flatten the actions into one Discrete or Box."
            )
        cfg = self.model_config
        hiddens, act = cfg["fcnet_hiddens"], cfg["fcnet_activation"]
        obs_dim = _obs_dim(self.observation_space)
        self.pi = _mlp(obs_dim, hiddens, act, self.action_dist_cls.required_input_dim(space), 0.01)
        q_in, q_out = (obs_dim, self.num_actions) if self.is_discrete else (obs_dim + self.action_dim, 1)
        self.qf1 = _mlp(q_in, hiddens, act, q_out, 1.0)
        self.qf2 = _mlp(q_in, hiddens, act, q_out, 1.0)
        self.qf1_target = _frozen_copy(self.qf1)
        self.qf2_target = _frozen_copy(self.qf2)
        self.log_alpha = nn.Parameter(torch.zeros(()))

    # -- acting ---------------------------------------------------------------------------------
    def _flat_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], -1).float()

    def forward_train(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The policy's ``action_dist_inputs`` for ``batch["obs"]`` (what acting and the policy loss need)."""
        return {Columns.ACTION_DIST_INPUTS: self.pi(self._flat_obs(batch[Columns.OBS]))}

    # -- what the losses ask ---------------------------------------------------------------------
    def policy_inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """``action_dist_inputs`` of observations (e.g. the next observations of the Q target)."""
        return self.pi(self._flat_obs(obs))

    def q_values(self, obs: torch.Tensor, actions: torch.Tensor = None, *, target: bool = False):
        """``(Q1, Q2)``: for a Box, Q of ``actions`` (the env's values), one per row; for Discrete,
        all actions' values, ``(rows, n)``. ``target=True`` asks the target networks."""
        qf1, qf2 = (self.qf1_target, self.qf2_target) if target else (self.qf1, self.qf2)
        x = self._flat_obs(obs)
        if self.is_discrete:
            return qf1(x), qf2(x)
        dist = self.action_dist_cls
        scaled = (actions.reshape(actions.shape[0], -1) - dist.center.to(x.device)) / dist.scale.to(x.device)
        x = torch.cat([x, scaled], dim=-1)
        return qf1(x).squeeze(-1), qf2(x).squeeze(-1)

    def target_pairs(self):
        """``[(target network, network), ...]`` for the polyak update."""
        return [(self.qf1_target, self.qf1), (self.qf2_target, self.qf2)]


def _frozen_copy(network: nn.Module) -> nn.Module:
    target = copy.deepcopy(network)
    for param in target.parameters():
        param.requires_grad_(False)
    return target
