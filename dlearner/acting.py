"""One RLModule acting in environments: observations in, actions (and what the learners need) out.

Both env runners (single- and multi-agent) act through :class:`ActingModule`, so observation
flattening, sampling, values and the action values an env receives are written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch

from dlearner.columns import Columns
from dlearner.rl_module import RLModule, RLModuleSpec
from dlearner.spaces import check_flattenable, flatten_observations, needs_flattening


def module_input(obs: Any) -> torch.Tensor:
    """Observations as a module takes them: ``uint8`` as they are (the module scales them, see
    :func:`dlearner.conv_encoder.observations_as_float`), any other dtype as float32."""
    array = np.asarray(obs)
    return torch.from_numpy(array if array.dtype == np.uint8 else array.astype(np.float32, copy=False))


class Actions(NamedTuple):
    """What one forward pass gives for a batch of observations."""

    actions: torch.Tensor
    logp: torch.Tensor
    dist_inputs: torch.Tensor
    vf_preds: Optional[torch.Tensor]  # None for a module without a value function


class ActingModule:
    """An :class:`RLModule` built from ``spec``, in eval mode, acting on observations of its spaces.

    Example::

        acting = ActingModule(spec, seed=0)
        out = acting.act(acting.prepare_batch(observations), generator=rng)
        env_actions = acting.env_actions(out.actions)
    """

    def __init__(self, spec: RLModuleSpec, *, seed: Optional[int] = None):
        self.observation_space: gym.Space = spec.observation_space
        self.action_space: gym.Space = spec.action_space
        self.flatten = needs_flattening(spec.observation_space)
        if self.flatten:
            check_flattenable(spec.observation_space)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            # Inference-only: what acting needs (e.g. SAC's policy without its Q networks), and
            # ``RLModule.set_state`` still takes a whole module's weights.
            self.module: RLModule = dataclasses.replace(spec, inference_only=True).build()
        self.module.eval()
        self._is_box = isinstance(spec.action_space, gym.spaces.Box)

    def prepare_batch(self, obs: Any) -> np.ndarray:
        """A batch of observations (a vector env's) as the module takes them (flattened unless the space is a Box)."""
        if self.flatten:
            return flatten_observations(self.observation_space, obs)
        return np.asarray(obs)

    def prepare_one(self, obs: Any) -> np.ndarray:
        """One observation as the module takes it."""
        if self.flatten:
            return np.asarray(gym.spaces.flatten(self.observation_space, obs), dtype=np.float32)
        return np.asarray(obs)

    def stack(self, observations: Sequence[Any]) -> np.ndarray:
        """Single observations (of several envs or agents) as one batch."""
        return np.stack([self.prepare_one(o) for o in observations])

    @torch.no_grad()
    def act(self, obs: np.ndarray, *, explore: bool = True, generator: Optional[torch.Generator] = None) -> Actions:
        """Sample (``explore``) or take the greedy action for each row of ``obs``."""
        out = self.module.forward_train({Columns.OBS: module_input(obs)})
        inputs = out[Columns.ACTION_DIST_INPUTS]
        dist = self.module.get_exploration_action_dist_cls().from_logits(inputs)
        actions = dist.sample(generator=generator) if explore else dist.deterministic_sample()
        return Actions(actions, dist.logp(actions), inputs, out.get(Columns.VF_PREDS))

    @torch.no_grad()
    def values(self, obs: np.ndarray) -> np.ndarray:
        """V(s) of each row of ``obs``."""
        compute_values = getattr(self.module, "compute_values", None)
        if compute_values is None:
            raise ValueError(f"{type(self.module).__name__} has no compute_values(); PPO needs a value function.")
        return compute_values({Columns.OBS: module_input(obs)}).numpy()

    def env_actions(self, actions: torch.Tensor) -> np.ndarray:
        """The values the env receives: a Box action clipped to its bounds (the learner trains on the
        sampled one), a Discrete action as the env's values (the distribution already adds ``start``)."""
        actions = actions.numpy()
        if self._is_box:
            return np.clip(actions, self.action_space.low, self.action_space.high)
        return actions.astype(self.action_space.dtype, copy=False)
