"""Atari throughput (issue 19): the emulator, the learner's arithmetic, and what crosses the network.

Run: python benchmarks/atari_throughput.py [--env ALE/Pong-v5] [--seconds 90] [--reps 15] [--parts raw,learner,runs]

Needs ``pip install "dlearner[atari]"``. Four measurements, each against its physical limit:

1. **Raw env rate**: ``environment(env, atari=True)`` (gymnasium's ``AtariPreprocessing``, frame
   skip 4, 84x84 grayscale, 4 frames stacked last) stepped with random actions in this process,
   one core, no learning: agent steps/s (x4 for frames/s).
2. **Learner vs plain PyTorch**: an IMPALA update (V-trace, shared CNN encoder with dlearner's
   84x84 default filters, ``fcnet_hiddens=[256]``, Adam, grad clip 40) on the same 500-row
   ``uint8`` batch (10 fragments of 50 steps): a plain PyTorch loop written by hand against
   dlearner's ``Learner.update`` in this process, interleaved, one torch thread each. Trained agent
   steps/s and their ratio (goal >= 0.9).
3. **APPO and IMPALA runs** with 1 env-runner actor and 1 learner actor on an embedded cluster, for
   ``--seconds`` after a warm-up: sampled and trained agent steps/s, the env runner's sampling rate
   against the raw rate (goal >= 0.7, with the learner busy on the other core), and
4. **bytes on the wire**: what each process received on its TCP sockets over the timed window
   (the kernel's per-socket ``bytes_received``, read with ``ss -tinp``) per agent step,
   against the size of one uint8 observation (28,224 bytes; goal <= 1.05x per hop). The
   samples' hops are env runner -> driver (the driver's reads) and driver -> learner (the
   learner's reads); the env runner's reads are the weights it receives.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import gymnasium as gym
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

from dlearner import APPOConfig, IMPALAConfig  # noqa: E402
from dlearner.env_runner import NEXT_VF_PREDS  # noqa: E402

MODEL = {"fcnet_hiddens": [256], "vf_share_layers": True}
FRAGMENT, FRAGMENTS = 50, 10
OBS_SHAPE = (84, 84, 4)
OBS_BYTES = math.prod(OBS_SHAPE)


# -- 1. the emulator alone ----------------------------------------------------------------------------
def raw_env_rate(env_id: str, steps: int) -> float:
    env = IMPALAConfig().environment(env_id, atari=True).make_env()
    try:
        env.reset(seed=0)
        env.action_space.seed(0)
        start = time.perf_counter()
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
        return steps / (time.perf_counter() - start)
    finally:
        env.close()


# -- 2. the learner's arithmetic -----------------------------------------------------------------------
def image_batch(num_actions: int, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = FRAGMENT * FRAGMENTS
    logits = rng.normal(scale=0.01, size=(rows, num_actions)).astype(np.float32)
    actions = rng.integers(0, num_actions, rows)
    logp = logits[np.arange(rows), actions] - np.log(np.exp(logits).sum(-1))
    return {
        "obs": rng.integers(0, 256, (rows, *OBS_SHAPE), dtype=np.uint8),
        "actions": actions.astype(np.int64),
        "action_logp": logp.astype(np.float32),
        "rewards": rng.choice([-1.0, 0.0, 0.0, 0.0, 1.0], rows).astype(np.float32),
        "terminateds": np.zeros(rows, bool),
        "truncateds": np.zeros(rows, bool),
        NEXT_VF_PREDS: rng.normal(size=rows).astype(np.float32),
    }


def _same(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class PlainIMPALA:
    """IMPALA's update written by hand: the same CNN, V-trace, losses, Adam and clipping as dlearner's."""

    def __init__(self, num_actions: int, config: IMPALAConfig):
        p1, p2 = _same(84, 8, 4), _same(21, 4, 2)
        self.net = nn.Sequential(
            nn.ZeroPad2d((*p1, *p1)), nn.Conv2d(4, 16, 8, 4), nn.ReLU(),
            nn.ZeroPad2d((*p2, *p2)), nn.Conv2d(16, 32, 4, 2), nn.ReLU(),
            nn.Conv2d(32, 256, 11, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(256, 256), nn.Tanh(),
        )  # fmt: skip
        self.pi, self.vf = nn.Linear(256, num_actions), nn.Linear(256, 1)
        self.params = [*self.net.parameters(), *self.pi.parameters(), *self.vf.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr)
        self.config = config

    def update(self, batch: Dict[str, torch.Tensor]) -> float:
        cfg = self.config
        features = self.net(batch["obs"].float().div(255.0).permute(0, 3, 1, 2))
        logits, values = self.pi(features), self.vf(features).squeeze(-1)

        def time_major(x):
            return x.reshape(FRAGMENTS, FRAGMENT).transpose(0, 1)

        dist = torch.distributions.Categorical(logits=logits)
        logp = time_major(dist.log_prob(batch["actions"]))
        v = time_major(values)
        with torch.no_grad():
            discounts = cfg.gamma * (1.0 - time_major(batch["terminateds"].float()))
            rewards, bootstrap = time_major(batch["rewards"]), time_major(batch[NEXT_VF_PREDS])[-1]
            rhos = torch.exp(logp - time_major(batch["action_logp"]))
            clipped, cs = rhos.clamp(max=1.0), rhos.clamp(max=1.0)
            v_next = torch.cat([v[1:], bootstrap[None]])
            deltas = clipped * (rewards + discounts * v_next - v)
            acc, vs_minus_v = torch.zeros_like(bootstrap), torch.zeros_like(v)
            for t in reversed(range(FRAGMENT)):
                acc = deltas[t] + discounts[t] * cs[t] * acc
                vs_minus_v[t] = acc
            vs = vs_minus_v + v
            advantages = clipped * (rewards + discounts * torch.cat([vs[1:], bootstrap[None]]) - v)
        loss = (
            -(logp * advantages).mean()
            + cfg.vf_loss_coeff * 0.5 * ((v - vs) ** 2).mean()
            - cfg.entropy_coeff * dist.entropy().mean()
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        return loss.item()


def learner_vs_plain(reps: int, num_actions: int = 6) -> List[tuple]:
    config = IMPALAConfig().rl_module(model_config=MODEL).training(train_batch_size=FRAGMENT * FRAGMENTS).debugging(seed=0)
    space = gym.spaces.Box(0, 255, OBS_SHAPE, np.uint8)
    learner = config.build_learner(spaces=(space, gym.spaces.Discrete(num_actions)))
    learner.build()
    plain = PlainIMPALA(num_actions, config)
    batch = image_batch(num_actions)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    for _ in range(2):  # warm-up: allocator, Adam state
        plain.update(tensors)
        learner.update(batch)
    plain_s, learner_s = [], []
    for _ in range(reps):
        start = time.perf_counter()
        plain.update({k: torch.from_numpy(v) for k, v in batch.items()})
        plain_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        learner.update(batch)
        learner_s.append(time.perf_counter() - start)
    rows = len(batch["obs"])
    p, d = statistics.median(plain_s), statistics.median(learner_s)
    return [
        ("plain PyTorch IMPALA update, 500 uint8 rows", f"{p * 1000:.0f} ms", f"{rows / p:,.0f}", "1.00"),
        ("dlearner IMPALA Learner.update, same batch", f"{d * 1000:.0f} ms", f"{rows / d:,.0f}", f"{p / d:.2f}"),
    ]


# -- 3 and 4. the cluster runs --------------------------------------------------------------------------
def socket_bytes_received(pids: Dict[str, int]) -> Dict[str, int]:
    """Bytes each process has received on its open TCP sockets (``ss -tinp``'s ``bytes_received``,
    the kernel's per-socket count): Dask's comms between the driver, the scheduler and the workers
    keep their connections open, so the difference over a window is what crossed the network."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    by_pid = {pid: name for name, pid in pids.items()}
    totals = {name: 0 for name in pids}
    owner = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's first line names its process
            found = re.search(r"pid=(\d+)", line)
            owner = by_pid.get(int(found.group(1))) if found else None
        elif owner is not None:
            received = re.search(r"bytes_received:(\d+)", line)
            if received:
                totals[owner] += int(received.group(1))
    return totals


def cluster_run(config_class, env_id: str, seconds: float, warmup_s: float, num_envs: int) -> Dict[str, float]:
    config = (
        config_class()
        .environment(env_id, atari=True)
        # Many envs per runner: one forward pass acts for all of them, and the CNN's cost per
        # observation falls with the batch (~0.22 ms each for 8, ~0.14 ms for 64 on one core here).
        .env_runners(num_env_runners=1, num_envs_per_env_runner=num_envs)
        .learners(num_learners=1)
        .rl_module(model_config=MODEL)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        client = algo.client
        learner_worker = algo.learner_group.learner_workers[0]
        runner_worker = algo.env_runner_group.workers[0]
        pids = client.run(os.getpid, workers=[learner_worker, runner_worker])
        processes = {"driver": os.getpid(), "learner": pids[learner_worker], "env runner": pids[runner_worker]}
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            algo.train()
        before = socket_bytes_received(processes)
        sampled0, trained0 = algo.num_env_steps_sampled_lifetime, algo.num_env_steps_trained_lifetime
        start = time.perf_counter()
        returns = []
        while time.perf_counter() - start < seconds:
            result = algo.train()
            returns.append(result["env_runners"].get("episode_return_mean"))
        elapsed = time.perf_counter() - start
        after = socket_bytes_received(processes)
        sampled = algo.num_env_steps_sampled_lifetime - sampled0
        trained = algo.num_env_steps_trained_lifetime - trained0
    reads = {name: after[name] - before[name] for name in processes}
    return {
        "sampled_per_s": sampled / elapsed,
        "trained_per_s": trained / elapsed,
        "driver_bytes_per_step": reads["driver"] / max(sampled, 1),
        "learner_bytes_per_step": reads["learner"] / max(trained, 1),
        "runner_bytes_per_step": reads["env runner"] / max(sampled, 1),
        "return": next((r for r in reversed(returns) if r is not None), float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="ALE/Pong-v5")
    parser.add_argument("--raw-steps", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=15, help="timed updates of each kind (interleaved)")
    parser.add_argument("--seconds", type=float, default=90.0, help="timed window of each cluster run")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of training before the window")
    parser.add_argument("--num-envs", type=int, default=32, help="envs per env runner in the cluster runs")
    parser.add_argument("--parts", default="raw,learner,runs", help="which measurements (1: raw, 2: learner, 3-4: runs)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start", flush=True)

    raw = float("nan")
    if "raw" in parts or "runs" in parts:
        raw = raw_env_rate(args.env, args.raw_steps)
        print_table(
            f"1. {args.env} with atari=True, random actions, one process",
            [("raw env rate", f"{raw:,.0f} agent steps/s", f"{4 * raw:,.0f} frames/s")],
            header=("run", "agent steps/s", "frames/s"),
        )
    if "learner" in parts:
        print_table(
            "2. IMPALA update on 500 uint8 84x84x4 rows, one torch thread (median of interleaved reps)",
            learner_vs_plain(args.reps),
            header=("run", "median update", "trained agent steps/s", "vs plain"),
        )
    if "runs" not in parts:
        return
    rows = []
    for name, config_class in (("APPO", APPOConfig), ("IMPALA", IMPALAConfig)):
        out = cluster_run(config_class, args.env, args.seconds, args.warmup, args.num_envs)
        rows.append(
            (
                f"{name}, 1 env runner ({args.num_envs} envs) + 1 learner",
                f"{out['sampled_per_s']:,.0f}",
                f"{out['sampled_per_s'] / raw:.2f}",
                f"{out['trained_per_s']:,.0f}",
                f"{out['driver_bytes_per_step'] / OBS_BYTES:.3f}",
                f"{out['learner_bytes_per_step'] / OBS_BYTES:.3f}",
                f"{out['runner_bytes_per_step']:,.0f}",
                f"{out['return']:.1f}",
            )
        )
        print(f"{name}: {out}", flush=True)
    print_table(
        f"3-4. {args.env}: {args.seconds:.0f} s after a {args.warmup:.0f} s warm-up; bytes as multiples of one uint8 "
        f"observation ({OBS_BYTES:,} B)",
        rows,
        header=(
            "run",
            "sampled steps/s",
            "vs raw",
            "trained steps/s",
            "driver reads / sampled step",
            "learner reads / trained step",
            "env runner reads / step (B)",
            "return",
        ),
    )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
