"""Median time of one PPO update of the 4000-row CartPole batch: dlearner's local Learner vs plain PyTorch.

Run: python benchmarks/learner_update.py [--repeats 15]
All run in this process with one torch thread, interleaved so that machine noise hits them alike.

Besides the goal row (dlearner's update, which takes a pre-update snapshot so a failed update can
roll back, and checks every step for non-finite numbers), two rows show what the snapshot costs:
the same update with the snapshot left out (a benchmark-only subclass), and ``take_snapshot()``
alone (torch clones of the parameters and Adam's moments, and the learner state).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import gymnasium as gym
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import W1, PlainPPO, fmt_s, load_w1_batch, median_time, print_table, to_tensors, w1_training  # noqa: E402

from dlearner import PPOConfig  # noqa: E402
from dlearner.algorithms.ppo import PPOTorchLearner  # noqa: E402


class WithoutSnapshot(PPOTorchLearner):
    """Measurement only: PPO's learner with the pre-update snapshot left out (a failed update could
    then not roll back), to show what the snapshot costs."""

    def take_snapshot(self):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = load_w1_batch()
    env = gym.make("CartPole-v1")
    config = PPOConfig().training(**w1_training()).rl_module(model_config={"fcnet_hiddens": W1["hiddens"]}).debugging(seed=0)
    learner = config.build_learner(env=env)
    learner.build()
    bare = config.copy().training(learner_class=WithoutSnapshot).build_learner(env=env)
    bare.build()
    plain = PlainPPO()
    tensors = to_tensors(batch)
    timesteps = {"num_env_steps_sampled_lifetime": 4000}

    dl_times, bare_times, plain_times = [], [], []
    for i in range(args.repeats + 2):  # interleaved; the first two of each are warm-up
        start = time.perf_counter()
        learner.update(batch, timesteps)
        t_dl = time.perf_counter() - start
        start = time.perf_counter()
        bare.update(batch, timesteps)
        t_bare = time.perf_counter() - start
        start = time.perf_counter()
        plain.update(tensors)
        t_plain = time.perf_counter() - start
        if i >= 2:
            dl_times.append(t_dl)
            bare_times.append(t_bare)
            plain_times.append(t_plain)
    dl, no_snap, ref = statistics.median(dl_times), statistics.median(bare_times), statistics.median(plain_times)
    snapshot = median_time(learner.take_snapshot, repeats=200, warmup=10)
    print_table(
        f"PPO update, 4000 rows, [256, 256] MLP, minibatch 128, 2 epochs, Adam ({args.repeats} repeats, 1 thread)",
        [
            ("plain PyTorch loop", fmt_s(ref), "1.00", "reference"),
            ("dlearner Learner (local)", fmt_s(dl), f"{dl / ref:.2f}", "plain PyTorch"),
            ("  same, without the pre-update snapshot", fmt_s(no_snap), f"{no_snap / ref:.2f}", "plain PyTorch"),
            ("  take_snapshot() alone", f"{snapshot * 1e3:.2f} ms", f"{snapshot / dl:.4f}", "dlearner update"),
        ],
    )


if __name__ == "__main__":
    main()
