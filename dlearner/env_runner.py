"""Env runners: step gymnasium vector environments with the current policy and return trajectories.

An :class:`EnvRunner` knows nothing about Dask either: the driver runs one itself when
``num_env_runners=0``, and the Dask plumbing wraps it as an actor otherwise. Sampling keeps its
environments and partial episodes between calls, like RLlib's env runners.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Deque, Dict, List, Mapping, Optional

import gymnasium as gym
import numpy as np
import torch

from dlearner.columns import DEFAULT_MODULE_ID, Columns
from dlearner.rl_module import MultiRLModuleSpec, RLModule

#: Column of sampled fragments holding V(s_{t+1}) (bootstrap values; consumed by GAE, not trained on).
NEXT_VF_PREDS = "next_vf_preds"


class EnvRunner:
    """Samples ``num_envs_per_env_runner`` environments (a gymnasium ``SyncVectorEnv``) with one RLModule.

    Example::

        runner = EnvRunner(PPOConfig().environment("CartPole-v1"), module_spec=spec)
        fragment = runner.sample(num_timesteps=512)       # time-major arrays, shape (T, num_envs, ...)
        runner.get_metrics()                              # returns and lengths of finished episodes
    """

    def __init__(
        self,
        config: Any,
        *,
        module_spec: MultiRLModuleSpec,
        worker_index: int = 0,
        module_id: str = DEFAULT_MODULE_ID,
    ):
        self.config = config
        self.worker_index = worker_index
        self.module_id = module_id
        torch.set_num_threads(max(1, int(getattr(config, "torch_num_threads", None) or 1)))
        num_envs = config.num_envs_per_env_runner
        self.env = gym.vector.SyncVectorEnv(
            [lambda i=i: config.make_env() for i in range(num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        spec = module_spec.rl_module_specs[module_id]
        seed = getattr(config, "seed", None)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.module: RLModule = spec.build()
        self.module.eval()
        self._torch_rng = torch.Generator()
        if seed is None:
            self._torch_rng.seed()
        else:
            self._torch_rng.manual_seed(_runner_seed(seed, worker_index))
        self._is_box = isinstance(spec.action_space, gym.spaces.Box)
        self._action_low = getattr(spec.action_space, "low", None)
        self._action_high = getattr(spec.action_space, "high", None)
        self._obs, _ = self.env.reset(seed=_runner_seed(seed, worker_index))
        self._episode_returns = np.zeros(num_envs, dtype=np.float64)
        self._episode_lengths = np.zeros(num_envs, dtype=np.int64)
        self._finished_returns: List[float] = []
        self._finished_lengths: List[int] = []
        self.num_env_steps_sampled_lifetime = 0
        self.num_episodes_lifetime = 0

    # -------------------------------------------------------------------------------- weights
    def set_weights(self, weights: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Load the module's weights (``{module_id: {name: array}}`` as ``LearnerGroup.get_weights`` returns)."""
        self.module.set_state(weights[self.module_id])

    def get_weights(self) -> Dict[str, Dict[str, np.ndarray]]:
        return {self.module_id: self.module.get_state()}

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def _act(self, obs: np.ndarray, *, explore: bool = True):
        out = self.module.forward_train({Columns.OBS: torch.from_numpy(np.asarray(obs, dtype=np.float32))})
        inputs = out[Columns.ACTION_DIST_INPUTS]
        dist = self.module.get_exploration_action_dist_cls().from_logits(inputs)
        if explore:
            actions = dist.sample(generator=self._torch_rng)
        else:
            actions = dist.deterministic_sample()
        return actions, dist.logp(actions), inputs, out.get(Columns.VF_PREDS)

    @torch.no_grad()
    def _values(self, obs: np.ndarray) -> np.ndarray:
        compute_values = getattr(self.module, "compute_values", None)
        if compute_values is None:
            raise ValueError(f"{type(self.module).__name__} has no compute_values(); PPO needs a value function.")
        return compute_values({Columns.OBS: torch.from_numpy(np.asarray(obs, dtype=np.float32))}).numpy()

    def _env_actions(self, actions: torch.Tensor) -> np.ndarray:
        actions = actions.numpy()
        if self._is_box:
            # The policy's Gaussian is unbounded; the env gets the clipped action, the learner the sampled one.
            return np.clip(actions, self._action_low, self._action_high)
        return actions

    def sample(self, num_timesteps: int) -> Dict[str, np.ndarray]:
        """Step every environment ``ceil(num_timesteps / num_envs)`` times; returns time-major arrays.

        Columns: ``obs, actions, action_logp, action_dist_inputs, vf_preds, rewards, terminateds,
        truncateds`` and ``next_vf_preds`` (the value of the observation after each step: of the final
        observation on truncation, 0 on termination), each of shape ``(T, num_envs, ...)``.
        """
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}.")
        num_envs = self.env.num_envs
        steps = math.ceil(num_timesteps / num_envs)
        columns: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
        bootstrap: Dict[tuple, float] = {}
        for t in range(steps):
            actions, logp, inputs, vf = self._act(self._obs)
            next_obs, rewards, terminateds, truncateds, infos = self.env.step(self._env_actions(actions))
            columns[Columns.OBS].append(self._obs)
            columns[Columns.ACTIONS].append(actions.numpy())
            columns[Columns.ACTION_LOGP].append(logp.numpy())
            columns[Columns.ACTION_DIST_INPUTS].append(inputs.numpy())
            columns[Columns.VF_PREDS].append(vf.numpy() if vf is not None else np.zeros(num_envs, np.float32))
            columns[Columns.REWARDS].append(np.asarray(rewards, dtype=np.float32))
            columns[Columns.TERMINATEDS].append(np.asarray(terminateds, dtype=bool))
            columns[Columns.TRUNCATEDS].append(np.asarray(truncateds, dtype=bool))
            self._track_episodes(rewards, terminateds | truncateds)
            cut = np.flatnonzero(truncateds & ~terminateds)
            if len(cut) and vf is not None:
                final = np.stack([infos["final_obs"][i] for i in cut])
                for i, value in zip(cut, self._values(final)):
                    bootstrap[(t, int(i))] = float(value)
            self._obs = next_obs
        out = {k: np.stack(v) for k, v in columns.items()}
        vf_preds = out[Columns.VF_PREDS]
        last = self._values(self._obs) if vf_preds.any() else np.zeros(num_envs, np.float32)
        next_vf = np.concatenate([vf_preds[1:], last[None]], axis=0)
        next_vf[out[Columns.TERMINATEDS] | out[Columns.TRUNCATEDS]] = 0.0
        for (t, i), value in bootstrap.items():
            next_vf[t, i] = value
        out[NEXT_VF_PREDS] = next_vf.astype(np.float32)
        self.num_env_steps_sampled_lifetime += steps * num_envs
        return out

    def _track_episodes(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        self._episode_returns += rewards
        self._episode_lengths += 1
        for i in np.flatnonzero(dones):
            self._finished_returns.append(float(self._episode_returns[i]))
            self._finished_lengths.append(int(self._episode_lengths[i]))
            self._episode_returns[i] = 0.0
            self._episode_lengths[i] = 0
        self.num_episodes_lifetime += int(dones.sum())

    def get_metrics(self) -> Dict[str, Any]:
        """Returns and lengths of episodes finished since the last call, and lifetime counters."""
        metrics = {
            "episode_returns": self._finished_returns,
            "episode_lengths": self._finished_lengths,
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_episodes_lifetime": self.num_episodes_lifetime,
        }
        self._finished_returns, self._finished_lengths = [], []
        return metrics

    @torch.no_grad()
    def evaluate(self, num_episodes: int, *, seed: Optional[int] = None) -> Dict[str, Any]:
        """Run ``num_episodes`` greedy episodes on a fresh environment; returns their returns and lengths."""
        env = self.config.make_env()
        returns, lengths = [], []
        try:
            for episode in range(num_episodes):
                obs, _ = env.reset(seed=None if seed is None else seed + episode)
                done, total, length = False, 0.0, 0
                while not done:
                    actions, _, _, _ = self._act(np.asarray(obs)[None], explore=False)
                    obs, reward, terminated, truncated, _ = env.step(self._env_actions(actions)[0])
                    total += float(reward)
                    length += 1
                    done = terminated or truncated
                returns.append(total)
                lengths.append(length)
        finally:
            env.close()
        return {"episode_returns": returns, "episode_lengths": lengths}

    # ---------------------------------------------------------------------------------- state
    def get_state(self) -> Dict[str, Any]:
        """Counters and the sampling generator (environments restart on restore)."""
        return {
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_episodes_lifetime": self.num_episodes_lifetime,
            "torch_rng": self._torch_rng.get_state().numpy().copy(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.num_env_steps_sampled_lifetime = int(state["num_env_steps_sampled_lifetime"])
        self.num_episodes_lifetime = int(state["num_episodes_lifetime"])
        if "torch_rng" in state:
            self._torch_rng.set_state(torch.from_numpy(np.asarray(state["torch_rng"], dtype=np.uint8).copy()))

    def stop(self) -> None:
        self.env.close()


def _runner_seed(seed: Optional[int], worker_index: int) -> Optional[int]:
    return None if seed is None else int(seed) * 1000 + worker_index


class EpisodeStats:
    """Keeps the last ``window`` episode returns and lengths for smoothed reporting."""

    def __init__(self, window: int = 100):
        self.returns: Deque[float] = collections.deque(maxlen=window)
        self.lengths: Deque[int] = collections.deque(maxlen=window)

    def add(self, metrics: Mapping[str, Any]) -> None:
        self.returns.extend(metrics["episode_returns"])
        self.lengths.extend(metrics["episode_lengths"])

    def summary(self) -> Dict[str, float]:
        if not self.returns:
            return {"episode_return_mean": float("nan"), "episode_len_mean": float("nan")}
        return {
            "episode_return_mean": float(np.mean(self.returns)),
            "episode_return_max": float(np.max(self.returns)),
            "episode_return_min": float(np.min(self.returns)),
            "episode_len_mean": float(np.mean(self.lengths)),
        }
