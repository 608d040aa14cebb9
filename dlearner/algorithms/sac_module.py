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
networks and the temperature exactly; env runners act with ``pi`` alone (an inference-only module)
and are sent only its weights.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import gymnasium as gym
import torch
from torch import nn

from dlearner.columns import Columns
from dlearner.conv_encoder import ConvEncoder, is_image_space
from dlearner.distributions import TorchSquashedGaussian
from dlearner.rl_module import RLModule, _mlp, _obs_dim, encoded_input


class DefaultSACRLModule(RLModule):
    """SAC's networks (see the module docstring); ``model_config``'s ``fcnet_hiddens`` and
    ``fcnet_activation`` size the policy and each Q network alike. Built with ``inference_only=True``
    (as env runners build it) it holds ``pi`` alone, a fifth of the weights to send them."""

    inference_only_parts = ("pi",)

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
        self.pi = _Network(self.observation_space, cfg, 0, self.action_dist_cls.required_input_dim(space), 0.01)
        if self.inference_only:
            return  # env runners act with the policy alone
        action_inputs = 0 if self.is_discrete else self.action_dim
        q_out = self.num_actions if self.is_discrete else 1
        self.qf1 = _Network(self.observation_space, cfg, action_inputs, q_out, 1.0)
        self.qf2 = _Network(self.observation_space, cfg, action_inputs, q_out, 1.0)
        self.qf1_target = _frozen_copy(self.qf1)
        self.qf2_target = _frozen_copy(self.qf2)
        self.log_alpha = nn.Parameter(torch.zeros(()))

    # -- acting ---------------------------------------------------------------------------------
    def forward_train(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The policy's ``action_dist_inputs`` for ``batch["obs"]`` (what acting and the policy loss need)."""
        return {Columns.ACTION_DIST_INPUTS: self.pi(batch[Columns.OBS])}

    # -- what the losses ask ---------------------------------------------------------------------
    def policy_inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """``action_dist_inputs`` of observations (e.g. the next observations of the Q target)."""
        return self.pi(obs)

    def q_values(self, obs: torch.Tensor, actions: torch.Tensor = None, *, target: bool = False):
        """``(Q1, Q2)``: for a Box, Q of ``actions`` (the env's values), one per row; for Discrete,
        all actions' values, ``(rows, n)``. ``target=True`` asks the target networks."""
        qf1, qf2 = (self.qf1_target, self.qf2_target) if target else (self.qf1, self.qf2)
        if self.is_discrete:
            return qf1(obs), qf2(obs)
        dist = self.action_dist_cls
        scaled = (actions.reshape(actions.shape[0], -1) - dist.center.to(obs.device)) / dist.scale.to(obs.device)
        return qf1(obs, scaled).squeeze(-1), qf2(obs, scaled).squeeze(-1)

    def target_pairs(self):
        """``[(target network, network), ...]`` for the polyak update."""
        return [(self.qf1_target, self.qf1), (self.qf2_target, self.qf2)]


class _Network(nn.Module):
    """One of SAC's networks: observations (through a conv encoder of its own for images, else
    flattened), with the actions appended for a Box's Q networks, into ``fcnet_hiddens`` and a head."""

    def __init__(self, observation_space: gym.Space, model_config, action_inputs: int, out_dim: int, out_gain: float):
        super().__init__()
        self.conv = ConvEncoder(observation_space, model_config) if is_image_space(observation_space) else None
        in_dim = self.conv.out_dim if self.conv is not None else _obs_dim(observation_space)
        self.mlp = _mlp(
            in_dim + action_inputs, model_config["fcnet_hiddens"], model_config["fcnet_activation"], out_dim, out_gain
        )

    def forward(self, obs: torch.Tensor, actions: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = encoded_input(obs, self.conv)
        return self.mlp(x if actions is None else torch.cat([x, actions], dim=-1))


def _frozen_copy(network: nn.Module) -> nn.Module:
    target = copy.deepcopy(network)
    for param in target.parameters():
        param.requires_grad_(False)
    return target
