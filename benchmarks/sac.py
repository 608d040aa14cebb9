"""SAC on Pendulum-v1 (issue 18): env steps and wall time until the mean return reaches -250, the
updates per second while training against a plain PyTorch SAC update in the same process, and
optionally a MuJoCo row (HalfCheetah-v5 after 100,000 env steps).

Run: python benchmarks/sac.py [--seeds 3] [--setups rllib,defaults,defaults-2] [--curves PATH] [--quick]
                              [--override JSON] [--mujoco [--mujoco-steps 100000]]

Every learning run uses 1 env-runner actor and 1 or 2 learner actors on an embedded LocalCluster;
its wall time starts before ``build_algo``, so it includes the cluster's start-up. A run stops at the
first iteration whose ``episode_return_mean`` (5-episode smoothing, RLlib's tuned example's setting,
for every setup so the figures compare) reaches -250, or at ``--max-steps``; then 10 greedy episodes
give the evaluation return. Iterations sample ``--iteration-steps`` env steps (500, where dlearner's
default is 1,000) for a finer curve.

Setups: "rllib" is RLlib's tuned example ``pendulum_sac.py`` (RLLIB_TRAINING, RLLIB_MODEL; one
update per env step as there); "defaults" is ``SACConfig()`` as it is, with 1 learner, and
"defaults-2" the same with 2 learners, whose curve must equal 1 learner's (batch sizes are global:
2 learners train 128 rows each of the same 256-row batch). ``--override JSON`` adds "override", the
defaults with ``{"training": {...}, "model_config": {...}}`` on top (to try other defaults).

Updates/s while training: the updates of the iterations that began with learning under way, over
those iterations' wall time (sampling and weight syncs included, as in a real run). The reference
is a plain PyTorch SAC update (CleanRL-style: twin Q, tanh-squashed Gaussian, three Adams, polyak;
one torch thread) of the same networks on 256 rows drawn uniformly from 10,000 Pendulum-shaped
rows, timed in this process before and after the learning runs. "learner alone" rows time
dlearner's SAC learner in this process (``update_from_replay_buffer`` on the same rows, the setup's
buffer type), interleaved with the plain loop, to split dlearner's overhead into the learner's and
the pipeline's (sampling, the cluster's calls, weight syncs).

``--mujoco`` adds one HalfCheetah-v5 run (seed 0, dlearner's defaults, 5,000 env steps per
iteration, ~10 minutes on 2 cores): its smoothed and greedy returns after ``--mujoco-steps`` env
steps and its env steps/s including start-up. It needs the optional extra ``pip install
"gymnasium[mujoco]"`` (mujoco and its dependencies, ~100 MB installed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402
from replay_buffer import pendulum_columns  # noqa: E402

from dlearner import SACConfig  # noqa: E402

STOP_RETURN = -250.0
SMOOTHING_EPISODES = 5
BATCH_ROWS = 256
#: RLlib 2.60 on this 2-core machine, its tuned example's settings, 1 env-runner actor (from the issue).
RLLIB_ROW = ("RLlib 2.60 SAC, its settings (reference)", "1", "10,860", "293.6 s", "-", "~37 (1 per env step)", "-", "-", "-")
#: RLlib's tuned example ``rllib/tuned_examples/sac/pendulum_sac.py`` (new API stack), in dlearner's names.
RLLIB_TRAINING = dict(
    initial_alpha=1.001,
    actor_lr=2e-4,
    critic_lr=8e-4,
    alpha_lr=9e-4,
    target_entropy="auto",
    n_step=[2, 5],
    tau=0.005,
    train_batch_size=BATCH_ROWS,
    replay_buffer_config={"type": "prioritized", "capacity": 100_000, "alpha": 1.0, "beta": 0.0},
    num_steps_sampled_before_learning_starts=256,
)
RLLIB_MODEL = {"fcnet_hiddens": [256, 256], "fcnet_activation": "relu"}
#: Updates per timed block of the update-cost measurements (as many as one learner call makes).
BLOCK_UPDATES = 16
PLAIN_ROWS = 10_000


@dataclass
class Setup:
    """One row of learning runs: what is set on top of ``SACConfig()``."""

    label: str
    num_learners: int
    training: Dict = field(default_factory=dict)
    model_config: Optional[Dict] = None

    def config(self, env: str, seed: int, iteration_steps: int) -> SACConfig:
        config = (
            SACConfig()
            .environment(env)
            .env_runners(num_env_runners=1)
            .learners(num_learners=self.num_learners)
            .training(**self.training, min_sample_timesteps_per_iteration=iteration_steps)
            .reporting(metrics_num_episodes_for_smoothing=SMOOTHING_EPISODES)
            .debugging(seed=seed)
        )
        if self.model_config is not None:
            config.rl_module(model_config=self.model_config)
        return config

    def hiddens(self) -> List[int]:
        return list((self.model_config or SACConfig().model_config)["fcnet_hiddens"])


SETUPS = {
    "rllib": Setup("dlearner, RLlib's settings", 1, RLLIB_TRAINING, RLLIB_MODEL),
    "defaults": Setup("dlearner, its defaults", 1),
    "defaults-2": Setup("dlearner, its defaults", 2),
}


# ------------------------------------------------------------------------- plain PyTorch reference
def mlp(in_dim: int, out_dim: int, hiddens: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for size in hiddens:
        layers += [nn.Linear(in_dim, size), nn.ReLU()]
        in_dim = size
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class PlainSAC:
    """A hand-written SAC update (CleanRL's ``sac_continuous_action.py`` layout): the reference for the ratios."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, action_dim: int, hiddens: List[int], lr: float = 1e-3, gamma=0.99, tau=0.005, seed=0):
        torch.manual_seed(seed)
        self.actor = mlp(obs_dim, 2 * action_dim, hiddens)
        self.qf1, self.qf2 = mlp(obs_dim + action_dim, 1, hiddens), mlp(obs_dim + action_dim, 1, hiddens)
        self.qf1_target, self.qf2_target = copy.deepcopy(self.qf1), copy.deepcopy(self.qf2)
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.q_optimizer = torch.optim.Adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), lr=lr)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=lr)
        self.gamma, self.tau, self.target_entropy = gamma, tau, -float(action_dim)

    def sample_action(self, obs: torch.Tensor):
        mean, log_std = self.actor(obs).chunk(2, dim=-1)
        log_std = self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        logp = (-0.5 * ((u - mean) / std).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2 * (math.log(2.0) - u - F.softplus(-2 * u))).sum(-1)  # tanh's Jacobian
        return torch.tanh(u), logp

    def update(self, b: Dict[str, torch.Tensor]) -> None:
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_action, next_logp = self.sample_action(b["new_obs"])
            x = torch.cat([b["new_obs"], next_action], -1)
            q_next = torch.min(self.qf1_target(x), self.qf2_target(x)).squeeze(-1) - alpha * next_logp
            target = b["rewards"] + self.gamma * (1 - b["terminateds"]) * q_next
        x = torch.cat([b["obs"], b["actions"]], -1)
        q_loss = F.mse_loss(self.qf1(x).squeeze(-1), target) + F.mse_loss(self.qf2(x).squeeze(-1), target)
        self.q_optimizer.zero_grad()
        q_loss.backward()
        self.q_optimizer.step()
        action, logp = self.sample_action(b["obs"])
        x = torch.cat([b["obs"], action], -1)
        actor_loss = (alpha * logp - torch.min(self.qf1(x), self.qf2(x)).squeeze(-1)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        alpha_loss = (-self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()
        with torch.no_grad():
            for net, target_net in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
                for param, target_param in zip(net.parameters(), target_net.parameters()):
                    target_param.data.copy_(self.tau * param.data + (1 - self.tau) * target_param.data)


def update_costs(setup: Setup, blocks: int) -> Dict[str, List[float]]:
    """Seconds per update of the plain loop and of dlearner's learner in this process, on the same
    10,000 rows, interleaved in blocks of BLOCK_UPDATES updates (the first of each is warm-up)."""
    torch.set_num_threads(1)
    columns = pendulum_columns(PLAIN_ROWS)
    rng = np.random.default_rng(0)
    tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in columns.items() if k != "n_step"}
    plain = PlainSAC(3, 1, setup.hiddens())

    def plain_block() -> None:
        for _ in range(BLOCK_UPDATES):
            index = torch.from_numpy(rng.integers(0, PLAIN_ROWS, BATCH_ROWS))
            plain.update({k: v[index] for k, v in tensors.items()})

    env = gym.make("Pendulum-v1")
    learner = setup.config("Pendulum-v1", 0, 1000).learners(num_learners=0).build_learner(env=env)
    learner.build()
    learner.update_from_replay_buffer(
        columns, row_batch_id="rows", num_updates=0, batch_size=BATCH_ROWS, timesteps={"num_env_steps_sampled_lifetime": 0}
    )
    timesteps = {"num_env_steps_sampled_lifetime": PLAIN_ROWS}

    def learner_block() -> None:
        learner.update_from_replay_buffer(
            None, row_batch_id="rows", num_updates=BLOCK_UPDATES, batch_size=BATCH_ROWS, timesteps=timesteps
        )

    out: Dict[str, List[float]] = {"plain": [], "learner": []}
    for i in range(blocks + 1):
        for name, block in (("plain", plain_block), ("learner", learner_block)):
            start = time.perf_counter()
            block()
            if i > 0:
                out[name].append((time.perf_counter() - start) / BLOCK_UPDATES)
    env.close()
    return out


# ---------------------------------------------------------------------------------- learning runs
def load() -> float:
    return os.getloadavg()[0]


def learning_run(setup: Setup, seed: int, *, env: str, iteration_steps: int, max_steps: int, stop_return: Optional[float]):
    """One run: train until the smoothed return reaches ``stop_return`` (None: never) or ``max_steps``."""
    load_before = load()
    start = time.perf_counter()
    config = setup.config(env, seed, iteration_steps)
    learning_starts = config.num_steps_sampled_before_learning_starts
    curve, crossing = [], None
    learning_updates, learning_seconds = 0.0, 0.0
    with config.build_algo() as algo:
        startup = time.perf_counter() - start
        sampled = trained = 0
        while True:
            began = time.perf_counter()
            result = algo.train()
            seconds = time.perf_counter() - began
            updates = (result["num_env_steps_trained_lifetime"] - trained) / config.train_batch_size
            if sampled >= learning_starts:  # learning was under way during the whole iteration
                learning_updates += updates
                learning_seconds += seconds
            sampled, trained = result["num_env_steps_sampled_lifetime"], result["num_env_steps_trained_lifetime"]
            ret = result["env_runners"]["episode_return_mean"]
            wall = time.perf_counter() - start
            curve.append({"env_steps": sampled, "wall_s": wall, "iteration_s": seconds, "return_mean": ret, "updates": updates})
            if crossing is None and stop_return is not None and ret is not None and ret >= stop_return:
                crossing = {"env_steps": sampled, "wall_s": wall}
                break
            if sampled >= max_steps:
                break
        evaluation = algo.evaluate(10, seed=seed)["env_runners"]["episode_return_mean"]
    return {
        "setup": setup.label,
        "num_learners": setup.num_learners,
        "seed": seed,
        "startup_s": startup,
        "crossing": crossing,
        "env_steps": sampled,
        "wall_s": time.perf_counter() - start,
        "updates_per_s": learning_updates / learning_seconds if learning_seconds else float("nan"),
        "final_return_mean": curve[-1]["return_mean"],
        "greedy_eval": evaluation,
        "load_before": load_before,
        "load_after": load(),
        "curve": curve,
    }


# ------------------------------------------------------------------------------------------ table
def spread(values: List[float], fmt: str) -> str:
    """``median (min to max)`` of ``values``, or ``-`` when empty."""
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)} to {format(max(values), fmt)})"


