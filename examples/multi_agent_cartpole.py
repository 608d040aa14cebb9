"""Two agents, two policies: PPO on two independent CartPoles until the summed return reaches 900.

Each agent balances its own pole (``dlearner.envs.MultiAgentCartPole``); agent ``agent_0`` acts with
module ``p0`` and ``agent_1`` with ``p1``, so two networks learn side by side. The summed return of a
perfect episode is 1,000. A few seconds to a minute on 2 cores.

Run: python examples/multi_agent_cartpole.py [--num-learners N] [--num-env-runners M]
With 0 learners and 0 env runners everything runs in this process; otherwise an embedded Dask
LocalCluster starts (and is closed at the end).
"""

from __future__ import annotations

import argparse

from dlearner import PPOConfig
from dlearner.envs import MultiAgentCartPole


def policy_of(agent_id: str, episode, **kwargs) -> str:
    """agent_0 -> p0, agent_1 -> p1."""
    return f"p{agent_id.split('_')[-1]}"


def main(num_learners: int = 0, num_env_runners: int = 1, stop_return: float = 900.0, max_iters: int = 60, seed: int = 0) -> dict:
    config = (
        PPOConfig()
        .environment(MultiAgentCartPole, env_config={"num_agents": 2})
        .multi_agent(policies={"p0", "p1"}, policy_mapping_fn=policy_of)
        .env_runners(num_env_runners=num_env_runners)
        .learners(num_learners=num_learners)
        .debugging(seed=seed)
    )
    with config.build_algo() as algo:
        for _ in range(max_iters):
            result = algo.train()
            runners = result["env_runners"]
            per_module = "  ".join(f"{m} {r:5.1f}" for m, r in runners.get("module_episode_returns_mean", {}).items())
            print(
                f"iter {result['training_iteration']:3d}  env steps {result['num_env_steps_sampled_lifetime']:7d}  "
                f"summed return {runners['episode_return_mean']:6.1f}  ({per_module})",
                flush=True,
            )
            if runners["episode_return_mean"] >= stop_return:
                break
        evaluation = algo.evaluate(4)["env_runners"]
        print(
            f"greedy evaluation over {evaluation['num_episodes']} episodes: summed {evaluation['episode_return_mean']:.1f}, "
            f"per agent {evaluation['agent_episode_returns_mean']}"
        )
        return {"result": result, "evaluation": evaluation}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-learners", type=int, default=0)
    parser.add_argument("--num-env-runners", type=int, default=1)
    parser.add_argument("--stop-return", type=float, default=900.0)
    args = parser.parse_args()
    main(args.num_learners, args.num_env_runners, args.stop_return)
