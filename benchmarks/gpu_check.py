"""One command that answers dlearner's GPU questions (issue 12): one table, and a JSON of the figures.

Run on a GPU machine (a minute or two expected on one GPU, 6 at most: ``--max-minutes`` skips the
phases that would start later; every figure is written to the JSON as soon as its phase ends, so a
run cut short keeps what it measured)::

    python benchmarks/gpu_check.py --out gpu_check.json

Dry run on any machine (what CI runs: every phase on the CPU with tiny sizes; the 2-GPU NCCL phase
runs its logic with gloo on the CPU)::

    python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/gpu_check.json

Setup on a fresh checkout of a GPU machine. The README's install pins torch through
``constraints.txt`` (``torch==2.13.0``, the CPU build on the project's own machines). Install the
CUDA build of that same version first, from PyTorch's wheel index for the CUDA version the machine's
driver supports (``nvidia-smi`` prints the highest one as "CUDA Version"; the index names for each
torch release are listed on https://pytorch.org/get-started/previous-versions, e.g. ``cu126``,
``cu128``, ``cu130``), then run the README's command unchanged::

    python3 -m venv .venv
    .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
    .venv/bin/pip install -q -c constraints.txt -e .
    .venv/bin/python -c "import torch; print(torch.__version__, torch.cuda.is_available())"  # 2.13.0+cu128 True
    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json

The constraint ``torch==2.13.0`` names a version, not a build: the installed ``2.13.0+cu128``
satisfies it (PEP 440 ignores the ``+cu128`` local label when the specifier has none), so the second
install keeps the CUDA build. A constraints file that pins ``torch==2.13.0+cpu`` would not; use one
without such a pin.

Phases (``--phases`` runs a subset; each phase's figures land under ``phases.<name>`` in the JSON):

``facts``        ``nvidia-smi`` and ``torch.cuda`` facts (GPUs, driver, CUDA/cuDNN/NCCL versions).
``w1``           the W1 PPO update (4000 rows, [256, 256], minibatch 128, 2 epochs) on one learner with
                 ``num_gpus_per_learner=1``, local and as a Dask actor, vs the same raw-torch update on
                 the GPU (goal <= 1.05x); the CPU-bound parts (batch validation and conversion, host ->
                 device copies pageable and pinned, metrics) timed on their own.
``large``        the same comparison for a model where the GPU matters: [1024, 1024], 64k rows,
                 minibatch 4096.
``shared_gpu``   2 learners sharing one GPU (``num_gpus_per_learner=0.5``, gloo): backend, devices,
                 identical weights, time per W1 update.
``nccl_pair``    with >= 2 GPUs: 2 learners with NCCL vs raw 2-process DDP with NCCL on W1 (skipped,
                 and said so, on one GPU).
``checkpoint``   save/restore of GPU-resident state: a local learner and a 1-learner group; restored
                 onto the learner's device, with equal bits.

Every timed call is synchronised with the GPU (dlearner's results are Python floats, the raw loops
end with a ``float()`` of the mean KL, and the copies call ``torch.cuda.synchronize()``), measured
interleaved after warm-up updates, with one torch thread per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import W1, PlainPPO, fmt_s, load_w1_batch, print_table, synthetic_ppo_batch, to_tensors, w1_training  # noqa: E402

import dlearner  # noqa: E402
from dlearner import PPOConfig  # noqa: E402
from dlearner.batch import validate_batch  # noqa: E402
from dlearner.devices import choose_backend, device_for_rank, gpu_packing, host_transfer  # noqa: E402
from dlearner.metrics import MetricsLogger  # noqa: E402

PHASES = ("facts", "w1", "large", "shared_gpu", "nccl_pair", "checkpoint")
W1_GOAL = 1.05  # dlearner on one GPU vs the raw-torch update (issue 12)
DASK1_GOAL = 1.10  # one Dask learner vs the local learner (as benchmarks/learner_group_update.py)
PAIR_GOAL = 1.15  # two learners vs raw 2-process DDP (as benchmarks/learner_group_update.py)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Workload sizes: the real ones on a GPU, tiny ones for the CPU dry run."""

    w1_rows: int
    w1_hiddens: Tuple[int, ...]
    large_rows: int
    large_hiddens: Tuple[int, ...]
    large_minibatch: int
    repeats: int
    large_repeats: int
    warmup: int