def run_row(label: str, runs: List[dict], plain_per_update: float) -> tuple:
    crossed = [r for r in runs if r["crossing"]]
    rates = [r["updates_per_s"] for r in runs]
    return (
        label,
        str(runs[0]["num_learners"]),
        spread([r["crossing"]["env_steps"] for r in crossed], ",.0f"),
        spread([r["crossing"]["wall_s"] for r in crossed], ".1f"),
        spread([r["startup_s"] for r in runs], ".1f"),
        spread(rates, ".1f"),
        f"{statistics.median(rates) * plain_per_update:.2f}",
        spread([r["greedy_eval"] for r in runs], ".0f"),
        f"{len(crossed)}/{len(runs)}",
    )


def cost_row(label: str, per_update: List[float], plain: Optional[List[float]]) -> tuple:
    ms = statistics.median(per_update)
    ratio = f"{statistics.median(plain) / ms:.2f}" if plain else "1.00"
    return (label, "-", "-", "-", "-", f"{1 / ms:.1f} ({ms * 1e3:.2f} ms/update)", ratio, "-", "-")


def compare_learners(one: List[dict], two: List[dict]) -> List[str]:
    """Per seed: does 2 learners' curve equal 1 learner's? Their updates agree to float rounding (the
    mean gradient is summed from two halves), and RL amplifies such differences over many updates,
    so this gives both the iterations whose returns are identical and those within 1 of each other."""
    lines = []
    for a, b in zip(one, two):
        diffs = [abs(p["return_mean"] - q["return_mean"]) for p, q in zip(a["curve"], b["curve"])]
        diffs = [0.0 if math.isnan(d) else d for d in diffs]  # no episode finished yet in either
        identical = next((i for i, d in enumerate(diffs) if d > 0), len(diffs))
        close = next((i for i, d in enumerate(diffs) if d > 1.0), len(diffs))
        steps = [r["crossing"]["env_steps"] if r["crossing"] else None for r in (a, b)]
        lines.append(
            f"seed {a['seed']}: env steps at {STOP_RETURN:g}: 1 learner {steps[0]}, 2 learners {steps[1]}; of {len(diffs)} common "
            f"iterations the returns are identical in the first {identical}, within 1 in the first {close}; "
            f"max |difference| {max(diffs, default=0.0):.3g}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--setups", default="rllib,defaults,defaults-2", help=f"comma-separated, of {sorted(SETUPS)}")
    parser.add_argument("--iteration-steps", type=int, default=500, help="min_sample_timesteps_per_iteration")
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--blocks", type=int, default=15, help=f"timed blocks of {BLOCK_UPDATES} updates per cost measurement")
    parser.add_argument(
        "--override", type=json.loads, help='add setup "override": the defaults with {"training": ..., "model_config": ...}'
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, setups rllib,defaults, 5 blocks")
    parser.add_argument("--mujoco", action="store_true", help="add HalfCheetah-v5 (needs gymnasium[mujoco]), 1 seed")
    parser.add_argument("--mujoco-steps", type=int, default=100_000)
    parser.add_argument("--curves", type=pathlib.Path, help="write every run's per-iteration curve to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.setups, args.blocks = 1, "rllib,defaults", 5
    names = args.setups.split(",") if args.setups else []
    if args.override is not None:
        SETUPS["override"] = Setup(
            "dlearner, defaults + override", 1, args.override.get("training", {}), args.override.get("model_config")
        )
        names.append("override")
    unknown = sorted(set(names) - set(SETUPS))
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; choose from {sorted(SETUPS)}")

    # The update's cost, before and after the learning runs (the machine's load may change between).
    # One measurement per distinct update (2 learners make the same update as 1).
    cost_setups: Dict[str, Setup] = {}
    for name in names:
        if all((s.training, s.model_config) != (SETUPS[name].training, SETUPS[name].model_config) for s in cost_setups.values()):
            cost_setups[name] = SETUPS[name]
    costs = {name: update_costs(setup, args.blocks) for name, setup in cost_setups.items()}
    runs: Dict[str, List[dict]] = {}
    for name in names:
        runs[name] = [
            learning_run(
                SETUPS[name],
                seed,
                env="Pendulum-v1",
                iteration_steps=args.iteration_steps,
                max_steps=args.max_steps,
                stop_return=STOP_RETURN,
            )
            for seed in range(args.seeds)
        ]
        for r in runs[name]:
            print(
                f"{name} seed {r['seed']}: crossing {r['crossing']}, {r['env_steps']} env steps, {r['wall_s']:.1f} s, "
                f"{r['updates_per_s']:.1f} updates/s, eval {r['greedy_eval']:.0f}, load {r['load_before']:.1f}-{r['load_after']:.1f}",
                flush=True,
            )
    for name, setup in cost_setups.items():
        for key, values in update_costs(setup, args.blocks).items():
            costs[name][key] += values
    mujoco = None
    if args.mujoco:
        mujoco = learning_run(
            SETUPS["defaults"], 0, env="HalfCheetah-v5", iteration_steps=5000, max_steps=args.mujoco_steps, stop_return=None
        )

    plain_by_hiddens = {}
    for name, cost in costs.items():
        plain_by_hiddens.setdefault(tuple(SETUPS[name].hiddens()), []).extend(cost["plain"])
    rows = [RLLIB_ROW]
    for hiddens, per_update in plain_by_hiddens.items():
        rows.append(cost_row(f"plain PyTorch SAC update {list(hiddens)}", per_update, None))
    for name, cost in costs.items():
        rows.append(cost_row(f"  dlearner learner alone, {name} ({SETUPS[name].hiddens()})", cost["learner"], cost["plain"]))
    for name in names:
        plain = plain_by_hiddens[tuple(SETUPS[name].hiddens())]
        rows.append(run_row(f"{SETUPS[name].label} {SETUPS[name].hiddens()}", runs[name], statistics.median(plain)))
    loads = [x for rs in runs.values() for r in rs for x in (r["load_before"], r["load_after"])]
    print_table(
        f"SAC, Pendulum-v1, 1 env-runner actor, mean return ({SMOOTHING_EPISODES}-episode smoothing) >= {STOP_RETURN:g}: "
        f"median (min to max) of {args.seeds} seeds; wall time incl. cluster start-up; "
        f"{args.iteration_steps} env steps per iteration; 1-min load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
        f"on {os.cpu_count()} cores",
        rows,
        header=(
            "run",
            "learners",
            f"env steps to {STOP_RETURN:g}",
            "wall to it (s)",
            "start-up (s)",
            "updates/s in training",
            "vs plain",
            "greedy eval",
            "reached",
        ),
    )
    print(
        "Goals: RLlib's settings >= 0.85x plain updates/s and -250 within 11,000 env steps; "
        "defaults -250 within 10,000 env steps and <= 60 s; 2 learners the same curve as 1."
    )
    if "defaults" in runs and "defaults-2" in runs:
        print("\n2 learners vs 1 (dlearner defaults):")
        for line in compare_learners(runs["defaults"], runs["defaults-2"]):
            print("  " + line)
    if mujoco is not None:
        print(
            f"\nHalfCheetah-v5 (mujoco), dlearner defaults {SETUPS['defaults'].hiddens()}, seed 0: mean return "
            f"({SMOOTHING_EPISODES} episodes) {mujoco['final_return_mean']:.0f} after {mujoco['env_steps']:,} env steps, "
            f"greedy eval {mujoco['greedy_eval']:.0f}, {mujoco['env_steps'] / mujoco['wall_s']:.1f} env steps/s "
            f"({mujoco['wall_s']:.0f} s incl. start-up), {mujoco['updates_per_s']:.1f} updates/s in training, "
            f"load {mujoco['load_before']:.1f}-{mujoco['load_after']:.1f}"
        )
    if args.curves:
        args.curves.write_text(
            json.dumps(
                {
                    "update_costs_s": costs,
                    "runs": [r for rs in runs.values() for r in rs],
                    "mujoco": mujoco,
                },
                indent=1,
            )
        )
        print(f"\ncurves written to {args.curves}")


if __name__ == "__main__":
    main()
