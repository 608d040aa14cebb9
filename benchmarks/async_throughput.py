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

``--driver-load``: what the driver process itself does for APPO on CartPole (1 learner actor, 1 or
2 env-runner actors, default config): its CPU seconds (``time.process_time``, all its threads) and
the bytes it receives (the kernel's per-socket ``bytes_received`` of its TCP sockets, read with
``ss -tinp``) per 1,000 trained env steps, with ``policy_lag_mean`` / ``policy_lag_max``, env steps
trained per second and failed weights pulls, medians over ``--repeats`` runs, for three data paths,
interleaved run by run (see :data:`DATA_PATHS`): fragments and weights through the driver (the
path before issue 20), fragment references with the weights through the driver, and fragment and
weights references (the runners pull the weights from learner rank 0). It prints the CPU ratio of
the first path to the last and the load average. The scheduler and the workers run in processes of their own
(``dask scheduler`` / ``dask worker``, joined through a scheduler file), so the driver's figures are
the driver's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

from dlearner import APPOConfig, IMPALAConfig, PPOConfig  # noqa: E402
from dlearner.algorithms.async_pipeline import AsyncPipeline  # noqa: E402

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


def socket_bytes_received(pid: int) -> int:
    """Bytes process ``pid`` has received on its open TCP sockets (``ss -tinp``'s ``bytes_received``):
    Dask's comms keep their connections open, so the difference over a window is what reached it."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    total, owner = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's first line names its process
            found = re.search(r"pid=(\d+)", line)
            owner = bool(found) and int(found.group(1)) == pid
        elif owner:
            received = re.search(r"bytes_received:(\d+)", line)
            if received:
                total += int(received.group(1))
    return total


@contextlib.contextmanager
def external_cluster(num_workers: int) -> Iterator[str]:
    """A scheduler and ``num_workers`` single-threaded worker processes outside this process; yields
    the scheduler file (so nothing the scheduler or a worker does counts as the driver's)."""
    with tempfile.TemporaryDirectory() as tmp:
        scheduler_file = os.path.join(tmp, "scheduler.json")
        common = ["--scheduler-file", scheduler_file, "--no-dashboard"]
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0", *common], **quiet)
        workers = None
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(scheduler_file):
                if time.monotonic() > deadline or scheduler.poll() is not None:
                    raise RuntimeError("the dask scheduler did not start")
                time.sleep(0.2)
            workers = subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--nworkers", str(num_workers), "--nthreads", "1", *common],
                **quiet,
            )
            yield scheduler_file
        finally:
            for process in (workers, scheduler):
                if process is not None:
                    process.terminate()
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()


#: The data paths ``--driver-load`` compares: name -> (fragment_refs, weights_refs) of the AsyncPipeline.
DATA_PATHS = {
    "fragments and weights via the driver": (False, False),
    "fragment references, weights via the driver": (True, False),
    "fragment and weights references (now)": (True, True),
}


def driver_load_run(
    scheduler_file: str,
    seed: int,
    runners: int,
    seconds: float,
    warmup_s: float,
    path: str = "fragment and weights references (now)",
    envs_per_runner: Optional[int] = None,
) -> Dict[str, float]:
    """APPO on CartPole for ``warmup_s`` then ``seconds`` (whole 5 s iterations): the driver's CPU
    seconds and received bytes per 1,000 trained env steps over the measured iterations.
    ``path``: one of :data:`DATA_PATHS` (what travels through the driver)."""
    fragment_refs, weights_refs = DATA_PATHS[path]
    config = (
        APPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=runners)
        .learners(num_learners=1)
        .cluster(scheduler_file=scheduler_file)
        .debugging(seed=seed)
    )
    if envs_per_runner is not None:
        config.env_runners(num_envs_per_env_runner=envs_per_runner)
    with config.build_algo() as algo:
        algo._pipeline = AsyncPipeline(algo, fragment_refs=fragment_refs, weights_refs=weights_refs)
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            algo.train()
        trained0 = algo.num_env_steps_trained_lifetime
        bytes0, cpu0, start = socket_bytes_received(os.getpid()), time.process_time(), time.perf_counter()
        lags, lag_max = [], 0
        while time.perf_counter() - start < seconds:
            result = algo.train()
            lags.append(result["policy_lag_mean"])
            lag_max = max(lag_max, result["policy_lag_max"])
        elapsed = time.perf_counter() - start
        cpu, received = time.process_time() - cpu0, socket_bytes_received(os.getpid()) - bytes0
        trained = algo.num_env_steps_trained_lifetime - trained0
    return {
        "cpu_s_per_1k": cpu * 1000 / trained,
        "bytes_per_1k": received * 1000 / trained,
        "lag_mean": statistics.mean(lags),
        "lag_max": lag_max,
        "trained_per_s": trained / elapsed,
        "pulls_failed": algo.pipeline.num_weights_pulls_failed_lifetime,
    }


def driver_load(args: argparse.Namespace) -> None:
    rows, ratios = [], []
    load_before = os.getloadavg()
    with external_cluster(1 + max(args.runners)) as scheduler_file:
        for runners in args.runners:
            by_path: Dict[str, list] = {path: [] for path in DATA_PATHS}
            for seed in range(args.repeats):  # the paths interleaved, so load hits them alike
                for path in DATA_PATHS:
                    by_path[path].append(
                        driver_load_run(scheduler_file, seed, runners, args.seconds, args.warmup, path, args.envs_per_runner)
                    )
            medians = {}
            for path, runs in by_path.items():
                print(f"  APPO with {runners} runner(s), {path}: {runs}", file=sys.stderr, flush=True)
                med = medians[path] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                rows.append(
                    (
                        "APPO",
                        path,
                        str(runners),
                        f"{med['cpu_s_per_1k']:.4f}",
                        f"{med['bytes_per_1k'] / 1024:,.1f}",
                        f"{med['lag_mean']:.2f} / {max(r['lag_max'] for r in runs)}",
                        f"{med['trained_per_s']:,.0f}",
                        str(sum(r["pulls_failed"] for r in runs)),
                    )
                )
            before, now = (
                medians[path]["cpu_s_per_1k"]
                for path in ("fragments and weights via the driver", "fragment and weights references (now)")
            )
            ratios.append((runners, before / now))
    print_table(
        f"CartPole-v1, 1 learner actor, default config (num_envs_per_env_runner="
        f"{args.envs_per_runner or APPOConfig().num_envs_per_env_runner}), "
        f"the driver process's load, median of {args.repeats} runs",
        rows,
        header=(
            "algorithm",
            "data path",
            "env runners",
            "driver CPU s / 1k trained steps",
            "driver KiB received / 1k trained steps",
            "policy lag mean / max",
            "env steps trained/s",
            "weights pulls failed",
        ),
    )
    for runners, ratio in ratios:
        print(
            f"driver CPU per 1k trained steps, fragments and weights via the driver / now, {runners} runner(s): {ratio:.1f}x (goal >= 5x)"
        )
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--algos", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--driver-load", action="store_true", help="measure the driver process's CPU and bytes received")
    parser.add_argument("--repeats", type=int, default=3, help="--driver-load: runs per row")
    parser.add_argument("--seconds", type=float, default=15.0, help="--driver-load: measured seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="--driver-load: seconds trained before measuring")
    parser.add_argument(
        "--envs-per-runner",
        type=int,
        default=None,
        help="--driver-load: num_envs_per_env_runner (default: APPO's, 8; env steps per sample request / 50)",
    )
    args = parser.parse_args()
    if args.driver_load:
        driver_load(args)
        return
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
            "data path",
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
