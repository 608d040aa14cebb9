"""SAC on Pendulum-v1: continuous control from a replay buffer, until the mean return reaches -250.

Pendulum's actions are a torque in [-2, 2]; SAC's tanh-squashed Gaussian policy keeps every sampled
action inside those bounds, and greedy evaluation takes the squashed mean. The replay buffer lives
with the learners (docs/concepts.md, "Off-policy training"). About 10,000 env steps and under a
minute on 2 cores.

Run: python examples/sac_pendulum.py [--num-learners N] [--num-env-runners M] [--prioritized]
With 0 learners and 0 env runners everything runs in this process; otherwise an embedded Dask
LocalCluster starts (and is closed at the end).
"""

from __future__ import annotations

import argparse

from dlearner import SACConfig


def main(
    num_learners: int = 1,
    num_env_runners: int = 1,
    prioritized: bool = False,
    stop_return: float = -250.0,
    max_iters: int = 20,
    seed: int = 0,
) -> dict:
    buffer = {"type": "prioritized", "alpha": 0.6, "beta": 0.4} if prioritized else {"type": "uniform"}
    config = (
        SACConfig()
        .environment("Pendulum-v1")
        .env_runners(num_env_runners=num_env_runners)
        .learners(num_learners=num_learners)
        .training(replay_buffer_config={**buffer, "capacity": 100_000})
        .reporting(metrics_num_episodes_for_smoothing=5)
        .debugging(seed=seed)
    )
    with config.build_algo() as algo:
        for _ in range(max_iters):
            result = algo.train()
            learner = result["learners"].get("default_policy", {})
            print(
                f"iter {result['training_iteration']:3d}  env steps {result['num_env_steps_sampled_lifetime']:6d}  "
                f"return {result['env_runners']['episode_return_mean']:8.1f}  "
                f"alpha {learner.get('alpha_value', float('nan')):.3f}  buffer {result['replay_buffer_size']}",
                flush=True,
            )
            if result["env_runners"]["episode_return_mean"] >= stop_return:
                break
        evaluation = algo.evaluate(5)["env_runners"]
        print(f"greedy evaluation over {evaluation['num_episodes']} episodes: {evaluation['episode_return_mean']:.1f}")
        return {"result": result, "evaluation": evaluation}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-learners", type=int, default=1)
    parser.add_argument("--num-env-runners", type=int, default=1)
    parser.add_argument("--prioritized", action="store_true", help="prioritized replay instead of uniform")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.num_learners, args.num_env_runners, args.prioritized, seed=args.seed)
