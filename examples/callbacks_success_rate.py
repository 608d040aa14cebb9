"""Callbacks: a success rate from each episode's last ``info``, reported with every training result.

Goal-reaching environments say in ``info["is_success"]`` whether an episode reached its goal. Here
the goal is CartPole's pole still up after 200 steps: a small wrapper says so when an episode ends,
and a :class:`dlearner.Callbacks` subclass logs it; ``result["env_runners"]["success_rate"]`` is
then the success rate over the last ``metrics_num_episodes_for_smoothing`` episodes of all env
runners (in this process, or in Dask env-runner actors with ``--num-env-runners``).

Run: python examples/callbacks_success_rate.py [--iterations N] [--num-env-runners M]
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List

import gymnasium as gym

from dlearner import Callbacks, PPOConfig


class SuccessInfo(gym.Wrapper):
    """Adds ``info["is_success"]`` to an episode's last step: the pole was still up at the time limit."""

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            info = {**info, "is_success": bool(truncated and not terminated)}
        return obs, reward, terminated, truncated, info


def make_env(env_config: Dict[str, Any]) -> gym.Env:
    """CartPole-v1 ending after ``env_config["max_steps"]`` steps (default 200), with ``is_success``."""
    return SuccessInfo(gym.make("CartPole-v1", max_episode_steps=int(env_config.get("max_steps", 200))))


class SuccessRate(Callbacks):
    """Logs each finished episode's success (1.0 or 0.0); the mean of the recent ones is its rate."""

    def on_episode_end(self, *, episode, metrics_logger, **kwargs):
        metrics_logger.log_value("success_rate", float(episode.last_info["is_success"]))


def main(iterations: int = 10, num_env_runners: int = 0, seed: int = 0) -> List[float]:
    """Train PPO for ``iterations`` iterations, printing the success rate of each; returns them."""
    config = (
        PPOConfig()
        .environment(make_env, env_config={"max_steps": 200})
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=8)
        .callbacks(SuccessRate)
        .debugging(seed=seed)
    )
    rates = []
    with config.build_algo() as algo:
        for _ in range(iterations):
            result = algo.train()
            runners = result["env_runners"]
            rates.append(runners["success_rate"])
            print(
                f"iter {result['training_iteration']:3d}  return {runners['episode_return_mean']:6.1f}  "
                f"success rate {runners['success_rate']:.2f}",
                flush=True,
            )
    return rates


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--num-env-runners", type=int, default=0)
    args = parser.parse_args()
    main(args.iterations, args.num_env_runners)
