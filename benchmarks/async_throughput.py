"""Synchronous PPO vs asynchronous APPO and IMPALA on CartPole-v1: throughput and time to solve.

Run: python benchmarks/async_throughput.py [--seeds 3] [--runners 1 2]
Every run uses the algorithm's default config (only the environment, env runners, learners and
seed are set) with 1 learner actor and 1 or 2 env-runner actors on an embedded LocalCluster.

* "env steps trained/s": distinct env steps that went into updates, per second of training
  (cluster start excluded; each step counts once, however many epochs PPO makes over it).
* "time to solve": wall time from building the algorithm (cluster start included) until a greedy
  evaluation of 10 episodes scores >= 450; it is tried whenever the smoothed training return is >= 450.
* policy lag (updates between the sampling and the learning weights) and samples dropped are the
  asynchronous runs' ``policy_lag_mean`` / ``policy_lag_max`` / ``num_env_steps_dropped_lifetime``.

Medians over the seeds. Run it on a quiet machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

from dlearner import APPOConfig, IMPALAConfig, PPOConfig  # noqa: E402

SOLVED = 450.0
CONFIGS = {"PPO (sync)": PPOConfig, "APPO": APPOConfig, "IMPALA": IMPALAConfig}


def run(config_class, seed: int, runners: int, max_steps: int = 300_000, max_wall_s: float = 120.0) -> dict:
    start = time.perf_counter()
    config = (
        config_class()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=runners)
        .learners(num_learners=1)
        .debugging(seed=seed)
    )
    if hasattr(config, "min_time_s_per_iteration"):
        # Per-batch iterations (not the 5 s default), so the solve is seen within one batch of it.
        config.training(min_time_s_per_iteration=None)
    with config.build_algo() as algo:
        train_start = time.perf_counter()
        train_time, trained, lags, lag_max, dropped = 0.0, 0, [], 0, 0
        solved_at = None
        while solved_at is None:
            began = time.perf_counter()
            result = algo.train()
            train_time += time.perf_counter() - began
            # Distinct env steps the learners took in: PPO trains all it samples, each step num_epochs times.
            trained = (
                result["num_env_steps_sampled_lifetime"]
                if config_class is PPOConfig
                else result["num_env_steps_trained_lifetime"] // algo.config.num_epochs
            )
            if "policy_lag_mean" in result and result["policy_lag_mean"] == result["policy_lag_mean"]:
                lags.append(result["policy_lag_mean"])
                lag_max = max(lag_max, result["policy_lag_max"])
                dropped = result["num_env_steps_dropped_lifetime"]
            if result["env_runners"]["episode_return_mean"] >= SOLVED:
                if algo.evaluate(10, seed=seed)["env_runners"]["episode_return_mean"] >= SOLVED:
                    solved_at = time.perf_counter() - start
            if result["num_env_steps_sampled_lifetime"] >= max_steps or time.perf_counter() - train_start > max_wall_s:
                break
    return {
        "solved": solved_at is not None,
        "time_to_solve": solved_at if solved_at is not None else float("inf"),
        "steps": result["num_env_steps_sampled_lifetime"],
        "trained_per_s": trained / train_time,
        "lag_mean": statistics.mean(lags) if lags else None,
        "lag_max": lag_max if lags else None,
        "dropped": dropped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--algos", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    rows, medians = [], {}
    for runners in args.runners:
        for name in args.algos:
            runs = [run(CONFIGS[name], seed, runners) for seed in range(args.seeds)]
            med = {key: statistics.median(r[key] for r in runs) for key in ("time_to_solve", "steps", "trained_per_s")}
            medians[(name, runners)] = med
            lag = (
                f"{statistics.median(r['lag_mean'] for r in runs):.1f} / {max(r['lag_max'] for r in runs)}"
                if runs[0]["lag_mean"] is not None
                else "-"
            )
            rows.append(
                (
                    name,
                    str(runners),
                    f"{med['trained_per_s']:,.0f}",
                    f"{med['time_to_solve']:.1f} s",
                    f"{med['steps']:,.0f}",
                    f"{sum(r['solved'] for r in runs)}/{len(runs)}",
                    lag,
                    str(sum(r["dropped"] for r in runs)) if runs[0]["lag_mean"] is not None else "-",
                )
            )
            print(f"  {name} with {runners} runner(s): {runs}", file=sys.stderr, flush=True)
    print_table(
        f"CartPole-v1, 1 learner actor, default configs, median of {args.seeds} seeds",
        rows,
        header=(
            "algorithm",
            "env runners",
            "env steps trained/s",
            "time to solve",
            "env steps",
            "solved",
            "policy lag mean / max",
            "dropped",
        ),
    )
    ppo, appo, impala = (medians.get((n, 1)) for n in CONFIGS)
    if ppo and appo:
        print(
            f"APPO / PPO env steps trained per second (1 learner, 1 env runner): "
            f"{appo['trained_per_s'] / ppo['trained_per_s']:.2f}x (goal >= 1.5x)"
        )
    if appo:
        print(f"APPO time to solve: {appo['time_to_solve']:.1f} s (goal <= 20 s)")
    if impala:
        print(f"IMPALA time to solve: {impala['time_to_solve']:.1f} s (goal <= 40 s)")


if __name__ == "__main__":
    main()
