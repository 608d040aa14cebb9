"""Soak test: train PPO while worker processes are killed (real SIGKILLs), and count what survives.

Run from the project root: ``python benchmarks/soak.py [--minutes 5] [--kill-every 12] [--seed 0]``

A LocalCluster of 5 worker processes (each with a nanny that restarts a killed worker) runs PPO on
CartPole-v1 with 2 learner actors and 2 env-runner actors and
``fault_tolerance(restart_failed_learners=True, restart_failed_env_runners=True)``. Every
``--kill-every`` seconds a thread SIGKILLs the worker process of a random learner or env runner.
Every few iterations the run saves a checkpoint; at the end every checkpoint is restored into a
fresh 1-learner group and compared with what was saved.

It prints one table: kills, learner and env-runner restarts, updates retried, env steps lost
(counted), hangs (an iteration longer than ``--hang-s``: must be 0), checkpoints written and
intact, the final mean return, and env steps per second with and without kills. Goal (issue 9):
>= 20 kills survived in one run, 0 hangs, 0 corrupted checkpoints, and the run still learns.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import distributed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import print_table  # noqa: E402

from dlearner import PPOConfig  # noqa: E402


def soak_config(client: distributed.Client, seed: int) -> PPOConfig:
    return (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=2, num_envs_per_env_runner=4)
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .training(train_batch_size=2000, minibatch_size=250, num_epochs=4, lr=1e-3)
        .rl_module(model_config={"fcnet_hiddens": [64, 64]})
        .fault_tolerance(restart_failed_learners=True, restart_failed_env_runners=True, learner_restart_timeout_s=30)
        .cluster(client=client)
        .debugging(seed=seed)
    )


class Killer(threading.Thread):
    """SIGKILLs the worker of a random learner or env runner every ``every`` seconds."""

    def __init__(self, client: distributed.Client, algo, every: float, rng: random.Random):
        super().__init__(name="soak-killer", daemon=True)
        self.client, self.algo, self.every, self.rng = client, algo, every, rng
        self.kills: List[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            group, runners = self.algo.learner_group, self.algo.env_runner_group
            if group is None or runners is None:
                return
            targets = [("learner", w) for w in group.learner_workers] + [("env runner", w) for w in runners.workers]
            kind, address = self.rng.choice(targets)
            try:
                pid = self.client.run(os.getpid, workers=[address])[address]
            except (OSError, KeyError, ValueError, distributed.comm.CommClosedError):
                continue  # that worker is already gone or restarting: pick again next time
            os.kill(pid, signal.SIGKILL)
            self.kills.append(f"{kind} on {address}")


def check_checkpoints(paths: List[str], client: distributed.Client) -> int:
    """How many of ``paths`` restore into a new learner group with exactly the saved weights."""
    from dlearner.checkpoint import load_state_tree

    intact = 0
    for path in paths:
        config = PPOConfig().environment("CartPole-v1").rl_module(model_config={"fcnet_hiddens": [64, 64]})
        learner = config.build_learner()
        learner.build()
        try:
            learner.restore_from_path(path)
            tree, _ = load_state_tree(path)
        except (ValueError, FileNotFoundError) as err:
            print(f"checkpoint {path} does not restore: {err}")
            continue
        saved = tree["learner"]["rl_module"]["default_policy"]
        state = learner.get_state()["rl_module"]["default_policy"]
        if all(np.array_equal(saved[name], state[name]) for name in state):
            intact += 1
    return intact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to train under kills")
    parser.add_argument("--kill-every", type=float, default=12.0, help="seconds between kills")
    parser.add_argument("--hang-s", type=float, default=120.0, help="an iteration longer than this counts as a hang")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="iterations between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="dlearner-soak-"))
    with (
        distributed.LocalCluster(
            n_workers=5, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        algo = soak_config(client, args.seed).build_algo()
        killer = Killer(client, algo, args.kill_every, rng)
        checkpoints: List[str] = []
        hangs = 0
        returns: List[float] = []
        quiet_rates: List[float] = []
        result: Dict = {}
        start = time.monotonic()
        try:
            for _ in range(3):  # a few iterations without kills: the throughput to compare with
                result = algo.train()
                quiet_rates.append(result["env_steps_per_s"])
            killer.start()
            soak_start, soaked_steps = time.monotonic(), result["num_env_steps_sampled_lifetime"]
            while time.monotonic() - start < args.minutes * 60:
                began = time.monotonic()
                result = algo.train()
                if time.monotonic() - began > args.hang_s:
                    hangs += 1
                returns.append(result["env_runners"]["episode_return_mean"])
                if result["training_iteration"] % args.checkpoint_every == 0:
                    checkpoints.append(algo.save_to_path(str(workdir / f"iter-{result['training_iteration']:04d}")))
            soak_rate = (result["num_env_steps_sampled_lifetime"] - soaked_steps) / (time.monotonic() - soak_start)
        finally:
            killer.stopping.set()
            killer.join(timeout=30)
            group = algo.learner_group
            retried = group.num_updates_retried if group is not None else -1
            algo.stop()
        intact = check_checkpoints(checkpoints, client)
    rows = [
        (
            "kills (SIGKILL)",
            f"{len(killer.kills)}",
            f"{sum('learner' in k for k in killer.kills)} learner, {sum('env runner' in k for k in killer.kills)} env runner",
        ),
        (
            "learner restarts",
            f"{result.get('num_learner_restarts')}",
            f"healthy learners at the end: {result.get('num_healthy_learners')}",
        ),
        ("env-runner restarts", f"{result.get('num_env_runner_restarts')}", ""),
        ("updates retried", f"{retried}", "interrupted updates run again on the re-formed group"),
        ("env steps lost (counted)", f"{result.get('num_env_steps_lost')}", "sampled again by the replacements"),
        ("hangs", f"{hangs}", f"iterations > {args.hang_s:g} s (goal 0)"),
        ("checkpoints intact", f"{intact} / {len(checkpoints)}", "restored with exactly the saved weights (goal: all)"),
        (
            "final return (mean of last 5)",
            f"{np.mean(returns[-5:]) if returns else float('nan'):.1f}",
            f"first under kills: {returns[0] if returns else float('nan'):.1f}",
        ),
        ("env steps/s", f"{soak_rate:.0f}", f"without kills: {np.median(quiet_rates):.0f}"),
        ("iterations, env steps", f"{result.get('training_iteration')}", f"{result.get('num_env_steps_sampled_lifetime')}"),
    ]
    print_table(
        f"Soak: PPO, 2 learners + 2 env runners on 5 worker processes, {args.minutes:g} min, a kill every {args.kill_every:g} s",
        rows,
        header=("what", "value", "note"),
    )


if __name__ == "__main__":
    main()