GPU_SIZES = Sizes(4000, (256, 256), 65536, (1024, 1024), 4096, repeats=15, large_repeats=8, warmup=3)
DRY_SIZES = Sizes(512, (32, 32), 2048, (64, 64), 512, repeats=3, large_repeats=2, warmup=1)


# ====================================================================================== context
class Check:
    """What every phase shares: mode, device, sizes, the open learner groups, the table rows."""

    def __init__(self, dry_run: bool, sizes: Sizes):
        self.dry_run = dry_run
        self.sizes = sizes
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
        self.env = gym.make("CartPole-v1")
        self.rows: List[tuple] = []
        self.figures: Dict[str, Any] = {}
        self._groups: Dict[tuple, Any] = {}
        self.w1_cfg = dict(W1, hiddens=list(sizes.w1_hiddens))
        self.large_cfg = dict(W1, hiddens=list(sizes.large_hiddens), minibatch_size=sizes.large_minibatch)

    def gpus_per_learner(self, wanted: float) -> float:
        """``wanted`` on a GPU run; 0 (CPU learners) in the dry run."""
        return 0.0 if self.dry_run else wanted

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def config(self, cfg: dict, *, num_learners: int, gpus: float) -> PPOConfig:
        return (
            PPOConfig()
            .learners(num_learners=num_learners, num_gpus_per_learner=gpus, num_cpus_per_learner=1)
            .training(**w1_training(cfg))
            .rl_module(model_config={"fcnet_hiddens": list(cfg["hiddens"])})
            .cluster(cluster_kwargs={"silence_logs": logging.ERROR})
            .debugging(seed=0)
        )

    def local_learner(self, cfg: dict, gpus: float):
        learner = self.config(cfg, num_learners=0, gpus=gpus).build_learner(env=self.env)
        learner.build()
        return learner

    def group(self, cfg: dict, *, num_learners: int, gpus: float):
        """A LearnerGroup on its own embedded LocalCluster, kept open for later phases (same key)."""
        key = (tuple(cfg["hiddens"]), cfg["minibatch_size"], num_learners, gpus)
        if key not in self._groups:
            self._groups[key] = self.config(cfg, num_learners=num_learners, gpus=gpus).build_learner_group(env=self.env)
        return self._groups[key]

    def close(self) -> None:
        for group in self._groups.values():
            try:
                group.shutdown()
            except Exception as err:  # noqa: BLE001 - report, keep closing the others
                print(f"closing a learner group failed: {err!r}", file=sys.stderr)
            logging.getLogger("distributed").setLevel(logging.ERROR)  # a closed cluster restores Dask's INFO
        self._groups.clear()
        self.env.close()

    def row(
        self, phase: str, run: str, seconds: Optional[float], ratio: Optional[float] = None, vs: str = "", note: str = ""
    ) -> None:
        self.rows.append((phase, run, fmt_time(seconds), f"{ratio:.2f}" if ratio is not None else "", vs, note))

    def goal(self, ratio: float, goal: float) -> str:
        """The goal column: met or MISSED on a GPU; CPU dry-run figures say nothing about the goals."""
        if self.dry_run:
            return f"<= {goal} on GPU (n/a in dry run)"
        return f"<= {goal}: {'met' if ratio <= goal else 'MISSED'}"


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else fmt_s(seconds)


def timesteps(rows: int) -> Dict[str, int]:
    return {"num_env_steps_sampled_lifetime": rows}


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(runs: Dict[str, Callable[[], Any]], repeats: int, warmup: int, sync: Callable[[], None]) -> Dict[str, float]:
    """Median seconds of each run, measured round-robin so machine noise hits all alike."""
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, fn in runs.items():
            t = timed(fn, sync)
            if i >= warmup:
                samples[name].append(t)
    return {name: statistics.median(v) for name, v in samples.items()}


