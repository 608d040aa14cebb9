"""Train PPO on CartPole-v1 until the mean episode return reaches 475 (a few seconds on 2 cores).

Run: python examples/ppo_cartpole.py [--num-learners N] [--num-env-runners M]
With 0 learners and 0 env runners everything runs in this process; otherwise an embedded Dask
LocalCluster starts (and is closed at the end).
"""

from __future__ import annotations

import argparse

from dlearner import PPOConfig


def main(num_learners: int = 0, num_env_runners: int = 0, stop_return: float = 475.0, max_iters: int = 60, seed: int = 0) -> dict:
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=8)
        .learners(num_learners=num_learners)
        .debugging(seed=seed)
    )
    with config.build_algo() as algo:
        for _ in range(max_iters):
            result = algo.train()
            print(
                f"iter {result['training_iteration']:3d}  env steps {result['num_env_steps_sampled_lifetime']:7d}  "
                f"return {result['env_runners']['episode_return_mean']:6.1f}  ({result['time_this_iter_s']:.2f} s)",
                flush=True,
            )
            if result["env_runners"]["episode_return_mean"] >= stop_return:
                break
        evaluation = algo.evaluate(10)["env_runners"]
        print(f"greedy evaluation over {evaluation['num_episodes']} episodes: {evaluation['episode_return_mean']:.1f}")
        return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-learners", type=int, default=0)
    parser.add_argument("--num-env-runners", type=int, default=0)
    parser.add_argument("--stop-return", type=float, default=475.0)
    args = parser.parse_args()
    main(args.num_learners, args.num_env_runners, args.stop_return)
