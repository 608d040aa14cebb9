"""Shared pieces of the benchmarks: the fixed PPO batch (W1) and a plain-PyTorch PPO update.

The plain-PyTorch reference does the same arithmetic as dlearner's PPO learner (separate policy and
value MLPs, clipped surrogate, clamped value loss, entropy, KL penalty, Adam), written the way a
person would write it by hand, so the ratio measures dlearner's overhead and nothing else.
"""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_BATCH = ROOT.parent / "shared" / "data" / "cartpole_4000_batch.npz"

# The W1 workload of ../shared/data/README.md.
W1 = dict(
    hiddens=[256, 256],
    minibatch_size=128,
    num_epochs=2,
    lr=3e-4,
    clip_param=0.3,
    vf_clip_param=10.0,
    vf_loss_coeff=1.0,
    kl_coeff=0.2,
    kl_target=0.01,
    entropy_coeff=0.0,
)


def w1_training(cfg: Dict = W1) -> Dict:
    """The ``.training(...)`` settings of the W1 workload (dlearner's and RLlib's PPOConfig take the same names)."""
    names = ("lr", "minibatch_size", "num_epochs", "clip_param", "vf_clip_param", "vf_loss_coeff", "kl_coeff", "kl_target")
    return {**{name: cfg[name] for name in names}, "use_kl_loss": True, "entropy_coeff": cfg["entropy_coeff"]}


def load_w1_batch(rows: int = 4000) -> Dict[str, np.ndarray]:
    """The shared CartPole batch when present, else one generated with an untrained policy."""
    if SHARED_BATCH.exists():
        with np.load(SHARED_BATCH) as data:
            batch = {k: data[k] for k in data.files}
        return {k: v[:rows] for k, v in batch.items()}
    return synthetic_ppo_batch(rows)


def synthetic_ppo_batch(rows: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """A well-formed CartPole-shaped PPO batch of any size, from an untrained policy."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=0.01, size=(rows, 2)).astype(np.float32)
    actions = rng.integers(0, 2, size=rows).astype(np.int32)
    logp = (logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(rows), actions].astype(np.float32)
    adv = rng.normal(size=rows).astype(np.float32)
    return {
        "obs": rng.normal(scale=0.5, size=(rows, 4)).astype(np.float32),
        "actions": actions,
        "action_logp": logp,
        "action_dist_inputs": logits,
        "advantages": (adv - adv.mean()) / adv.std(),
        "value_targets": rng.uniform(0, 20, size=rows).astype(np.float32),
    }


def mlp(in_dim: int, out_dim: int, hiddens: List[int]) -> nn.Sequential:
    layers, last = [], in_dim
    for h in hiddens:
        layers += [nn.Linear(last, h), nn.Tanh()]
        last = h
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class PlainPPO:
    """Hand-written PPO update over a batch of tensors (the reference for the ratios)."""

    def __init__(self, obs_dim: int = 4, num_actions: int = 2, seed: int = 0, cfg: dict = W1):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.pi = mlp(obs_dim, num_actions, cfg["hiddens"])
        self.vf = mlp(obs_dim, 1, cfg["hiddens"])
        self.params = list(self.pi.parameters()) + list(self.vf.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg["lr"])
        self.kl_coeff = cfg["kl_coeff"]

    def loss(self, mb: Dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        logp_all = F.log_softmax(self.pi(mb["obs"]), dim=-1)
        logp = logp_all.gather(-1, mb["actions"].unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - mb["action_logp"])
        adv = mb["advantages"]
        policy_loss = -torch.min(adv * ratio, adv * ratio.clamp(1 - c["clip_param"], 1 + c["clip_param"])).mean()
        vf_loss = torch.clamp((self.vf(mb["obs"]).squeeze(-1) - mb["value_targets"]) ** 2, 0, c["vf_clip_param"]).mean()
        probs = logp_all.exp()
        entropy = -(probs * logp_all).sum(-1).mean()
        old_logp = F.log_softmax(mb["action_dist_inputs"], dim=-1)
        kl = (old_logp.exp() * (old_logp - logp_all)).sum(-1).mean()
        self.last_kl = kl.detach()
        return policy_loss + c["vf_loss_coeff"] * vf_loss - c["entropy_coeff"] * entropy + self.kl_coeff * kl

    def update(self, batch: Dict[str, torch.Tensor], step_hook: Callable[[], None] = None) -> None:
        n = len(batch["obs"])
        mbs = self.cfg["minibatch_size"]
        kls = []
        for _ in range(self.cfg["num_epochs"]):
            perm = torch.randperm(n)
            for i in range(0, n, mbs):
                idx = perm[i : i + mbs]
                mb = {k: v[idx] for k, v in batch.items()}
                self.opt.zero_grad(set_to_none=True)
                self.loss(mb).backward()
                if step_hook is not None:
                    step_hook()
                self.opt.step()
                kls.append(self.last_kl)
        mean_kl = float(torch.stack(kls).mean())
        if mean_kl > 2 * self.cfg["kl_target"]:
            self.kl_coeff *= 1.5
        elif mean_kl < 0.5 * self.cfg["kl_target"]:
            self.kl_coeff *= 0.5


def to_tensors(batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    out["actions"] = out["actions"].long()
    return out


def sample_times(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> List[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
    return statistics.median(sample_times(fn, repeats=repeats, warmup=warmup))


def print_table(title: str, rows: List[tuple], header=("run", "median", "ratio", "vs")) -> None:
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"