def median_of(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    return interleaved({"x": fn}, repeats, warmup, sync)["x"]


def raw_ppo(cfg: dict, device: torch.device) -> PlainPPO:
    """The hand-written PPO update (``_common.PlainPPO``) with its networks on ``device``."""
    plain = PlainPPO(seed=0, cfg=cfg)
    plain.pi.to(device)
    plain.vf.to(device)  # parameters move in place: the optimizer (still without state) keeps them
    return plain


def to_device(batch: Dict[str, np.ndarray], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in to_tensors(batch).items()}


# ====================================================================== learner-side reports
def state_report(learner: Any) -> Dict[str, Any]:
    """Where a learner's state lives and a digest of its bits (runs in the driver or on a worker)."""
    weights, optim = hashlib.sha256(), hashlib.sha256()
    param_devices, optim_devices, step_devices = set(), set(), set()
    for mid, module in sorted(learner.module.items()):
        for name, tensor in module.state_dict().items():
            param_devices.add(str(tensor.device))
            weights.update(f"{mid}/{name}".encode())
            weights.update(tensor.detach().cpu().numpy().tobytes())
        for opt_name, optimizer in learner.get_optimizers_for_module(mid):
            for i, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
                for key, value in sorted(optimizer.state.get(param, {}).items()):
                    if not torch.is_tensor(value):
                        continue
                    (step_devices if key == "step" else optim_devices).add(str(value.device))
                    optim.update(f"{mid}/{opt_name}/{i}/{key}".encode())
                    optim.update(value.detach().cpu().numpy().tobytes())
    return {
        "device": str(learner.device),
        "param_devices": sorted(param_devices),
        "optimizer_devices": sorted(optim_devices),
        "optimizer_step_devices": sorted(step_devices),
        "weights_sha256": weights.hexdigest(),
        "optimizer_sha256": optim.hexdigest(),
    }


def same_state(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Bit equality of two ``get_state()`` results (arrays: same dtype, shape and bytes)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# ========================================================================================= facts
def nvidia_smi() -> Dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False}
    fields = (
        "index,name,uuid,driver_version,memory.total,memory.used,pcie.link.gen.current,"
        "pcie.link.width.current,clocks.max.sm,power.limit"
    )
    out: Dict[str, Any] = {"found": True, "fields": fields.split(",")}
    for key, args in (
        ("query", ["--query-gpu=" + fields, "--format=csv,noheader,nounits"]),
        ("topology", ["topo", "-m"]),
        ("summary", []),
    ):
        try:
            proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
            out[key] = proc.stdout.strip() if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as err:
            out[key] = f"failed: {err!r}"
    if isinstance(out.get("query"), str) and not out["query"].startswith(("exit", "failed")):
        out["gpus"] = [dict(zip(out["fields"], (c.strip() for c in line.split(",")))) for line in out["query"].splitlines()]
    return out


def phase_facts(check: Check) -> Dict[str, Any]:
    import dask
    import distributed
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    devices = []
    for i in range(check.gpus):
        p = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "total_memory_gib": round(p.total_memory / 2**30, 2),
                "multi_processor_count": p.multi_processor_count,
                "uuid": str(getattr(p, "uuid", "")),
            }
        )
    nccl_version = None
    if cuda:
        try:
            v = torch.cuda.nccl.version()
            nccl_version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as err:  # noqa: BLE001 - a fact, not a failure
            nccl_version = f"unknown ({err!r})"
    facts = {
        "mode": "cpu-dry-run" if check.dry_run else "gpu",
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "device_count": check.gpus,
        "devices": devices,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl_available": bool(dist.is_available() and dist.is_nccl_available()),
        "nccl_version": nccl_version,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "dlearner": getattr(dlearner, "__version__", "unknown"),
        "nvidia_smi": nvidia_smi(),
    }
    name = devices[0]["name"] if devices else "no CUDA device"
    check.row(
        "facts",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {check.gpus} GPU(s): {name}",
        None,
        note=f"NCCL {nccl_version}" if cuda else "CPU only",
    )
    return facts


