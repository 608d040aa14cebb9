"""Env runners: step gymnasium vector environments with the current policy and return trajectories.

An :class:`EnvRunner` knows nothing about Dask either: the driver runs one itself when
``num_env_runners=0``, and the Dask plumbing wraps it as an actor otherwise. Sampling keeps its
environments and partial episodes between calls, like RLlib's env runners.

What a fragment holds, in gymnasium's terms:

* ``obs``: a ``Box`` space's observations as the env returns them; any other observation space
  (``Dict``, ``Tuple``, ``Discrete``, ...) flattened as gymnasium's ``spaces.flatten`` does, float32.
* ``actions``: the env's own action values (``Discrete(n, start=s)``: ``s .. s+n-1``); for a ``Box``
  the sampled action, while the env receives it clipped to the bounds.
* Episode returns and lengths come from gymnasium's vector ``RecordEpisodeStatistics``.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.registration import VectorizeMode
from gymnasium.vector import AutoresetMode

from dlearner.acting import ActingModule
from dlearner.callbacks import Callbacks, RunnerCallbacks, SingleAgentEpisode, sub_env_info
from dlearner.columns import DEFAULT_MODULE_ID, Columns
from dlearner.rl_module import MultiRLModuleSpec, RLModule
from dlearner.spaces import observation_row_shape

if TYPE_CHECKING:
    from dlearner.envs.recording import GifRecorder

logger = logging.getLogger(__name__)
#: Column of sampled fragments holding V(s_{t+1}) (bootstrap values; consumed by GAE, not trained on).
NEXT_VF_PREDS = "next_vf_preds"

# Per-row value of the final observation on truncation (0 elsewhere); internal to sampling.
_FINAL_VF = "_final_vf"
_FRAGMENT_COLUMNS = (
    Columns.OBS,
    Columns.ACTIONS,
    Columns.ACTION_LOGP,
    Columns.ACTION_DIST_INPUTS,
    Columns.VF_PREDS,
    Columns.REWARDS,
    Columns.TERMINATEDS,
    Columns.TRUNCATEDS,
    _FINAL_VF,
)
_VECTORIZE_MODES = (VectorizeMode.SYNC.value, VectorizeMode.VECTOR_ENTRY_POINT.value)


def make_vector_env(config: Any, num_envs: int) -> gym.vector.VectorEnv:
    """The vector env an :class:`EnvRunner` samples, wrapped in gymnasium's ``RecordEpisodeStatistics``.

    ``config.gym_env_vectorize_mode`` (RLlib's name; ``"sync"`` when unset) picks it:

    * ``"sync"``: a ``SyncVectorEnv`` of ``num_envs`` envs from ``config.make_env()`` (any env id or
      creator), resetting finished sub-envs in the same step (``AutoresetMode.SAME_STEP``).
    * ``"vector_entry_point"``: the env's own vector implementation, ``gymnasium.make_vec(id,
      num_envs, vectorization_mode="vector_entry_point", **env_config)`` (e.g. ``CartPole-v1``'s
      ``CartPoleVectorEnv``); needs a registered env id with a ``vector_entry_point``.

    ``"async"`` is refused: env runners often live in Dask worker processes, which are daemonic and
    cannot start the subprocesses ``AsyncVectorEnv`` needs; use more env runners instead.
    """
    mode = getattr(config, "gym_env_vectorize_mode", None) or VectorizeMode.SYNC
    mode = mode.value if isinstance(mode, VectorizeMode) else str(mode).lower()
    if mode not in _VECTORIZE_MODES:
        raise ValueError(
            f"gym_env_vectorize_mode={mode!r} is not supported; use one of {list(_VECTORIZE_MODES)} "
            "(for parallel sampling, use more env runners instead of 'async')."
        )
    if mode == VectorizeMode.VECTOR_ENTRY_POINT.value:
        env_id = config.env
        if not isinstance(env_id, str):
            raise ValueError(
                "gym_env_vectorize_mode='vector_entry_point' needs a registered gymnasium env id in "
                f".environment(...), got {env_id!r}; use gym_env_vectorize_mode='sync' for env creators."
            )
        try:
            spec = gym.spec(env_id)
        except gym.error.Error as err:
            raise ValueError(f"Cannot find environment {env_id!r}: {err}") from err
        if spec.vector_entry_point is None:
            raise ValueError(
                f"Environment {env_id!r} has no vector entry point, so gym_env_vectorize_mode='vector_entry_point' "
                "cannot build it; use gym_env_vectorize_mode='sync'."
            )
        try:
            env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **config.env_config)
        except gym.error.Error as err:
            raise ValueError(f"Cannot make the vector environment {env_id!r}: {err}") from err
    else:
        env = gym.vector.SyncVectorEnv([config.make_env for _ in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP)
    autoreset = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if autoreset not in (AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP):
        env.close()
        raise ValueError(
            f"The vector env {env} uses autoreset mode {autoreset}; env runners need sub-envs that reset "
            "themselves (AutoresetMode.SAME_STEP or NEXT_STEP)."
        )
    if "autoreset_mode" not in env.metadata:
        # Gymnasium's documented default; saying so keeps RecordEpisodeStatistics from warning.
        env.metadata = {**env.metadata, "autoreset_mode": AutoresetMode.NEXT_STEP}
    return gym.wrappers.vector.RecordEpisodeStatistics(env)


class EnvRunner:
    """Samples ``num_envs_per_env_runner`` environments (a gymnasium vector env) with one RLModule.

    Example::

        runner = EnvRunner(PPOConfig().environment("CartPole-v1"), module_spec=spec)
        fragment = runner.sample(num_timesteps=512)       # time-major arrays, shape (T, num_envs, ...)
        runner.get_metrics()                              # returns and lengths of finished episodes

    The vector env comes from :func:`make_vector_env`. Sub-envs that reset themselves in the step
    after an episode ends (``AutoresetMode.NEXT_STEP``, as env-provided vector envs do) are handled
    too: that reset step is not a transition, so it never appears in a fragment; a sub-env that lost
    rows to resets steps a little longer, and rows it sampled beyond ``T`` open the next fragment.
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
        spec = module_spec.rl_module_specs[module_id]
        seed = getattr(config, "seed", None)
        self.acting = ActingModule(spec, seed=seed)
        self._callbacks = RunnerCallbacks.for_config(config, worker_index)  # before the envs: nothing to close if it fails
        num_envs = config.num_envs_per_env_runner
        self.env = make_vector_env(config, num_envs)
        try:
            _check_env_spaces(self.env, spec.observation_space, spec.action_space)
        except ValueError:
            self.env.close()
            raise
        self._next_step_autoreset = self.env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
        # Off-policy algorithms (SAC) store transitions, so they need each step's next observation.
        self._with_next_obs = bool(getattr(config, "sample_next_obs", False))
        self._columns = _FRAGMENT_COLUMNS + ((Columns.NEXT_OBS,) if self._with_next_obs else ())
        self._torch_rng = runner_generator(seed, worker_index)
        obs, reset_infos = self.env.reset(seed=_runner_seed(seed, worker_index))
        self._obs = self._prepare_obs(obs)
        # Episodes for callbacks, one per sub-env (only when the callbacks have episode methods):
        # the first ones start at the first sample(), from these reset infos.
        self._episodes: Optional[List[SingleAgentEpisode]] = None
        self._reset_infos = reset_infos if self._callbacks.episodes else None
        # NEXT_STEP autoreset: sub-envs whose next step is a reset (their action is ignored).
        self._resetting = np.zeros(num_envs, dtype=bool)
        # Rows a sub-env sampled beyond the last fragment's length (NEXT_STEP only), per sub-env.
        self._carry: List[Optional[Dict[str, np.ndarray]]] = [None] * num_envs
        self._finished_returns: List[float] = []
        self._finished_lengths: List[int] = []
        self.num_env_steps_sampled_lifetime = 0
        self.num_episodes_lifetime = 0

    # -------------------------------------------------------------------------------- weights
    def set_weights(self, weights: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Load the module's weights (``{module_id: {name: array}}`` as ``LearnerGroup.get_weights`` returns)."""
        self.acting.module.set_state(weights[self.module_id])

    def get_weights(self) -> Dict[str, Dict[str, np.ndarray]]:
        """The module's weights as ``{module_id: {name: np.ndarray}}``."""
        return {self.module_id: self.acting.module.get_state()}

    @property
    def module(self) -> RLModule:
        """The RLModule this runner acts with."""
        return self.acting.module

    @property
    def callbacks(self) -> Callbacks:
        """This runner's instance of ``config.callbacks_class`` (its episode callbacks run on it)."""
        return self._callbacks.callbacks

    # ------------------------------------------------------------------------------- sampling
    def _prepare_obs(self, obs: Any) -> np.ndarray:
        return self.acting.prepare_batch(obs)

    def _act(self, obs: np.ndarray, *, explore: bool = True):
        return self.acting.act(obs, explore=explore, generator=self._torch_rng)

    def _values(self, obs: np.ndarray) -> np.ndarray:
        return self.acting.values(obs)

    def _env_actions(self, actions: torch.Tensor) -> np.ndarray:
        return self.acting.env_actions(actions)

    def sample(self, num_timesteps: int) -> Dict[str, np.ndarray]:
        """Sample ``T = ceil(num_timesteps / num_envs)`` transitions per sub-env; returns time-major arrays.

        Columns: ``obs, actions, action_logp, action_dist_inputs, vf_preds, rewards, terminateds,
        truncateds`` and ``next_vf_preds`` (the value of the observation after each step: of the final
        observation on truncation, 0 on termination), each of shape ``(T, num_envs, ...)``. Each
        column ``[:, i]`` is consecutive transitions of sub-env ``i``.
        """
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}.")
        num_envs = self.env.num_envs
        steps = math.ceil(num_timesteps / num_envs)
        follow_episodes = self._callbacks.episodes  # checked once: no per-step work without episode callbacks
        if follow_episodes and self._episodes is None:
            self._episodes = [None] * num_envs  # type: ignore[list-item]
            for i in range(num_envs):
                self._begin_episode(i, sub_env_info(self._reset_infos, i))
            self._reset_infos = None
        columns: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
        valid_steps: List[np.ndarray] = []
        have = np.array([0 if c is None else len(c[Columns.OBS]) for c in self._carry])
        has_values = True
        while have.min() < steps:
            valid = ~self._resetting
            actions, logp, inputs, vf = self._act(self._obs)
            has_values = vf is not None
            raw_next, rewards, terminateds, truncateds, infos = self.env.step(self._env_actions(actions))
            next_obs = self._prepare_obs(raw_next)
            terminateds = np.asarray(terminateds, dtype=bool)
            truncateds = np.asarray(truncateds, dtype=bool)
            final_vf = np.zeros(num_envs, np.float32)
            cut = np.flatnonzero(truncateds & ~terminateds & valid)
            if len(cut) and has_values:
                if self._next_step_autoreset:
                    final = next_obs[cut]  # NEXT_STEP returns the final observation itself
                else:
                    final = self.acting.stack([infos["final_obs"][i] for i in cut])
                final_vf[cut] = self._values(final)
            columns[Columns.OBS].append(self._obs)
            columns[Columns.ACTIONS].append(actions.numpy())
            columns[Columns.ACTION_LOGP].append(logp.numpy())
            columns[Columns.ACTION_DIST_INPUTS].append(inputs.numpy())
            columns[Columns.VF_PREDS].append(vf.numpy() if has_values else np.zeros(num_envs, np.float32))
            columns[Columns.REWARDS].append(np.asarray(rewards, dtype=np.float32))
            columns[Columns.TERMINATEDS].append(terminateds)
            columns[Columns.TRUNCATEDS].append(truncateds)
            columns[_FINAL_VF].append(final_vf)
            if self._with_next_obs:
                columns[Columns.NEXT_OBS].append(self._transition_next_obs(next_obs, terminateds | truncateds, valid, infos))
            valid_steps.append(valid)
            self._record_episodes(infos)
            if follow_episodes:
                self._follow_episodes(rewards, terminateds | truncateds, infos, valid)
            if self._next_step_autoreset:
                self._resetting = (terminateds | truncateds) & valid
            have += valid
            self._obs = next_obs
        stacked = {k: np.stack(v) for k, v in columns.items()}
        out = self._cut_fragment(stacked, np.stack(valid_steps), steps)
        out[NEXT_VF_PREDS] = self._next_values(out, has_values)
        self.num_env_steps_sampled_lifetime += steps * num_envs
        self._callbacks.sample_end(self, out)
        return out

    def _transition_next_obs(self, next_obs: np.ndarray, done: np.ndarray, valid: np.ndarray, infos: Mapping[str, Any]):
        """The observation each step led to: a finished episode's final one, not the next episode's first."""
        if self._next_step_autoreset:
            return next_obs  # NEXT_STEP returns the final observation itself
        ended = np.flatnonzero(done & valid)
        if not len(ended):
            return next_obs
        out = next_obs.copy()
        out[ended] = self.acting.stack([infos["final_obs"][i] for i in ended])
        return out

    # ------------------------------------------------------------------- episodes for callbacks
    def _begin_episode(self, index: int, info: Dict[str, Any]) -> None:
        episode = self._episodes[index] = SingleAgentEpisode(index, self.worker_index, info)
        self._callbacks.episode("on_episode_start", episode, self)

    def _follow_episodes(self, rewards: Any, done: np.ndarray, infos: Mapping[str, Any], valid: np.ndarray) -> None:
        """One vector step of every sub-env's episode: its length, return and info, and the callbacks."""
        callbacks = self._callbacks
        same_step = not self._next_step_autoreset
        for i, episode in enumerate(self._episodes):
            if not valid[i]:
                # NEXT_STEP autoreset: this step reset sub-env i (its episode ended in the step before).
                self._begin_episode(i, sub_env_info(infos, i))
                continue
            episode.length += 1
            episode.total_return += float(rewards[i])
            if done[i] and same_step:
                # SAME_STEP: the sub-env already reset; its last step's info is under "final_info".
                episode.last_info = sub_env_info(infos.get("final_info", {}), i)
            else:
                episode.last_info = sub_env_info(infos, i)
            callbacks.episode("on_episode_step", episode, self)
            if done[i]:
                episode.is_done = True
                callbacks.episode("on_episode_end", episode, self)
                if same_step:
                    self._begin_episode(i, sub_env_info(infos, i))  # the reset info of the next episode

    def foreach_env(self, fn: Callable[[gym.Env], Any]) -> List[Any]:
        """``fn(env)`` for each sub-env of this runner's vector env, in order; their values.

        The envs are those ``config.make_env()`` made (``env.unwrapped`` is the bare env). Changes
        apply from the next step on; a running episode goes on in the changed env.
        """
        envs = getattr(self.env.unwrapped, "envs", None)
        if envs is None:
            raise ValueError(
                f"foreach_env() needs the sub-envs of a SyncVectorEnv, but this runner steps {self.env.unwrapped} "
                "(gym_env_vectorize_mode='vector_entry_point'); use gym_env_vectorize_mode='sync' to change envs one by one."
            )
        return [fn(env) for env in envs]

    def sample_with_metrics(
        self, num_timesteps: int, weights: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None
    ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """Load ``weights`` (if given), :meth:`sample`, and return the fragment with :meth:`get_metrics`.

        One call does what an asynchronous training loop needs from a runner between two fragments,
        so new weights never wait for a separate message and episode statistics never need a call
        of their own (IMPALA / APPO, through ``EnvRunnerGroup.sample_async``).
        """
        if weights is not None:
            self.set_weights(weights)
        fragment = self.sample(num_timesteps)
        return fragment, self.get_metrics()

    def split_into_fragments(
        self, sample: Dict[str, np.ndarray], columns: Tuple[str, ...], num_timesteps: int
    ) -> Tuple[List[Tuple[Dict[str, np.ndarray], Dict[str, Any]]], int]:
        """A :meth:`sample` as fragments, in the order the async pipeline queues them: each vector
        env's column ``[:, env]`` (``T`` consecutive steps; its ``columns`` only) with its description
        (``module_id``, ``rows``, ``env_steps``), and the env steps sampled. What a runner that keeps
        its fragments for the learners stores (:class:`~dlearner.backends.dask.fragments.FragmentStore`)."""
        steps, num_envs = sample[Columns.REWARDS].shape[:2]
        # Contiguous copies: a stored fragment does not keep the whole sample alive.
        fragments = [
            (
                {c: np.ascontiguousarray(sample[c][:, env]) for c in columns},
                {"module_id": DEFAULT_MODULE_ID, "rows": int(steps), "env_steps": float(steps)},
            )
            for env in range(num_envs)
        ]
        return fragments, int(steps * num_envs)

    def _cut_fragment(self, stacked: Dict[str, np.ndarray], valid: np.ndarray, steps: int) -> Dict[str, np.ndarray]:
        """The first ``steps`` valid rows of every sub-env (carried rows first); later ones are carried."""
        columns = self._columns
        if valid.all() and len(valid) == steps and all(c is None for c in self._carry):
            return {k: stacked[k] for k in columns}  # SAME_STEP: every row is a transition
        per_env = []
        for i in range(valid.shape[1]):
            rows = {k: stacked[k][valid[:, i], i] for k in columns}
            carried = self._carry[i]
            if carried is not None:
                rows = {k: np.concatenate([carried[k], rows[k]]) for k in columns}
            per_env.append({k: v[:steps] for k, v in rows.items()})
            self._carry[i] = {k: v[steps:] for k, v in rows.items()} if len(rows[Columns.OBS]) > steps else None
        return {k: np.stack([env_rows[k] for env_rows in per_env], axis=1) for k in columns}

    def _next_values(self, out: Dict[str, np.ndarray], has_values: bool) -> np.ndarray:
        """V(s_{t+1}) per row: the next row's value, the final observation's on truncation, 0 on termination."""
        final_vf = out.pop(_FINAL_VF)
        vf_preds = out[Columns.VF_PREDS]
        num_envs = vf_preds.shape[1]
        if has_values:
            last = self._values(self._obs)
            for i, carried in enumerate(self._carry):
                if carried is not None:
                    last[i] = carried[Columns.VF_PREDS][0]  # the next transition is already sampled
        else:
            last = np.zeros(num_envs, np.float32)
        next_vf = np.concatenate([vf_preds[1:], last[None]], axis=0)
        terminateds, truncateds = out[Columns.TERMINATEDS], out[Columns.TRUNCATEDS]
        next_vf[terminateds | truncateds] = 0.0
        next_vf = np.where(truncateds & ~terminateds, final_vf, next_vf)
        return next_vf.astype(np.float32)

    def _record_episodes(self, infos: Mapping[str, Any]) -> None:
        # RecordEpisodeStatistics reports each finished episode's return and length under "episode".
        finished = infos.get("_episode")
        if finished is None or not np.any(finished):
            return
        stats = infos["episode"]
        for i in np.flatnonzero(finished):
            self._finished_returns.append(float(stats["r"][i]))
            self._finished_lengths.append(int(stats["l"][i]))
        self.num_episodes_lifetime += int(np.count_nonzero(finished))

    def get_metrics(self) -> Dict[str, Any]:
        """Returns and lengths of episodes finished since the last call, and lifetime counters."""
        metrics = {
            "episode_returns": self._finished_returns,
            "episode_lengths": self._finished_lengths,
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_episodes_lifetime": self.num_episodes_lifetime,
            "worker_index": self.worker_index,  # which runner: per-runner figures on the dashboard
            "custom": self._callbacks.report(),  # what callbacks logged (dlearner.callbacks.MetricsLogger)
        }
        self._finished_returns, self._finished_lengths = [], []
        return metrics

    @torch.no_grad()
    def evaluate(
        self, num_episodes: int, *, seed: Optional[int] = None, recorder: Optional["GifRecorder"] = None
    ) -> Dict[str, Any]:
        """Run ``num_episodes`` greedy episodes on fresh environments; returns their returns and lengths.

        Up to ``num_envs_per_env_runner`` episodes run side by side, one forward pass for all of
        them per step, as sampling does. Episode ``i`` is reset with ``seed + i``, so the figures do
        not depend on how many run at once. With a ``recorder``, the first episode's env is made with
        ``render_mode="rgb_array"`` and its frames (``env.render()`` after the reset and each step)
        go to ``recorder.add`` until it is full; ``recorder.fps`` is set to the episode's real-time step rate.
        """
        num_envs = max(1, min(num_episodes, int(getattr(self.config, "num_envs_per_env_runner", 1) or 1)))
        envs = [gym.wrappers.RecordEpisodeStatistics(self._evaluation_env(recorder if i == 0 else None)) for i in range(num_envs)]
        returns: Dict[int, float] = {}
        lengths: Dict[int, int] = {}

        def record(position: int, episode: int) -> None:
            if recorder is not None and episode == 0 and not recorder.full:
                recorder.add(envs[position].render())

        try:
            running: Dict[int, Any] = {}  # env position -> (episode number, current observation)
            next_episode = 0
            for position, env in enumerate(envs):
                if next_episode < num_episodes:
                    obs, _ = env.reset(seed=None if seed is None else seed + next_episode)
                    record(position, next_episode)
                    running[position] = (next_episode, obs)
                    next_episode += 1
            while running:
                positions = sorted(running)
                batch = self.acting.stack([running[p][1] for p in positions])
                actions, _, _, _ = self._act(batch, explore=False)
                for position, action in zip(positions, self._env_actions(actions)):
                    episode, _ = running[position]
                    obs, _, terminated, truncated, info = envs[position].step(action)
                    record(position, episode)
                    if not (terminated or truncated):
                        running[position] = (episode, obs)
                        continue
                    returns[episode] = float(info["episode"]["r"])
                    lengths[episode] = int(info["episode"]["l"])
                    del running[position]
                    if next_episode < num_episodes:
                        obs, _ = envs[position].reset(seed=None if seed is None else seed + next_episode)
                        running[position] = (next_episode, obs)
                        next_episode += 1
        finally:
            for env in envs:
                env.close()
        return {
            "episode_returns": [returns[i] for i in range(num_episodes)],
            "episode_lengths": [lengths[i] for i in range(num_episodes)],
        }

    def _evaluation_env(self, recorder: Optional["GifRecorder"]) -> gym.Env:
        """A fresh env for :meth:`evaluate`; the one a ``recorder`` watches renders RGB arrays."""
        if recorder is None:
            return self.config.make_env()
        from dlearner.envs.atari import AGENT_STEPS_PER_SECOND
        from dlearner.envs.recording import check_rgb_array_env

        env = self.config.make_env({**self.config.env_config, "render_mode": "rgb_array"})
        try:
            check_rgb_array_env(env)
        except ValueError:
            env.close()
            raise
        # One frame per agent step: an Atari step is 4 of the console's 60 frames a second, other envs
        # declare their step rate as render_fps.
        fps = AGENT_STEPS_PER_SECOND if getattr(self.config, "atari", False) else env.metadata.get("render_fps")
        recorder.fps = float(fps) if fps else None
        return env

    # ---------------------------------------------------------------------------------- state
    def get_state(self) -> Dict[str, Any]:
        """Counters and the sampling generator (environments restart on restore)."""
        return {
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_episodes_lifetime": self.num_episodes_lifetime,
            "torch_rng": self._torch_rng.get_state().numpy().copy(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""
        self.num_env_steps_sampled_lifetime = int(state["num_env_steps_sampled_lifetime"])
        self.num_episodes_lifetime = int(state["num_episodes_lifetime"])
        if "torch_rng" in state:
            self._torch_rng.set_state(torch.from_numpy(np.asarray(state["torch_rng"], dtype=np.uint8).copy()))

    def stop(self) -> None:
        """Close the environments."""
        self.env.close()


def _check_env_spaces(env: gym.vector.VectorEnv, observation_space: gym.Space, action_space: gym.Space) -> None:
    """The sub-envs' spaces must fit the module's (same flat observation size, same discrete actions)."""
    env_obs, env_act = env.single_observation_space, env.single_action_space
    if type(env_obs) is not type(observation_space) or observation_row_shape(env_obs) != observation_row_shape(observation_space):
        raise ValueError(
            f"The environment's observation space {env_obs} does not fit the module's {observation_space}; "
            "build the module from this environment (config.environment(...)) or give it a matching space."
        )
    if isinstance(action_space, gym.spaces.Discrete) and not (
        isinstance(env_act, gym.spaces.Discrete) and env_act.n == action_space.n and env_act.start == action_space.start
    ):
        raise ValueError(
            f"The environment's action space {env_act} does not match the module's {action_space}: a Discrete "
            "module's actions are the env's values, so n and start must agree."
        )


def _runner_seed(seed: Optional[int], worker_index: int) -> Optional[int]:
    return None if seed is None else int(seed) * 1000 + worker_index


def runner_generator(seed: Optional[int], worker_index: int) -> torch.Generator:
    """The generator an env runner samples actions with: seeded per runner when ``seed`` is set."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(_runner_seed(seed, worker_index))
    return generator


class EpisodeStats:
    """Keeps the last ``window`` episode returns and lengths for smoothed reporting; for multi-agent
    runs also the last ``window`` returns of each agent and of each module (its agent-episodes)."""

    def __init__(self, window: int = 100):
        self.window = window
        self.returns: Deque[float] = collections.deque(maxlen=window)
        self.lengths: Deque[int] = collections.deque(maxlen=window)
        self.agent_returns: Dict[str, Deque[float]] = {}
        self.module_returns: Dict[str, Deque[float]] = {}

    def add(self, metrics: Mapping[str, Any]) -> None:
        self.returns.extend(metrics["episode_returns"])
        self.lengths.extend(metrics["episode_lengths"])
        for key, windows in (("agent_episode_returns", self.agent_returns), ("module_episode_returns", self.module_returns)):
            for name, values in (metrics.get(key) or {}).items():
                windows.setdefault(str(name), collections.deque(maxlen=self.window)).extend(values)

    def summary(self) -> Dict[str, Any]:
        if not self.returns:
            out: Dict[str, Any] = {"episode_return_mean": float("nan"), "episode_len_mean": float("nan")}
        else:
            out = {
                "episode_return_mean": float(np.mean(self.returns)),
                "episode_return_max": float(np.max(self.returns)),
                "episode_return_min": float(np.min(self.returns)),
                "episode_len_mean": float(np.mean(self.lengths)),
            }
        if self.agent_returns:
            out["agent_episode_returns_mean"] = {a: float(np.mean(v)) for a, v in sorted(self.agent_returns.items())}
        if self.module_returns:
            out["module_episode_returns_mean"] = {m: float(np.mean(v)) for m, v in sorted(self.module_returns.items())}
        return out

    def get_state(self) -> Dict[str, Any]:
        """The windows, for checkpoints (so a resumed run's smoothed figures go on)."""
        return {
            "recent_episode_returns": list(self.returns),
            "recent_episode_lengths": list(self.lengths),
            "recent_agent_episode_returns": {a: list(v) for a, v in self.agent_returns.items()},
            "recent_module_episode_returns": {m: list(v) for m, v in self.module_returns.items()},
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.returns.clear()
        self.lengths.clear()
        self.returns.extend(float(v) for v in state.get("recent_episode_returns", []))
        self.lengths.extend(int(v) for v in state.get("recent_episode_lengths", []))
        for key, windows in (
            ("recent_agent_episode_returns", self.agent_returns),
            ("recent_module_episode_returns", self.module_returns),
        ):
            windows.clear()
            for name, values in (state.get(key) or {}).items():
                windows[str(name)] = collections.deque((float(v) for v in values), maxlen=self.window)
