"""A cooperative PettingZoo task: three agents share one PPO policy on MPE's ``simple_spread``.

The agents must cover three landmarks without colliding; every agent gets the team's reward, so one
shared module (the default: every agent maps to ``default_policy``) learns from all three agents'
experience. A PettingZoo ``ParallelEnv`` is used as it is: no wrapper to write.

Needs the multi-agent extra: ``pip install "dlearner[multi-agent]"`` (PettingZoo and the ``mpe2`` tasks).

Run: python examples/pettingzoo_simple_spread.py [--iterations N] [--num-env-runners M]
"""

from __future__ import annotations

import argparse

from dlearner import PPOConfig


def make_simple_spread(env_config: dict):
    """The env creator: a PettingZoo ParallelEnv (discrete actions, 25 steps per episode)."""
    from mpe2 import simple_spread_v3

    return simple_spread_v3.parallel_env(N=env_config.get("num_agents", 3), max_cycles=25, continuous_actions=False)


def main(iterations: int = 30, num_env_runners: int = 0, seed: int = 0) -> list:
    config = (
        PPOConfig()
        .environment(make_simple_spread, env_config={"num_agents": 3})
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=4)
        .training(train_batch_size=2000, minibatch_size=256, num_epochs=4, lr=3e-4, entropy_coeff=0.01)
        .rl_module(model_config={"fcnet_hiddens": [64, 64]})
        .debugging(seed=seed)
    )
    returns = []
    with config.build_algo() as algo:
        for _ in range(iterations):
            result = algo.train()
            returns.append(result["env_runners"]["episode_return_mean"])
            print(
                f"iter {result['training_iteration']:3d}  env steps {result['num_env_steps_sampled_lifetime']:6d}  "
                f"agent steps {result['num_agent_steps_sampled_lifetime']:6d}  team return {returns[-1]:8.2f}",
                flush=True,
            )
    return returns


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--num-env-runners", type=int, default=0)
    args = parser.parse_args()
    main(args.iterations, args.num_env_runners)