# ================================================================================ update phases
def update_comparison(check: Check, phase: str, cfg: dict, batch: Dict[str, np.ndarray], repeats: int) -> Dict[str, Any]:
    """dlearner (local and one Dask learner) vs the raw-torch update of the same batch on the device,
    plus the CPU-bound parts of dlearner's update timed on their own."""
    gpus = check.gpus_per_learner(1)
    device, sync, warmup = check.device, check.sync, check.sizes.warmup
    rows = len(batch["obs"])
    ts = timesteps(rows)
    plain = raw_ppo(cfg, device)
    resident = to_device(batch, device)
    learner = check.local_learner(cfg, gpus)
    group = check.group(cfg, num_learners=1, gpus=gpus)
    med = interleaved(
        {
            "raw_resident": lambda: plain.update(resident),
            "raw_from_numpy": lambda: plain.update(to_device(batch, device)),
            "dlearner_local": lambda: learner.update(batch, timesteps=ts),
            "dlearner_dask1": lambda: group.update(batch, timesteps=ts),
        },
        repeats,
        warmup,
        sync,
    )

    # The CPU-bound parts, each on its own.
    specs = learner.batch_specs()
    validated = validate_batch(batch, specs)
    steps = cfg["num_epochs"] * math.ceil(rows / cfg["minibatch_size"])
    result = learner.update(batch, timesteps=ts)
    per_step_metrics = max(1, len(result["default_policy"]) - 2)  # less the learning rate and step count

    def metrics() -> None:
        logger = MetricsLogger()
        value = torch.zeros((), device=device)
        for _ in range(steps):
            for k in range(per_step_metrics):
                logger.log_value(("default_policy", f"m{k}"), value)
        logger.reduce()

    def pinned_copy() -> None:
        {k: v.pin_memory().to(device, non_blocking=True) for k, v in to_tensors(batch).items()}

    parts = {
        "validate_s": median_of(lambda: validate_batch(batch, specs), repeats, warmup, sync),
        "convert_and_copy_s": median_of(lambda: learner._to_tensors(validated), repeats, warmup, sync),
        "h2d_pageable_s": median_of(lambda: to_device(batch, device), repeats, warmup, sync),
        "h2d_pinned_s": median_of(pinned_copy, repeats, warmup, sync) if device.type == "cuda" else None,
        "metrics_s": median_of(metrics, repeats, warmup, sync),
    }
    cpu_bound = parts["validate_s"] + parts["convert_and_copy_s"] + parts["metrics_s"]
    ratio = med["dlearner_local"] / med["raw_from_numpy"]
    figures = {
        "device": str(learner.device),
        "group_device": check_devices(group)[0],
        "rows": rows,
        "hiddens": list(cfg["hiddens"]),
        "minibatch_size": cfg["minibatch_size"],
        "num_epochs": cfg["num_epochs"],
        "gradient_steps": steps,
        "repeats": repeats,
        "num_gpus_per_learner": gpus,
        **{f"{k}_s": v for k, v in med.items()},
        "ratio_local_vs_raw_from_numpy": ratio,
        "ratio_local_vs_raw_resident": med["dlearner_local"] / med["raw_resident"],
        "ratio_dask1_vs_local": med["dlearner_dask1"] / med["dlearner_local"],
        "ratio_dask1_vs_raw_from_numpy": med["dlearner_dask1"] / med["raw_from_numpy"],
        "goal_local_vs_raw": W1_GOAL,
        "goal_met": None if check.dry_run else ratio <= W1_GOAL,
        "breakdown": {
            **parts,
            "metrics_values_per_step": per_step_metrics,
            "cpu_bound_s": cpu_bound,
            "cpu_bound_share_of_local": cpu_bound / med["dlearner_local"],
            "transfer_plan": dataclasses.asdict(host_transfer(learner.device.type, torch.cuda.is_available())),
        },
    }
    where = "GPU" if device.type == "cuda" else "CPU (dry run)"
    check.row(phase, f"raw torch, batch resident on {where}", med["raw_resident"], 1.0, "reference")
    check.row(
        phase,
        "raw torch, from numpy (convert + copy)",
        med["raw_from_numpy"],
        med["raw_from_numpy"] / med["raw_resident"],
        "resident",
    )
    check.row(
        phase,
        f"dlearner local, num_gpus_per_learner={gpus:g}",
        med["dlearner_local"],
        ratio,
        "raw from numpy",
        check.goal(ratio, W1_GOAL),
    )
    check.row(
        phase,
        "dlearner 1 Dask learner",
        med["dlearner_dask1"],
        figures["ratio_dask1_vs_local"],
        "dlearner local",
        check.goal(figures["ratio_dask1_vs_local"], DASK1_GOAL),
    )
    check.row(phase, "  of which: validate batch", parts["validate_s"])
    check.row(phase, "  of which: convert + copy to device", parts["convert_and_copy_s"])
    check.row(phase, "  of which: metrics (log per step, reduce)", parts["metrics_s"])
    check.row(phase, "  (raw host->device copy, pageable)", parts["h2d_pageable_s"])
    check.row(
        phase,
        "  (raw host->device copy, pinned)",
        parts["h2d_pinned_s"],
        note="" if parts["h2d_pinned_s"] is not None else "needs CUDA",
    )
    return figures


