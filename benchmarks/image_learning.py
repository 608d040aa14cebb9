"""Learning from pixels (issue 19): return vs env steps and wall time on ``FindTheSquare``, several seeds.

Run: python benchmarks/image_learning.py [--seeds 3] [--algos PPO,APPO] [--size 42] [--max-steps 40000]

``dlearner.envs.FindTheSquare``: 42x42 (or 84x84) uint8 images with one bright square; the agent
says in which half it lies; 10 steps per episode, return 5 for a random policy, 10 for a perfect
one. Only a policy that looks at the pixels beats 5, so the curve shows the CNN encoder learning.
Each run uses 1 env-runner actor and 1 learner actor on an embedded LocalCluster (wall time starts
before ``build_algo``: start-up included), dlearner's default 42x42 (or 84x84) filters with a shared
encoder, and stops when the mean return reaches ``--goal`` (9.0: 90% right) or at ``--max-steps``.
The table gives the env steps and wall seconds to the goal (median and range over seeds) and the
greedy return of 20 evaluation episodes at the end.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

from dlearner import APPOConfig, PPOConfig  # noqa: E402
from dlearner.envs import FindTheSquare  # noqa: E402

MODEL = {"fcnet_hiddens": [64], "vf_share_layers": True}
TRAINING = {
    "PPO": dict(train_batch_size=1000, minibatch_size=250, num_epochs=4, lr=1e-3),
    "APPO": dict(train_batch_size=500, lr=1e-3, min_time_s_per_iteration=1.0),
}
CONFIGS = {"PPO": PPOConfig, "APPO": APPOConfig}


def learning_run(algo_name: str, seed: int, size: int, goal: float, max_steps: int) -> Dict:
    config = (
        CONFIGS[algo_name]()
        .environment(FindTheSquare, env_config={"size": size})
        .env_runners(num_env_runners=1, num_envs_per_env_runner=4)
        .learners(num_learners=1)
        .rl_module(model_config=MODEL)
        .training(**TRAINING[algo_name])
        .debugging(seed=seed)
    )
    start = time.perf_counter()
    curve: List[tuple] = []
    reached = None
    with config.build_algo() as algo:
        while not curve or curve[-1][0] < max_steps:
            result = algo.train()
            steps, ret = result["num_env_steps_sampled_lifetime"], result["env_runners"].get("episode_return_mean")
            curve.append((steps, time.perf_counter() - start, ret))
            if ret is not None and ret >= goal:
                reached = curve[-1]
                break
        greedy = algo.evaluate(20, seed=1000 + seed)["env_runners"]["episode_return_mean"]
    return {"curve": curve, "reached": reached, "greedy": greedy}


def spread(values: List[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--algos", default="PPO,APPO")
    parser.add_argument("--size", type=int, default=42, choices=[42, 64, 84])
    parser.add_argument("--goal", type=float, default=9.0)
    parser.add_argument("--max-steps", type=int, default=40_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for algo_name in args.algos.split(","):
        runs = [learning_run(algo_name, seed, args.size, args.goal, args.max_steps) for seed in range(args.seeds)]
        for seed, run in enumerate(runs):
            points = ", ".join(f"{s}:{r:.1f}" for s, _, r in run["curve"] if r is not None)
            print(f"{algo_name} seed {seed} (env steps: mean return): {points}", flush=True)
        done = [run["reached"] for run in runs if run["reached"]]
        rows.append(
            (
                f"{algo_name}, {args.size}x{args.size} uint8, 1 env runner + 1 learner",
                spread([float(r[0]) for r in done], ",.0f"),
                spread([r[1] for r in done], ".1f"),
                spread([run["greedy"] for run in runs], ".2f"),
                f"{len(done)}/{len(runs)}",
            )
        )
    print_table(
        f"FindTheSquare: env steps and wall time to a mean return of {args.goal} (random policy: 5; perfect: 10)",
        rows,
        header=("run", "env steps to goal", "wall s to goal (start-up incl.)", "greedy return (20 ep.)", "reached"),
    )


if __name__ == "__main__":
    main()
