"""Shared fixtures: small environments, batches and learners that make tests fast on 2 cores."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from dlearner import Columns

torch.set_num_threads(1)

SMALL_MODEL = {"fcnet_hiddens": [32, 32]}


@pytest.fixture
def cartpole():
    env = gym.make("CartPole-v1")
    yield env
    env.close()


def ppo_batch(rows: int = 256, seed: int = 0, obs_dim: int = 4, num_actions: int = 2) -> dict:
    """A synthetic but well-formed PPO training batch for CartPole-shaped spaces."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=0.1, size=(rows, num_actions)).astype(np.float32)
    actions = rng.integers(0, num_actions, size=rows)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return {
        Columns.OBS: rng.normal(size=(rows, obs_dim)).astype(np.float32),
        Columns.ACTIONS: actions,
        Columns.ACTION_DIST_INPUTS: logits,
        Columns.ACTION_LOGP: log_probs[np.arange(rows), actions].astype(np.float32),
        Columns.ADVANTAGES: rng.normal(size=rows).astype(np.float32),
        Columns.VALUE_TARGETS: rng.normal(size=rows).astype(np.float32),
    }


@pytest.fixture
def batch():
    return ppo_batch()