def check_devices(group: Any) -> List[str]:
    return [r["device"] for r in group.foreach_learner(state_report)]


def phase_w1(check: Check) -> Dict[str, Any]:
    batch = load_w1_batch(check.sizes.w1_rows)
    figures = update_comparison(check, "w1", check.w1_cfg, batch, check.sizes.repeats)
    figures["batch_source"] = (
        "shared/data/cartpole_4000_batch.npz"
        if (HERE.parent.parent / "shared" / "data" / "cartpole_4000_batch.npz").exists()
        else "generated"
    )
    check.figures["w1_dask1_s"] = figures["dlearner_dask1_s"]
    return figures


def phase_large(check: Check) -> Dict[str, Any]:
    return update_comparison(
        check, "large", check.large_cfg, synthetic_ppo_batch(check.sizes.large_rows), check.sizes.large_repeats
    )


def phase_shared_gpu(check: Check) -> Dict[str, Any]:
    """Two learners on one GPU with 0.5 GPU each: gloo, both on cuda:0, identical weights."""
    gpus = check.gpus_per_learner(0.5)
    batch = load_w1_batch(check.sizes.w1_rows)
    ts = timesteps(len(batch["obs"]))
    group = check.group(check.w1_cfg, num_learners=2, gpus=gpus)
    median = median_of(lambda: group.update(batch, timesteps=ts), check.sizes.repeats, check.sizes.warmup, check.sync)
    reports = group.foreach_learner(state_report)
    identical = len({r["weights_sha256"] for r in reports}) == 1
    planned = [device_for_rank(r, 0.5, embedded=True, visible_gpus=max(1, check.gpus)) for r in range(2)]
    reference = check.figures.get("w1_dask1_s")
    figures = {
        "num_gpus_per_learner": gpus,
        "backend": group.collective_backend,
        "expected_backend": choose_backend(0.5).backend,
        "learner_devices": [r["device"] for r in reports],
        "planned_devices_at_0_5": planned,
        "learners_per_gpu_at_0_5": gpu_packing(0.5).learners_per_gpu,
        "identical_weights": identical,
        "update_s": median,
        "ratio_vs_one_learner": median / reference if reference else None,
        "repeats": check.sizes.repeats,
    }
    check.row(
        "shared_gpu",
        f"2 learners x {gpus:g} GPU ({figures['backend']}, {', '.join(figures['learner_devices'])})",
        median,
        figures["ratio_vs_one_learner"],
        "1 Dask learner" if reference else "",
        "identical weights" if identical else "WEIGHTS DIFFER",
    )
    return figures


