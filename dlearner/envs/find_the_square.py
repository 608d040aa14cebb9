"""``FindTheSquare``: a small image task that only a policy looking at the pixels can solve.

Each step shows a dark, noisy ``size`` x ``size`` image (``uint8``, ``channels`` channels) with one
bright square somewhere in it; the agent says in which half the square lies (action 0: left,
1: right) and gets reward 1 when right, 0 when wrong. An episode lasts ``episode_len`` steps (10
by default), each with a new image, so a random policy's return is about ``episode_len / 2`` and a
perfect one's is ``episode_len``. The square's side and the noise change from image to image, so a
network has to learn "where is the bright blob", not one pixel. A CNN learns it in a few thousand
env steps (tests and ``benchmarks/image_learning.py``).

Example::

    from dlearner import PPOConfig
    from dlearner.envs import FindTheSquare

    config = PPOConfig().environment(FindTheSquare, env_config={"size": 42})

From the command line: ``dlearner train --env dlearner.envs:FindTheSquare``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import gymnasium as gym
import numpy as np


class FindTheSquare(gym.Env):
    """``env_config``: ``size`` (42: a default CNN exists for 42, 64 and 84), ``channels`` (1),
    ``episode_len`` (10)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, config: Optional[Dict[str, Any]] = None, render_mode: Optional[str] = None):
        config = dict(config or {})
        render_mode = config.pop("render_mode", render_mode)  # as creators get it (evaluate's GIF)
        self.size = int(config.pop("size", 42))
        self.channels = int(config.pop("channels", 1))
        self.episode_len = int(config.pop("episode_len", 10))
        if config:
            raise ValueError(f"Unknown FindTheSquare setting(s) {sorted(config)}; use size, channels, episode_len.")
        if self.size < 8 or self.channels < 1 or self.episode_len < 1:
            raise ValueError("FindTheSquare needs size >= 8, channels >= 1 and episode_len >= 1.")
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, self.channels), np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self.render_mode = render_mode
        self._image = np.zeros(self.observation_space.shape, np.uint8)
        self._right = False
        self._steps = 0

    def _draw(self) -> np.ndarray:
        rng = self.np_random
        image = rng.integers(0, 40, self.observation_space.shape, dtype=np.uint8)  # dark noise
        side = int(rng.integers(max(2, self.size // 10), max(3, self.size // 4) + 1))
        top = int(rng.integers(0, self.size - side + 1))
        # Entirely in one half: the answer is never ambiguous.
        half = self.size // 2
        self._right = bool(rng.integers(2))
        left = int(rng.integers(half, self.size - side + 1)) if self._right else int(rng.integers(0, half - side + 1))
        image[top : top + side, left : left + side] = rng.integers(200, 256, dtype=np.uint8)
        self._image = image
        return image

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._steps = 0
        return self._draw(), {}

    def step(self, action):
        reward = float(int(action) == int(self._right))
        self._steps += 1
        terminated = self._steps >= self.episode_len  # the task is over: nothing follows to bootstrap from
        return self._draw(), reward, terminated, False, {}

    def render(self) -> np.ndarray:
        """The current image as RGB (``render_mode="rgb_array"``)."""
        gray = self._image if self.channels == 1 else self._image.mean(axis=-1, keepdims=True).astype(np.uint8)
        return np.repeat(gray[..., :1], 3, axis=-1)
