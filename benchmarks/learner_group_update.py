"""Median time per PPO update of the 4000-row batch: LearnerGroup (0, 1, 2 learners) vs plain PyTorch.

Run from the project root: ``python benchmarks/learner_group_update.py [--repeats 15] [--rounds 3]``

Workload (``../shared/data/README.md``, "W1"): the 4000-row CartPole PPO batch (the shared file when
present, else a generated one), separate policy and value MLPs of [256, 256] tanh, minibatch 128,
2 epochs, Adam lr 3e-4, clip 0.3, value clip 10, value coefficient 1, KL loss on (0.2, target 0.01).

Rows:

* plain PyTorch, one process: a hand-written PPO loop (``_common.PlainPPO``), one torch thread;
* dlearner ``num_learners=0``: the local Learner in this process;
* dlearner ``num_learners=1``: one Dask learner actor (the batch goes to its worker every update);
* plain DDP, two processes (``torch.multiprocessing``, gloo, ``DistributedDataParallel``) doing
  dlearner's arithmetic: the minibatch of 128 is global, so each rank trains on 64 rows per step
  (twice the all-reduces of RLlib's per-learner minibatch: compare like with like);
* dlearner ``num_learners=2``: two Dask learners, sharded batch, one gradient all-reduce per step;
* latency of one blocking update of a 32-row batch on the 2-learner group (and the same in plain DDP);
* the time to a ready 2-learner group, embedded cluster included, vs plain DDP start-up
  (``learner_group_ready.py``, run in fresh processes; ``--ready-rounds 0`` skips it).

Measurements are interleaved in ``--rounds`` rounds so that load on the machine hits every row
alike; every process uses one torch thread. If Ray RLlib is importable, its LearnerGroup runs the
same workload too (optional).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import W1, PlainPPO, fmt_s, load_w1_batch, print_table, sample_times, to_tensors, w1_training  # noqa: E402

from dlearner import PPOConfig  # noqa: E402
from dlearner.backends.dask.cluster import connect  # noqa: E402

TIMESTEPS = {"num_env_steps_sampled_lifetime": 4000}


def dlearner_config(num_learners: int) -> PPOConfig:
    return (
        PPOConfig()
        .learners(num_learners=num_learners, num_cpus_per_learner=1)
        .training(**w1_training())
        .rl_module(model_config={"fcnet_hiddens": W1["hiddens"]})
        .debugging(seed=0)
    )


# ----------------------------------------------------------------------------- plain 2-process DDP
class _Net(nn.Module):
    def __init__(self, pi: nn.Module, vf: nn.Module):
        super().__init__()
        self.pi, self.vf = pi, vf

    def forward(self, obs: torch.Tensor):
        return self.pi(obs), self.vf(obs).squeeze(-1)


def _ppo_loss(logits, values, mb, kl_coeff):
    """The same arithmetic as ``_common.PlainPPO.loss`` (and dlearner's PPO loss)."""
    c = W1
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, mb["actions"].unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - mb["action_logp"])
    adv = mb["advantages"]
    policy_loss = -torch.min(adv * ratio, adv * ratio.clamp(1 - c["clip_param"], 1 + c["clip_param"])).mean()
    vf_loss = torch.clamp((values - mb["value_targets"]) ** 2, 0, c["vf_clip_param"]).mean()
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    old_logp = F.log_softmax(mb["action_dist_inputs"], dim=-1)
    kl = (old_logp.exp() * (old_logp - logp_all)).sum(-1).mean()
    return policy_loss + c["vf_loss_coeff"] * vf_loss - c["entropy_coeff"] * entropy + kl_coeff * kl, kl.detach()


