"""Wall time and env steps until PPO's mean return reaches 475 on CartPole-v1, and sampling throughput.

Run: python benchmarks/cartpole_to_solve.py [--seeds 3]
Uses the default PPOConfig (only the environment, env runners, learners and seed are set). The
"actors" rows run 1 env-runner actor and 1 learner actor on an embedded LocalCluster and include
its start-up. Sampling throughput is env steps per second of `sample()` with 8 vector envs.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

from dlearner import PPOConfig  # noqa: E402

STOP_RETURN = 475.0


def solve(seed: int, actors: bool, max_steps: int = 100_000) -> dict:
    start = time.perf_counter()
    config = PPOConfig().environment("CartPole-v1").debugging(seed=seed)
    if actors:
        config.env_runners(num_env_runners=1).learners(num_learners=1)
    with config.build_algo() as algo:
        while True:
            result = algo.train()
            if (
                result["env_runners"]["episode_return_mean"] >= STOP_RETURN
                or result["num_env_steps_sampled_lifetime"] >= max_steps
            ):
                break
        wall = time.perf_counter() - start
        evaluation = algo.evaluate(10, seed=seed)["env_runners"]["episode_return_mean"]
    return {
        "steps": result["num_env_steps_sampled_lifetime"],
        "wall": wall,
        "eval": evaluation,
        "solved": result["env_runners"]["episode_return_mean"] >= STOP_RETURN,
    }


def sampling_throughput(actors: bool, steps: int = 4000, repeats: int = 5) -> float:
    config = PPOConfig().environment("CartPole-v1").env_runners(num_envs_per_env_runner=8).debugging(seed=0)
    if actors:
        config.env_runners(num_env_runners=1)
    with config.build_algo() as algo:
        group = algo.env_runner_group
        group.sample(steps)  # warm-up
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            group.sample(steps)
            times.append(time.perf_counter() - begin)
    return steps / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for actors in (False, True):
        runs = [solve(seed, actors) for seed in range(args.seeds)]
        label = (
            "1 env-runner actor + 1 learner actor (incl. cluster start)" if actors else "in one process (0 runners, 0 learners)"
        )
        rows.append(
            (
                label,
                f"{statistics.median(r['steps'] for r in runs):,.0f}",
                f"{statistics.median(r['wall'] for r in runs):.1f} s",
                f"{statistics.median(r['eval'] for r in runs):.0f}",
                f"{sum(r['solved'] for r in runs)}/{len(runs)}",
            )
        )
    print_table(
        f"PPO (default config) on CartPole-v1 until mean return >= {STOP_RETURN:g}, median of {args.seeds} seeds",
        rows,
        header=("setup", "env steps", "wall time", "eval return", "solved"),
    )
    print(
        "Goal: evaluation return >= 450 within 30k env steps and 15 s (RLlib 2.60 here: 24k steps / 35 s tuned, 28k / 123 s defaults)."
    )
    print_table(
        "Sampling throughput (8 CartPole envs per runner, 4000 steps per call)",
        [
            ("0 env-runner actors (driver)", f"{sampling_throughput(False):,.0f} env steps/s"),
            ("1 env-runner actor", f"{sampling_throughput(True):,.0f} env steps/s"),
        ],
        header=("runners", "throughput"),
    )


if __name__ == "__main__":
    main()
