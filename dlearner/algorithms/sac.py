"""Soft Actor-Critic (Haarnoja et al. 2018, with the automatic temperature of their second paper;
Christodoulou 2019 for discrete actions): the config, the losses and the training step.

The losses on one batch of transitions ``(s, a, r, s', d)`` with ``n`` the steps each return spans
(n-step returns) and ``w`` the importance weights of prioritized replay (1 without)::

    alpha     = exp(log_alpha)
    a' ~ pi(.|s'),  y = r + gamma^n * (1 - d) * (min_i Q_target_i(s', a') - alpha * log pi(a'|s'))   # no gradient
    L_qf      = mean(w * (Q_1(s, a) - y)^2) + mean(w * (Q_2(s, a) - y)^2)
    a~ ~ pi(.|s) (reparameterised),  L_policy = mean(alpha * log pi(a~|s) - min_i Q_i(s, a~))
    L_alpha   = mean(-log_alpha * (log pi(a~|s) + target_entropy))                                  # log pi without gradient

For ``Discrete`` actions the expectations over ``a'`` and ``a~`` are exact sums over the actions'
probabilities instead of samples (Christodoulou 2019). Each loss reaches only its own optimizer's
parameters (``qf``, ``policy``, ``alpha``); after every update the target networks move towards
the Q networks by polyak averaging with ``tau``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import gymnasium as gym
import numpy as np
import torch

from dlearner.algorithm import Algorithm
from dlearner.algorithms.n_step import (
    N_STEP,
    checked_n_step,
    n_step_generator,
    n_step_generator_state,
    n_step_transitions,
)
from dlearner.algorithms.off_policy import WEIGHTS, ReplayLearnerMixin
from dlearner.algorithms.sac_module import DefaultSACRLModule
from dlearner.columns import ALL_MODULES, Columns
from dlearner.config import AlgorithmConfig
from dlearner.learner import TorchLearner
from dlearner.schedules import PiecewiseSchedule
from dlearner.validation import NotProvided, apply_checks, boolean, non_negative_int, positive, positive_int, unit_interval


class SACTorchLearner(ReplayLearnerMixin, TorchLearner):
    """SAC's losses (see the module docstring), its three optimizers and its target networks."""

    required_columns = (Columns.OBS, Columns.ACTIONS, Columns.REWARDS, Columns.NEXT_OBS, Columns.TERMINATEDS, Columns.TRUNCATEDS)
    optional_columns = (WEIGHTS, N_STEP)

    def build(self) -> None:
        super().build()
        # The reparameterisation noise: the same generator on every learner, drawn for the whole batch.
        self.noise_generator = torch.Generator(device="cpu")
        self.noise_generator.manual_seed(int(self.config.seed) + 1 if self.config.seed is not None else torch.seed())
        for module_id in self.module.keys():
            self._init_temperature(module_id)

    def _init_temperature(self, module_id: str) -> None:
        with torch.no_grad():
            self.module[module_id].log_alpha.fill_(math.log(self.config.initial_alpha))

    def add_module(self, *, module_id, module_spec, config_overrides=None):
        specs = super().add_module(module_id=module_id, module_spec=module_spec, config_overrides=config_overrides)
        self._init_temperature(module_id)
        return specs

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        """Three Adam optimizers: ``qf`` (both Q networks), ``policy`` and ``alpha`` (``log_alpha``)."""
        config = config or self.config
        module = self._module[module_id]
        groups = {
            "qf": (list(module.qf1.parameters()) + list(module.qf2.parameters()), config.critic_lr),
            "policy": (list(module.pi.parameters()), config.actor_lr),
            "alpha": ([module.log_alpha], config.alpha_lr),
        }
        for name, (params, lr) in groups.items():
            initial = PiecewiseSchedule(lr, name=f"{name} learning rate").value(self._last_timestep)
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.Adam(params, lr=initial),
                params=params,
                lr_or_lr_schedule=lr,
            )

    # -- the losses -----------------------------------------------------------------------------
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        """SAC's three losses, one per optimizer, term by term as in the module docstring."""
        module = self.module[module_id]
        obs, actions, next_obs = batch[Columns.OBS], batch[Columns.ACTIONS], batch[Columns.NEXT_OBS]
        rewards, terminated = batch[Columns.REWARDS], batch[Columns.TERMINATEDS].float()
        discount = config.gamma ** batch[N_STEP].float() if N_STEP in batch else torch.full_like(rewards, config.gamma)
        weights = batch[WEIGHTS] if WEIGHTS in batch else torch.ones_like(rewards)  # importance weights
        log_alpha = module.log_alpha
        alpha = log_alpha.exp().detach()
        noise_next, noise_now = self._noise(module_id, module, obs)

        # The soft Bellman target (Haarnoja et al. 2018, eqs. 3 and 6), from the minimum of the target Q networks.
        with torch.no_grad():
            y = rewards + discount * (1.0 - terminated) * self._soft_value(module, next_obs, noise_next, alpha, target=True)

        # Q losses (eq. 5): squared TD errors, weighted by prioritized replay's importance weights.
        q1, q2 = self._q_of_actions(module, obs, actions)
        qf_loss = (weights * (q1 - y).pow(2)).mean()
        if config.twin_q:
            qf_loss = qf_loss + (weights * (q2 - y).pow(2)).mean()

        # The policy loss (eq. 7): E_a~pi[alpha * log pi(a|s) - min_i Q_i(s, a)], and E[log pi] for alpha.
        policy_loss, expected_logp = self._policy_loss(module, fwd_out[Columns.ACTION_DIST_INPUTS], obs, noise_now, alpha)

        # The temperature loss (Haarnoja et al. 2018b, eq. 18): alpha rises while the entropy is below target.
        alpha_loss = -(log_alpha * (expected_logp.detach() + self.target_entropy(module))).mean()

        self.td_errors[module_id] = (q1 - y).detach().abs()  # prioritized replay's new priorities
        self.metrics.log_dict(
            {
                "qf_loss": qf_loss,
                "policy_loss": policy_loss,
                "alpha_loss": alpha_loss,
                "alpha_value": alpha,
                "log_alpha_value": log_alpha.detach(),
                "qf_mean": q1.detach().mean(),
                "td_error_mean": self.td_errors[module_id].mean(),
            },
            module_id=module_id,
        )
        return {"qf": qf_loss, "policy": policy_loss, "alpha": alpha_loss}

    def _min_q(self, q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
        return torch.min(q1, q2) if self.config.twin_q else q1

    def _soft_value(self, module, obs, noise, alpha, *, target: bool) -> torch.Tensor:
        """V(s) = E_a~pi[min_i Q_i(s, a) - alpha * log pi(a|s)]: one reparameterised sample (Box), or the
        exact expectation over the actions (Discrete)."""
        inputs = module.policy_inputs(obs)
        if module.is_discrete:
            logp = torch.log_softmax(inputs, dim=-1)
            return (logp.exp() * (self._min_q(*module.q_values(obs, target=target)) - alpha * logp)).sum(-1)
        action, logp = module.get_train_action_dist_cls().from_logits(inputs).rsample_with_logp(noise)
        return self._min_q(*module.q_values(obs, action, target=target)) - alpha * logp

    def _q_of_actions(self, module, obs, actions):
        """``(Q1(s, a), Q2(s, a))`` of the batch's actions."""
        if not module.is_discrete:
            return module.q_values(obs, actions)
        index = (actions.long() - int(module.action_space.start)).unsqueeze(-1)
        return tuple(q.gather(-1, index).squeeze(-1) for q in module.q_values(obs))

    def _policy_loss(self, module, dist_inputs, obs, noise, alpha):
        """``(policy loss, E[log pi(a|s)] per row)``. Box: the reparameterised action's gradient flows
        through the Q networks (the ``policy`` optimizer takes only the policy's part). Discrete: the
        exact expectation, with the Q values as constants."""
        if module.is_discrete:
            logp = torch.log_softmax(dist_inputs, dim=-1)
            probs = logp.exp()
            q = self._min_q(*module.q_values(obs)).detach()
            return (probs * (alpha * logp - q)).sum(-1).mean(), (probs * logp).sum(-1)
        action, logp = module.get_train_action_dist_cls().from_logits(dist_inputs).rsample_with_logp(noise)
        return (alpha * logp - self._min_q(*module.q_values(obs, action))).mean(), logp

    def _noise(self, module_id: str, module, obs: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Standard-normal noise for the next and the current actions (Box only): drawn for the step's
        whole minibatch over all learners from the shared generator, this learner's rows kept."""
        if module.is_discrete:
            return None, None
        rows = self.step_rows.get(module_id)
        size = rows.global_size if rows is not None else obs.shape[0]
        noise = torch.randn((2, size, module.action_dim), generator=self.noise_generator)
        if rows is not None and rows.positions is not None:
            noise = noise[:, torch.from_numpy(rows.positions)]
        noise = noise.to(obs.device)
        return noise[0], noise[1]

    def target_entropy(self, module) -> float:
        """``target_entropy``, or for ``"auto"``: ``-dim(A)`` (Box), ``0.98 * log(n)`` (Discrete)."""
        if self.config.target_entropy != "auto":
            return float(self.config.target_entropy)
        if module.is_discrete:
            return 0.98 * math.log(module.num_actions)
        return -float(module.action_dim)

    # -- the target networks --------------------------------------------------------------------
    def after_gradient_based_update(self, *, timesteps):
        """Polyak-average the target Q networks of the modules this update trained towards their Q networks."""
        super().after_gradient_based_update(timesteps=timesteps)
        tau = self.config.tau
        with torch.no_grad():
            for module_id, module in self.module.items():
                try:
                    self.metrics.peek((module_id, "qf_loss"))
                except KeyError:
                    continue  # not in this update
                for target, source in module.target_pairs():
                    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)

    # -- state ----------------------------------------------------------------------------------
    def get_learner_state(self) -> Dict[str, Any]:
        state = super().get_learner_state()
        state["noise_generator"] = self.noise_generator.get_state().numpy().copy()
        return state

    def _check_learner_state(self, state) -> None:
        super()._check_learner_state(state)
        if "noise_generator" in state:
            scratch = torch.Generator()
            try:
                scratch.set_state(torch.from_numpy(np.asarray(state["noise_generator"], dtype=np.uint8).copy()))
            except (RuntimeError, ValueError, TypeError) as error:
                raise ValueError(f"learner_state/noise_generator holds no valid torch generator state: {error}") from None

    def set_learner_state(self, state) -> None:
        super().set_learner_state(state)
        if "noise_generator" in state:
            self.noise_generator.set_state(torch.from_numpy(np.asarray(state["noise_generator"], dtype=np.uint8).copy()))

    @staticmethod
    def check_module_batch(module_id: str, columns: Mapping[str, np.ndarray]) -> None:
        """SAC's own columns: importance ``weights`` finite and >= 0, ``n_step`` integers >= 1."""
        where = f"module {module_id!r}"
        if WEIGHTS in columns:
            weights = columns[WEIGHTS]
            if weights.ndim != 1 or not np.issubdtype(weights.dtype, np.floating) or (weights < 0).any():
                raise ValueError(f"Column {WEIGHTS!r} of {where} must be one float >= 0 per row (importance weights).")
        if N_STEP in columns:
            n_step = columns[N_STEP]
            if n_step.ndim != 1 or not np.issubdtype(n_step.dtype, np.integer) or (n_step < 1).any():
                raise ValueError(f"Column {N_STEP!r} of {where} must be one int >= 1 per row (the steps each return spans).")


# ------------------------------------------------------------------------------------------ config
class SACConfig(AlgorithmConfig):
    """Config of SAC. The defaults learn Pendulum-v1 (a mean return of -250) in about 10,000 env steps
    with small networks (see ``benchmarks/sac.py``); RLlib's tuned example uses ``[256, 256]``.

    Example::

        algo = SACConfig().environment("Pendulum-v1").build_algo()
        print(algo.train()["env_runners"]["episode_return_mean"])
    """

    default_learner_class = SACTorchLearner
    default_module_class = DefaultSACRLModule
    algo_class_path = "dlearner.algorithms.sac.SAC"
    #: Env runners record each step's next observation (transitions for the replay buffer).
    sample_next_obs = True

    def __init__(self) -> None:
        super().__init__()
        self.actor_lr: Union[float, list] = 1e-3
        self.critic_lr: Union[float, list] = 1e-3
        self.alpha_lr: Union[float, list] = 1e-3
        self.tau = 0.005
        self.twin_q = True
        self.initial_alpha = 1.0
        self.target_entropy: Union[str, float] = "auto"
        self.n_step = 1
        self.train_batch_size = 256
        self.minibatch_size = None  # one gradient step on the whole sampled batch per update
        self.num_epochs = 1
        self.num_steps_sampled_before_learning_starts = 1000
        self.training_intensity: Optional[float] = None
        self.replay_buffer_config: Dict[str, Any] = {"type": "uniform", "capacity": 1_000_000}
        self.store_buffer_in_checkpoints = False
        self.min_sample_timesteps_per_iteration = 1000
        self.rollout_fragment_length = 1
        self.model_config = {"fcnet_hiddens": [64, 64], "fcnet_activation": "relu"}

    def training(
        self,
        *,
        actor_lr: Union[float, list] = NotProvided,
        critic_lr: Union[float, list] = NotProvided,
        alpha_lr: Union[float, list] = NotProvided,
        tau: float = NotProvided,
        twin_q: bool = NotProvided,
        initial_alpha: float = NotProvided,
        target_entropy: Union[str, float] = NotProvided,
        n_step: Union[int, Tuple[int, int]] = NotProvided,
        num_steps_sampled_before_learning_starts: int = NotProvided,
        training_intensity: Optional[float] = NotProvided,
        replay_buffer_config: Optional[Dict[str, Any]] = NotProvided,
        store_buffer_in_checkpoints: bool = NotProvided,
        min_sample_timesteps_per_iteration: int = NotProvided,
        **kwargs,
    ) -> "SACConfig":
        """SAC's settings plus everything :meth:`AlgorithmConfig.training` takes. SAC has three learning
        rates, ``actor_lr``, ``critic_lr`` and ``alpha_lr``; ``lr`` sets all three at once (the
        command line's ``--lr``), and the specific ones given with it win."""
        from dlearner.config import learning_rate

        super().training(**kwargs)
        if kwargs.get("lr", NotProvided) is not NotProvided:
            self.actor_lr = self.critic_lr = self.alpha_lr = self.lr
        for name, value in (("actor_lr", actor_lr), ("critic_lr", critic_lr), ("alpha_lr", alpha_lr)):
            if value is not NotProvided:
                setattr(self, name, learning_rate(name, value))
        apply_checks(
            self,
            {
                "tau": (tau, unit_interval),
                "twin_q": (twin_q, boolean),
                "initial_alpha": (initial_alpha, positive),
                "num_steps_sampled_before_learning_starts": (num_steps_sampled_before_learning_starts, non_negative_int),
                "store_buffer_in_checkpoints": (store_buffer_in_checkpoints, boolean),
                "min_sample_timesteps_per_iteration": (min_sample_timesteps_per_iteration, positive_int),
            },
        )
        if n_step is not NotProvided:
            self.n_step = checked_n_step(n_step)
        if target_entropy is not NotProvided:
            if target_entropy != "auto" and not (
                isinstance(target_entropy, (int, float))
                and not isinstance(target_entropy, bool)
                and math.isfinite(target_entropy)
            ):
                raise ValueError(f"target_entropy must be 'auto' or a finite number, got {target_entropy!r}.")
            self.target_entropy = target_entropy if target_entropy == "auto" else float(target_entropy)
        if training_intensity is not NotProvided:
            self.training_intensity = None if training_intensity is None else positive("training_intensity", training_intensity)
        if replay_buffer_config is not NotProvided:
            from dlearner.replay import validate_replay_buffer_config

            # Checked now against the batch size set so far; validate() checks again at build time.
            validate_replay_buffer_config(replay_buffer_config, train_batch_size=self.train_batch_size)
            self.replay_buffer_config = dict(replay_buffer_config or {})
        return self

    def env_runners(self, *, rollout_fragment_length: int = NotProvided, **kwargs) -> "SACConfig":
        """:meth:`AlgorithmConfig.env_runners`, plus ``rollout_fragment_length``: env steps each sub-env
        samples per fragment (SAC's default 1: one update per env step with ``training_intensity=None``)."""
        super().env_runners(**kwargs)
        apply_checks(self, {"rollout_fragment_length": (rollout_fragment_length, positive_int)})
        return self

    def validate(self) -> None:
        from dlearner.replay import validate_replay_buffer_config

        super().validate()
        self.replay_buffer_config = validate_replay_buffer_config(
            self.replay_buffer_config, train_batch_size=self.train_batch_size
        )

    @property
    def steps_per_fragment(self) -> int:
        """Env steps in one fragment of one env runner."""
        return self.rollout_fragment_length * self.num_envs_per_env_runner

    def resolved_training_intensity(self) -> float:
        """Trained rows per sampled env step: ``training_intensity``, or one update per fragment."""
        if self.training_intensity is not None:
            return float(self.training_intensity)
        return self.train_batch_size / self.steps_per_fragment


# --------------------------------------------------------------------------------------- algorithm
#: A learner call makes at least this many updates once learning started (fewer calls, each doing
#: more, keep the cluster's per-call cost small next to SAC's small updates). Env runners then act
#: with weights at most this many updates old, which off-policy learning tolerates.
MIN_UPDATES_PER_CALL = 64


class SAC(Algorithm):
    """SAC's training step: sample fragments, add their transitions to the learners' replay buffers,
    train from them as ``training_intensity`` says, sync weights; until ``min_sample_timesteps_per_iteration``
    env steps were sampled. Learning starts once the buffer holds
    ``num_steps_sampled_before_learning_starts`` transitions (a run restored without its buffer
    refills it first). Results add ``replay_buffer_size``."""

    def __init__(self, config: Any):
        _check_env_for_sac(config)
        self._update_credit = 0.0  # fractional updates owed (training_intensity)
        self._n_step_rng = np.random.default_rng(config.seed)  # spans of an n_step range
        self.replay_buffer_size = 0
        super().__init__(config)

    def training_step(self):
        config = self.config
        per_call: List[Dict[str, Any]] = []
        sampled = 0
        in_flight = None  # the learner call of the last round: (future of its results, of the weights after it)
        while sampled < config.min_sample_timesteps_per_iteration:
            # The env runners sample the next fragments while the learners train on the last ones.
            fragments = self.env_runner_group.sample(self._round_env_steps(config.min_sample_timesteps_per_iteration - sampled))
            if in_flight is not None:
                self._finish_call(*in_flight, per_call)
            pieces = [n_step_transitions(f, n_step=self._n_steps(f), gamma=config.gamma) for f in fragments]
            rows = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
            num_rows = len(rows[Columns.OBS])
            sampled += num_rows
            num_updates = self._updates_owed(num_rows)
            self.replay_buffer_size = min(self.replay_buffer_size + num_rows, self._capacity)
            future = self.learner_group.update_from_replay_buffer(
                rows, num_updates=num_updates, batch_size=config.train_batch_size, timesteps=self.timesteps(sampled),
                async_update=True,
            )  # fmt: skip
            # Queued behind the call on the learners: the weights after its updates, without waiting here.
            in_flight = (future, self.learner_group.get_weights_async(inference_only=True) if num_updates else None)
        self._finish_call(*in_flight, per_call)
        if not per_call:
            return {ALL_MODULES: {"replay_buffer_size": self.replay_buffer_size}}, sampled
        from dlearner.algorithms.off_policy import _mean_results

        results = _mean_results(per_call)
        results[ALL_MODULES]["num_env_steps_trained_lifetime"] = self.num_env_steps_trained_lifetime
        results[ALL_MODULES]["replay_buffer_size"] = self.replay_buffer_size  # now, not a mean over the calls
        return results, sampled

    def _finish_call(self, future, weights, per_call: List[Dict[str, Any]]) -> None:
        """Wait for a learner call; keep its results, count its training and send its weights to the env runners."""
        results = future.result()
        self.replay_buffer_size = int(results[ALL_MODULES]["replay_buffer_size"])
        if weights is not None:
            per_call.append(results)
            self.num_env_steps_trained_lifetime += int(results[ALL_MODULES]["num_env_steps_trained"])
            self.env_runner_group.sync_weights(weights.result())

    def _n_steps(self, fragment: Mapping[str, np.ndarray]) -> Union[int, np.ndarray]:
        """``n_step``, or for a ``(low, high)`` range one span per step of ``fragment``, drawn uniformly."""
        n_step = self.config.n_step
        if isinstance(n_step, int):
            return n_step
        low, high = n_step
        return self._n_step_rng.integers(low, high + 1, size=np.shape(fragment[Columns.REWARDS]))

    @property
    def _capacity(self) -> int:
        return int(self.config.replay_buffer_config["capacity"])

    @property
    def _learning_starts(self) -> int:
        return max(1, min(self.config.num_steps_sampled_before_learning_starts, self._capacity))

    def _round_env_steps(self, remaining: int) -> int:
        """Env steps to sample before the next learner call: up to the learning start at once; then
        enough fragments for :data:`MIN_UPDATES_PER_CALL` updates (at least one round of fragments)."""
        config = self.config
        fragment_round = config.steps_per_fragment * max(1, config.num_env_runners)
        if self.replay_buffer_size < self._learning_starts:
            wanted = self._learning_starts - self.replay_buffer_size
        else:
            updates_per_round = fragment_round * config.resolved_training_intensity() / config.train_batch_size
            wanted = fragment_round * max(1, math.ceil(MIN_UPDATES_PER_CALL / max(updates_per_round, 1e-9)))
        wanted = min(wanted, max(remaining, 1))
        return max(fragment_round, math.ceil(wanted / fragment_round) * fragment_round)

    def _updates_owed(self, num_rows: int) -> int:
        """Updates for ``num_rows`` newly sampled env steps (about to join the buffer):
        ``training_intensity`` trained rows per sampled step (fractions carried over), counting only
        the steps sampled once the buffer holds what learning starts with."""
        eligible = min(num_rows, self.replay_buffer_size + num_rows - self._learning_starts)
        if eligible <= 0:
            return 0
        self._update_credit += eligible * self.config.resolved_training_intensity() / self.config.train_batch_size
        owed = int(self._update_credit)
        self._update_credit -= owed
        return owed

    def iteration_results(self) -> Dict[str, Any]:
        return {"replay_buffer_size": self.replay_buffer_size}

    def get_counters(self) -> Dict[str, Any]:
        return {
            **super().get_counters(),
            "sac_update_credit": self._update_credit,
            # The spans an n_step range draws next: a restored run draws the same ones.
            "sac_n_step_rng": n_step_generator_state(self._n_step_rng),
        }

    def set_counters(self, counters: Mapping[str, Any]) -> None:
        rng = counters.get("sac_n_step_rng")
        n_step_rng = None if rng is None else n_step_generator(rng)  # checked before anything changes
        super().set_counters(counters)
        credit = counters.get("sac_update_credit", 0.0)
        self._update_credit = float(credit) if isinstance(credit, (int, float)) and 0 <= credit < 1e9 else 0.0
        if n_step_rng is not None:
            self._n_step_rng = n_step_rng

    def _after_restore(self) -> None:
        super()._after_restore()
        self.replay_buffer_size = int(self.learner_group.foreach_learner(_replay_buffer_size)[0])


def _replay_buffer_size(learner: Any) -> int:
    return len(learner.replay_buffer)


def _check_env_for_sac(config: Any) -> None:
    """Refuse, before any cluster starts, an env SAC cannot train: multi-agent, or an action space
    other than a bounded 1-D Box or a Discrete."""
    if config.env is None:
        return  # Algorithm says what is missing
    env = config.make_env()
    try:
        if config.is_multi_agent(env):
            raise ValueError(
                f"SAC trains single-agent environments; {config.env!r} is multi-agent. Use PPO, IMPALA or APPO for it."
            )
        space = env.action_space
    finally:
        env.close()
    if isinstance(space, gym.spaces.Discrete):
        return
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
            raise ValueError(
                f"SAC squashes actions into the action space's bounds, but {config.env!r} has the unbounded {space}; "
                "wrap the env so its actions are bounded (gymnasium.wrappers.RescaleAction / ClipAction)."
            )
        return
    raise ValueError(
        f"SAC handles Box (1-D, bounded) and Discrete action spaces; {config.env!r} has {space}. For MultiDiscrete or "
        "Tuple actions use PPO, IMPALA or APPO, or wrap the env so its actions are one Discrete or Box."
    )