def _ddp_rank(rank: int, port: int, commands, replies) -> None:
    """One DDP rank: waits for ``(rows, repeats)`` commands, replies with rank 0's update times."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    plain = PlainPPO(seed=0)
    model = nn.parallel.DistributedDataParallel(_Net(plain.pi, plain.vf))
    optimizer = torch.optim.Adam(model.parameters(), lr=W1["lr"])
    kl_coeff = W1["kl_coeff"]
    full = to_tensors(load_w1_batch())
    generator = torch.Generator().manual_seed(0)  # the same permutation on both ranks
    while True:
        command = commands[rank].get()
        if command is None:
            break
        rows, repeats = command
        batch = {k: v[:rows] for k, v in full.items()}
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            kls = []
            for _ in range(W1["num_epochs"]):
                perm = torch.randperm(rows, generator=generator)
                for i in range(0, rows, W1["minibatch_size"]):
                    idx = perm[i : i + W1["minibatch_size"]]
                    half = (len(idx) + 1) // 2
                    mine = idx[:half] if rank == 0 else idx[half:]  # global minibatch: ~64 rows per rank
                    mb = {k: v[mine] for k, v in batch.items()}
                    optimizer.zero_grad(set_to_none=True)
                    logits, values = model(mb["obs"])
                    loss, kl = _ppo_loss(logits, values, mb, kl_coeff)
                    loss.backward()  # DDP averages the gradients over both ranks here
                    optimizer.step()
                    kls.append(kl)
            mean_kl = torch.stack(kls).mean().reshape(1)
            dist.all_reduce(mean_kl)  # the KL coefficient adapts to the mean over all ranks
            mean_kl = float(mean_kl) / 2
            if mean_kl > 2 * W1["kl_target"]:
                kl_coeff *= 1.5
            elif mean_kl < 0.5 * W1["kl_target"]:
                kl_coeff *= 0.5
            times.append(time.perf_counter() - start)
        if rank == 0:
            replies.put(times)
    dist.destroy_process_group()


class PlainDDP:
    """Two spawned DDP ranks kept alive between rounds."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.commands = [ctx.Queue(), ctx.Queue()]
        self.replies = ctx.Queue()
        self.procs = [ctx.Process(target=_ddp_rank, args=(r, port, self.commands, self.replies)) for r in range(2)]
        for p in self.procs:
            p.start()

    def run(self, rows: int, repeats: int) -> List[float]:
        for q in self.commands:
            q.put((rows, repeats))
        return self.replies.get(timeout=600)

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)


