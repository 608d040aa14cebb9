"""Median time of one PPO update, dlearner's local Learner vs plain PyTorch: the 4000-row CartPole
batch (W1) and a 32-row batch (the fixed cost of one ``update()`` call, what SAC's and APPO's many
small updates pay).

Run: python benchmarks/learner_update.py [--repeats 15] [--small-repeats 300]
All run in this process with one torch thread, interleaved so that machine noise hits them alike.

Besides the goal row (dlearner's update, which takes a pre-update snapshot so a failed update can
roll back, and checks every step for non-finite numbers), two rows show what the snapshot costs:
the same update with the snapshot left out (a benchmark-only subclass), and the snapshot alone (the
parameters and Adam's moments copied into the buffers the last update's snapshot used, and the
learner state).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, List

import gymnasium as gym
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import W1, PlainPPO, fmt_s, load_w1_batch, median_time, print_table, to_tensors, w1_training  # noqa: E402

from dlearner import PPOConfig  # noqa: E402
from dlearner.algorithms.ppo import PPOTorchLearner  # noqa: E402


class WithoutSnapshot(PPOTorchLearner):
    """Measurement only: PPO's learner with the pre-update snapshot left out (a failed update could
    then not roll back), to show what the snapshot costs."""

    def _snapshot(self, *, reuse_buffers):
        return None


def interleaved_medians(fns: List[Callable[[], object]], *, repeats: int, warmup: int) -> List[float]:
    """The median seconds of each of ``fns``, called in turn ``repeats`` times after ``warmup`` rounds."""
    times: List[List[float]] = [[] for _ in fns]
    for i in range(repeats + warmup):
        for fn, own in zip(fns, times):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                own.append(time.perf_counter() - start)
    return [statistics.median(own) for own in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--small-repeats", type=int, default=300, help="timed 32-row updates")
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

    # Interleaved, so that machine noise hits them alike; the first two of each are warm-up.
    dl, no_snap, ref = interleaved_medians(
        [lambda: learner.update(batch, timesteps), lambda: bare.update(batch, timesteps), lambda: plain.update(tensors)],
        repeats=args.repeats,
        warmup=2,
    )
    snapshot = median_time(lambda: learner._snapshot(reuse_buffers=True), repeats=200, warmup=10)

    # 32 rows: one minibatch per epoch, 2 epochs; fresh learners so W1's training does not carry over.
    small = {k: v[:32] for k, v in batch.items()}
    small_tensors = to_tensors(small)
    small_learner = config.build_learner(env=env)
    small_learner.build()
    small_plain = PlainPPO()
    s_dl, s_ref = interleaved_medians(
        [lambda: small_learner.update(small, timesteps), lambda: small_plain.update(small_tensors)],
        repeats=args.small_repeats,
        warmup=20,
    )
    print_table(
        f"PPO update, 4000 rows, [256, 256] MLP, minibatch 128, 2 epochs, Adam ({args.repeats} repeats, 1 thread)",
        [
            ("plain PyTorch loop", fmt_s(ref), "1.00", "reference"),
            ("dlearner Learner (local)", fmt_s(dl), f"{dl / ref:.2f}", "plain PyTorch"),
            ("  same, without the pre-update snapshot", fmt_s(no_snap), f"{no_snap / ref:.2f}", "plain PyTorch"),
            ("  the pre-update snapshot alone", f"{snapshot * 1e3:.2f} ms", f"{snapshot / dl:.4f}", "dlearner update"),
        ],
    )
    print_table(
        f"PPO update, 32 rows (the same model and settings; {args.small_repeats} repeats, 1 thread)",
        [
            ("plain PyTorch loop", f"{s_ref * 1e3:.2f} ms", "1.00", "reference", ""),
            (
                "dlearner Learner (local)",
                f"{s_dl * 1e3:.2f} ms",
                f"{s_dl / s_ref:.2f}",
                "plain PyTorch",
                f"<= 1.15: {'met' if s_dl / s_ref <= 1.15 else 'MISSED'}",
            ),
        ],
        header=("run", "median", "ratio", "vs", "goal"),
    )


if __name__ == "__main__":
    main()
