"""Time to a ready 2-learner LearnerGroup, embedded Dask cluster included, vs plain 2-process DDP start-up.

Run from the project root: ``python benchmarks/learner_group_ready.py [--rounds 5]``

Each measurement runs in a fresh Python process (this script with ``--child``), because a user's
script builds its group once: a second build in one process would find the dashboard's modules
imported already. Like a user's script, this one imports torch, gymnasium and dlearner at the top,
so every spawned process (Dask's worker processes and the DDP ranks alike) imports them too. Timed,
after those imports:

* ``dlearner``: ``PPOConfig().learners(num_learners=2, num_cpus_per_learner=1)`` with the W1 settings
  (``learner_group_update.dlearner_config``), ``.build_learner_group(env=gym.make("CartPole-v1"))``
  until it returns: the embedded ``LocalCluster`` (scheduler, dashboard, two nanny-supervised worker
  processes), the learners built (module, Adam) and their gloo process group formed;
* ``DDP init``: ``torch.multiprocessing`` spawns two processes that ``init_process_group("gloo")``,
  until both have joined (the parent hears from both);
* ``DDP ready to train``: the same, and each rank also builds W1's policy and value MLPs, wraps
  them in ``DistributedDataParallel`` and makes their Adam optimizer (what a learner does when it
  builds: the first optimizer of a process imports ``torch._dynamo``, ~1 s of CPU).

The three are interleaved round by round so that load on the machine falls on all alike; the table
gives medians and the ratios of dlearner's to each reference, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

import gymnasium as gym
import torch
import torch.multiprocessing as mp

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import W1, PlainPPO, fmt_s, print_table  # noqa: E402
from learner_group_update import dlearner_config  # noqa: E402

MODES = ("dlearner", "ddp-init", "ddp-ready")


def _ddp_rank(rank: int, port: int, build: bool, ready) -> None:
    """One DDP rank: join the process group (and build the model, DDP and Adam), say so, leave."""
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if build:
        plain = PlainPPO(seed=0)  # W1's policy and value MLPs (and an Adam the rank does not use)
        model = nn.parallel.DistributedDataParallel(nn.ModuleDict({"pi": plain.pi, "vf": plain.vf}))
        torch.optim.Adam(model.parameters(), lr=W1["lr"])
    ready.put(rank)
    dist.barrier()  # nobody leaves before the parent has heard from both
    dist.destroy_process_group()


def measure_ddp(build: bool) -> float:
    """Seconds from spawning two ranks to both having joined (and built, if ``build``)."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_ddp_rank, args=(rank, port, build, ready)) for rank in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(timeout=60)
    return elapsed


def measure_dlearner() -> float:
    """Seconds for ``build_learner_group`` of 2 learners, embedded cluster included."""
    env = gym.make("CartPole-v1")
    config = dlearner_config(2)
    start = time.perf_counter()
    group = config.build_learner_group(env=env)
    elapsed = time.perf_counter() - start
    group.shutdown()
    return elapsed


def run_child(mode: str) -> float:
    """One measurement of ``mode`` in a fresh process (this script with ``--child``)."""
    out = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", mode],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"--child {mode} failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    return float(json.loads(lines[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one measurement of each per round)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        seconds = measure_dlearner() if args.child == "dlearner" else measure_ddp(build=args.child == "ddp-ready")
        print(json.dumps({"seconds": seconds}))
        return
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(run_child(mode))
    load_after = os.getloadavg()
    med = {mode: statistics.median(t) for mode, t in times.items()}
    print_table(
        f"2-learner group ready, fresh process each (median of {args.rounds} interleaved rounds; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPUs)",
        [
            ("plain DDP: spawn 2 + init_process_group", fmt_s(med["ddp-init"]), "1.00", "reference", ""),
            ("plain DDP: + MLPs, DDP wrapper, Adam", fmt_s(med["ddp-ready"]), "1.00", "reference", ""),
            (
                "dlearner LearnerGroup(2), embedded cluster",
                fmt_s(med["dlearner"]),
                f"{med['dlearner'] / med['ddp-init']:.2f} / {med['dlearner'] / med['ddp-ready']:.2f}",
                "DDP init / DDP ready",
                f"<= 2.5 s: {'met' if med['dlearner'] <= 2.5 else 'MISSED'}",
            ),
        ],
        header=("run", "median", "ratio", "vs", "goal"),
    )
    print("all times (s):", {mode: [round(t, 2) for t in ts] for mode, ts in times.items()})


if __name__ == "__main__":
    main()