# ---------------------------------------------------------------------------------------- RLlib
def rllib_rows(batch: Dict[str, np.ndarray], repeats: int) -> List[tuple]:
    """RLlib's LearnerGroup on the same workload, if Ray RLlib is importable (optional)."""
    try:
        import ray
        from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
        from ray.rllib.policy.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch
    except ImportError:
        print("\nRay RLlib is not installed: its LearnerGroup was not measured.")
        return []
    rows = []
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        for n in (0, 2):
            config = (
                RLlibPPOConfig()
                .environment("CartPole-v1")
                .learners(num_learners=n)
                .training(**w1_training())
                .rl_module(model_config={"fcnet_hiddens": W1["hiddens"]})
            )
            group = config.build_learner_group(env=gym.make("CartPole-v1"))
            sample = MultiAgentBatch({DEFAULT_POLICY_ID: SampleBatch(dict(batch))}, env_steps=len(batch["obs"]))
            times = []
            for i in range(repeats + 2):
                start = time.perf_counter()
                group.update(batch=sample, timesteps=TIMESTEPS)
                if i >= 2:
                    times.append(time.perf_counter() - start)
            rows.append((f"RLlib LearnerGroup, num_learners={n}", statistics.median(times)))
            group.shutdown()
    except Exception as err:  # noqa: BLE001 - optional row: report, never fail the benchmark
        print(f"\nRLlib LearnerGroup run failed: {err!r}")
    finally:
        ray.shutdown()
    return rows


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12, help="timed updates per row (over all rounds)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--latency-repeats", type=int, default=200, help="timed 32-row updates")
    parser.add_argument(
        "--ready-rounds",
        type=int,
        default=3,
        help="rounds of learner_group_ready.py (time to a ready 2-learner group, fresh processes); 0 skips it",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = load_w1_batch()
    small = {k: v[:32] for k, v in batch.items()}
    env = gym.make("CartPole-v1")
    per_round = max(1, args.repeats // args.rounds)

    # Spawned before any Dask worker exists, so DDP ranks inherit no Dask-nanny environment.
    ddp = PlainDDP()
    connection = connect(dlearner_config(2).cluster(cluster_kwargs={"silence_logs": logging.ERROR}), 3)
    client = connection.client
    plain = PlainPPO(seed=0)
    tensors = to_tensors(batch)
    local = dlearner_config(0).build_learner_group(env=env)
    one = dlearner_config(1).cluster(client=client).build_learner_group(env=env)
    two = dlearner_config(2).cluster(client=client).build_learner_group(env=env)
    times: Dict[str, List[float]] = {k: [] for k in ("plain", "local", "dask1", "ddp", "dask2")}

    def timed(fn, n: int, warmup: int = 1) -> List[float]:
        return sample_times(fn, repeats=n, warmup=warmup)

    try:
        for _ in range(args.rounds):
            for _ in range(per_round):  # plain and local interleaved update by update
                times["plain"] += timed(lambda: plain.update(tensors), 1, warmup=0)
                times["local"] += timed(lambda: local.update(batch, timesteps=TIMESTEPS), 1, warmup=0)
            times["dask1"] += timed(lambda: one.update(batch, timesteps=TIMESTEPS), per_round)
            times["ddp"] += ddp.run(len(batch["obs"]), per_round + 1)[1:]
            times["dask2"] += timed(lambda: two.update(batch, timesteps=TIMESTEPS), per_round)
        latency_two, latency_ddp, latency_local = [], [], []
        chunk = max(1, args.latency_repeats // 10)
        for _ in range(max(1, args.latency_repeats // chunk)):  # interleaved in chunks, like the rows above
            latency_two += timed(lambda: two.update(small, timesteps=TIMESTEPS), chunk, warmup=2)
            latency_ddp += ddp.run(32, chunk + 2)[2:]
            latency_local += timed(lambda: local.update(small, timesteps=TIMESTEPS), chunk, warmup=2)
        one.shutdown()
        rllib = rllib_rows(batch, per_round * args.rounds)
    finally:
        ddp.close()
        two.shutdown()
        one.shutdown()
        local.shutdown()
        connection.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    lat = {k: statistics.median(v) for k, v in (("two", latency_two), ("ddp", latency_ddp), ("local", latency_local))}
    rows = [
        ("plain PyTorch, 1 process", fmt_s(med["plain"]), "1.00", "reference", ""),
        ("dlearner num_learners=0 (local)", fmt_s(med["local"]), f"{med['local'] / med['plain']:.2f}", "plain PyTorch", ""),
        (
            "dlearner num_learners=1 (Dask)",
            fmt_s(med["dask1"]),
            f"{med['dask1'] / med['local']:.2f}",
            "num_learners=0",
            f"<= 1.10: {'met' if med['dask1'] / med['local'] <= 1.10 else 'MISSED'}",
        ),
        ("plain DDP, 2 processes (64 rows/rank/step)", fmt_s(med["ddp"]), "1.00", "reference", ""),
        (
            "dlearner num_learners=2 (Dask)",
            fmt_s(med["dask2"]),
            f"{med['dask2'] / med['ddp']:.2f}",
            "plain DDP",
            f"<= 1.00: {'met' if med['dask2'] / med['ddp'] <= 1.00 else 'MISSED'}",
        ),
    ]
    for name, value in rllib:
        rows.append(
            (
                name,
                fmt_s(value),
                f"{value / med['ddp' if '2' in name else 'local']:.2f}",
                "plain DDP" if "2" in name else "num_learners=0",
                "optional",
            )
        )
    print_table(
        f"PPO update of the 4000-row batch, [256, 256] MLPs, minibatch 128 (global), 2 epochs "
        f"(median of {len(times['plain'])} per row over {args.rounds} interleaved rounds, 1 torch thread per process)",
        rows,
        header=("run", "median", "ratio", "vs", "goal"),
    )
    print_table(
        f"Latency of one blocking 32-row update (median of {args.latency_repeats})",
        [
            (
                "dlearner num_learners=2 (Dask)",
                fmt_s(lat["two"]),
                f"{lat['two'] / lat['ddp']:.2f}",
                "plain DDP",
                f"<= 1.25: {'met' if lat['two'] / lat['ddp'] <= 1.25 else 'MISSED'}",
            ),
            ("plain DDP, 2 processes", fmt_s(lat["ddp"]), "1.00", "reference", ""),
            ("dlearner num_learners=0 (local)", fmt_s(lat["local"]), "", "", ""),
        ],
        header=("run", "median", "ratio", "vs", "goal"),
    )
    if args.ready_rounds > 0:
        # Start-up needs fresh processes (a user's script builds its group once): its own script,
        # run after everything above has shut down.
        subprocess.run([sys.executable, str(HERE / "learner_group_ready.py"), "--rounds", str(args.ready_rounds)], check=True)


if __name__ == "__main__":
    main()