# ---------------------------------------------------------------------------- raw DDP, 2 ranks
def _ddp_rank(
    rank: int, port: int, backend: str, device_type: str, cfg: dict, rows: int, repeats: int, warmup: int, replies: Any
) -> None:
    """One rank of the raw-DDP reference: W1 with the global minibatch split over two ranks, as dlearner does."""
    import torch.distributed as dist
    from learner_group_update import _Net, _ppo_loss
    from torch import nn

    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        plain = PlainPPO(seed=0, cfg=cfg)
        net = _Net(plain.pi, plain.vf).to(device)
        model = nn.parallel.DistributedDataParallel(net, device_ids=[rank] if device.type == "cuda" else None)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        kl_coeff = cfg["kl_coeff"]
        batch = to_device(load_w1_batch(rows), device)
        generator = torch.Generator().manual_seed(0)
        mbs = cfg["minibatch_size"]
        times = []
        for i in range(warmup + repeats):
            dist.barrier()
            start = time.perf_counter()
            kls = []
            for _ in range(cfg["num_epochs"]):
                perm = torch.randperm(rows, generator=generator)
                for j in range(0, rows, mbs):
                    idx = perm[j : j + mbs]
                    half = (len(idx) + 1) // 2
                    mine = (idx[:half] if rank == 0 else idx[half:]).to(device)
                    mb = {k: v[mine] for k, v in batch.items()}
                    optimizer.zero_grad(set_to_none=True)
                    logits, values = model(mb["obs"])
                    loss, kl = _ppo_loss(logits, values, mb, kl_coeff)
                    loss.backward()
                    optimizer.step()
                    kls.append(kl)
            mean_kl = torch.stack(kls).mean().reshape(1)
            dist.all_reduce(mean_kl)
            mean_kl = float(mean_kl) / 2  # synchronises with the device
            kl_coeff *= 1.5 if mean_kl > 2 * cfg["kl_target"] else (0.5 if mean_kl < 0.5 * cfg["kl_target"] else 1.0)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        if rank == 0:
            replies.put(times)
    finally:
        dist.destroy_process_group()


def raw_ddp_times(backend: str, device_type: str, cfg: dict, rows: int, repeats: int, warmup: int) -> List[float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replies = ctx.Queue()
    procs = [
        ctx.Process(target=_ddp_rank, args=(r, port, backend, device_type, cfg, rows, repeats, warmup, replies)) for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        return replies.get(timeout=240)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def phase_nccl_pair(check: Check) -> Dict[str, Any]:
    """Two learners with a GPU each (NCCL) vs raw 2-process DDP with NCCL; gloo on CPU in the dry run."""
    if not check.dry_run and check.gpus < 2:
        reason = f"needs 2 GPUs, this machine has {check.gpus}"
        check.row("nccl_pair", "2 learners with NCCL vs raw DDP", None, note=f"skipped: {reason}")
        return {"skipped": reason, "device_count": check.gpus}
    gpus = check.gpus_per_learner(1)
    backend = "gloo" if check.dry_run else "nccl"
    batch = load_w1_batch(check.sizes.w1_rows)
    rows = len(batch["obs"])
    group = check.group(check.w1_cfg, num_learners=2, gpus=gpus)
    median = median_of(
        lambda: group.update(batch, timesteps=timesteps(rows)), check.sizes.repeats, check.sizes.warmup, check.sync
    )
    reports = group.foreach_learner(state_report)
    ddp = statistics.median(
        raw_ddp_times(backend, check.device.type, check.w1_cfg, rows, check.sizes.repeats, check.sizes.warmup)
    )
    ratio = median / ddp
    figures = {
        "num_gpus_per_learner": gpus,
        "backend": group.collective_backend,
        "expected_backend": backend,
        "learner_devices": [r["device"] for r in reports],
        "identical_weights": len({r["weights_sha256"] for r in reports}) == 1,
        "dlearner_pair_s": median,
        "raw_ddp_s": ddp,
        "raw_ddp_backend": backend,
        "ratio_vs_raw_ddp": ratio,
        "goal": PAIR_GOAL,
        "goal_met": None if check.dry_run else ratio <= PAIR_GOAL,
        "repeats": check.sizes.repeats,
    }
    check.row("nccl_pair", f"raw DDP, 2 processes ({backend})", ddp, 1.0, "reference")
    check.row(
        "nccl_pair",
        f"dlearner 2 learners ({figures['backend']}, {', '.join(figures['learner_devices'])})",
        median,
        ratio,
        "raw DDP",
        check.goal(ratio, PAIR_GOAL),
    )
    return figures


# ==================================================================================== checkpoint
def phase_checkpoint(check: Check) -> Dict[str, Any]:
    """Save GPU-resident state and restore it: onto the learner's device, with equal bits."""
    gpus = check.gpus_per_learner(1)
    cfg = check.w1_cfg
    batch = load_w1_batch(check.sizes.w1_rows)
    ts = timesteps(len(batch["obs"]))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dlearner-gpu-check-"))
    try:
        learner = check.local_learner(cfg, gpus)
        learner.update(batch, timesteps=ts)  # optimizer state exists (on the device) from here on
        t0 = time.perf_counter()
        learner.save_to_path(str(tmp / "learner"))
        save_s = time.perf_counter() - t0
        twin = check.local_learner(cfg, gpus)
        t0 = time.perf_counter()
        twin.restore_from_path(str(tmp / "learner"))
        restore_s = time.perf_counter() - t0
        saved, restored = state_report(learner), state_report(twin)
        want = str(learner.device)
        on_device = restored["param_devices"] == [want] and restored["optimizer_devices"] == [want]
        equal_bits = (
            saved["weights_sha256"] == restored["weights_sha256"]
            and saved["optimizer_sha256"] == restored["optimizer_sha256"]
            and same_state(learner.get_state(), twin.get_state())
        )
        # Both go on with the same update: same numbers (GPU kernels of one shape are deterministic
        # for these layers; a difference here is worth a look, not necessarily a bug).
        learner.update(batch, timesteps=ts)
        twin.update(batch, timesteps=ts)
        next_diff = max(
            float(np.max(np.abs(a - b))) if a.size else 0.0
            for a, b in zip(_arrays(learner.get_state()), _arrays(twin.get_state()))
        )

        group = check.group(cfg, num_learners=1, gpus=gpus)
        group.update(batch, timesteps=ts)
        t0 = time.perf_counter()
        group.save_to_path(str(tmp / "group"))
        group_save_s = time.perf_counter() - t0
        before = group.foreach_learner(state_report)[0]
        group.update(batch, timesteps=ts)  # move away from the saved state, then come back
        t0 = time.perf_counter()
        group.restore_from_path(str(tmp / "group"))
        group_restore_s = time.perf_counter() - t0
        after = group.foreach_learner(state_report)[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    group_ok = (
        after["param_devices"] == [after["device"]]
        and after["optimizer_devices"] == [after["device"]]
        and after["weights_sha256"] == before["weights_sha256"]
        and after["optimizer_sha256"] == before["optimizer_sha256"]
    )
    figures = {
        "learner_device": want,
        "restored_param_devices": restored["param_devices"],
        "restored_optimizer_devices": restored["optimizer_devices"],
        "restored_optimizer_step_devices": restored["optimizer_step_devices"],
        "restored_on_device": on_device,
        "equal_bits": equal_bits,
        "next_update_max_abs_diff": next_diff,
        "save_s": save_s,
        "restore_s": restore_s,
        "group_device": after["device"],
        "group_restored_param_devices": after["param_devices"],
        "group_restored_on_device_equal_bits": group_ok,
        "group_save_s": group_save_s,
        "group_restore_s": group_restore_s,
    }
    ok = "on device, equal bits" if on_device and equal_bits else "NOT RESTORED EXACTLY"
    check.row("checkpoint", f"learner save ({want})", save_s, note=ok)
    check.row("checkpoint", "learner restore", restore_s, note=f"next update max |diff| {next_diff:.1e}")
    check.row("checkpoint", "1-learner group save", group_save_s)
    check.row(
        "checkpoint",
        "1-learner group restore",
        group_restore_s,
        note="on device, equal bits" if group_ok else "NOT RESTORED EXACTLY",
    )
    return figures


def _arrays(tree: Any):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _arrays(tree[key])
    elif isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        yield tree


# ========================================================================================== main
RUNNERS: Dict[str, Callable[[Check], Dict[str, Any]]] = {
    "facts": phase_facts,
    "w1": phase_w1,
    "large": phase_large,
    "shared_gpu": phase_shared_gpu,
    "nccl_pair": phase_nccl_pair,
    "checkpoint": phase_checkpoint,
}


def write_json(path: Optional[pathlib.Path], report: Dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (or docs/cluster.md, 'GPU learners') for the setup.",
    )
    parser.add_argument("--out", type=pathlib.Path, help="write the figures as JSON here (updated after every phase)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every phase on the CPU with tiny sizes (CI)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}")
    parser.add_argument("--repeats", type=int, help="timed updates per run (default: 15 on a GPU, 3 in the dry run)")
    parser.add_argument("--max-minutes", type=float, default=6.0, help="skip the phases that would start after this")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}.")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            f"gpu_check: torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda}). Install "
            "the CUDA build of torch (see this script's docstring), or run with --cpu-dry-run.",
            file=sys.stderr,
        )
        return 2
    sizes = DRY_SIZES if args.cpu_dry_run else GPU_SIZES
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be >= 1.")
        sizes = dataclasses.replace(sizes, repeats=args.repeats, large_repeats=max(1, min(args.repeats, sizes.large_repeats)))
    torch.set_num_threads(1)
    # Dask's own logging is INFO by default; each embedded cluster silences it while it runs and
    # restores the level it found when it closes, so set the quiet level before the first one.
    logging.getLogger("distributed").setLevel(logging.ERROR)
    start = time.monotonic()
    report: Dict[str, Any] = {
        "meta": {
            "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu",
            "argv": sys.argv[1:],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sizes": dataclasses.asdict(sizes),
        },
        "phases": {},
    }
    failed = []
    check = Check(args.cpu_dry_run, sizes)
    try:
        for name in phases:
            elapsed = time.monotonic() - start
            if elapsed > args.max_minutes * 60:
                report["phases"][name] = {"skipped": f"time budget: {elapsed:.0f} s > --max-minutes {args.max_minutes:g}"}
                check.row(name, "-", None, note="skipped: time budget")
                continue
            print(f"[gpu_check {elapsed:6.1f} s] {name} ...", file=sys.stderr, flush=True)
            phase_start = time.monotonic()
            try:
                figures = RUNNERS[name](check)
            except Exception as err:  # noqa: BLE001 - record it, measure the other phases
                failed.append(name)
                figures = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
                check.row(name, "-", None, note=f"FAILED: {type(err).__name__}: {str(err)[:80]}")
                traceback.print_exc()
            figures["phase_wall_s"] = time.monotonic() - phase_start
            report["phases"][name] = figures
            report["meta"]["wall_s"] = time.monotonic() - start
            write_json(args.out, report)
    finally:
        check.close()
    report["meta"]["wall_s"] = time.monotonic() - start
    report["meta"]["failed_phases"] = failed
    write_json(args.out, report)
    mode = "CPU dry run (tiny sizes; not GPU figures)" if args.cpu_dry_run else f"{check.gpus} GPU(s)"
    print_table(
        f"dlearner GPU check, {mode}: medians of {sizes.repeats} updates ({sizes.large_repeats} for 'large') after "
        f"{sizes.warmup} warm-up, {report['meta']['wall_s']:.0f} s in all",
        check.rows,
        header=("phase", "run", "median", "ratio", "vs", "goal / note"),
    )
    if args.out:
        print(f"\nfigures: {args.out}")
    if failed:
        print(f"\nfailed phases: {', '.join(failed)} (tracebacks above and in the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
