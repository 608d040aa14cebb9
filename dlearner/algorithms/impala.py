"""IMPALA (Espeholt et al., 2018): asynchronous actor-critic with V-trace off-policy correction.

Env runners keep sampling with whatever weights they last received while the learners update; the
lag between the *behaviour* policy ``mu`` that sampled and the learner's *target* policy ``pi`` is
corrected by V-trace. The loss on one minibatch of rollout fragments (time-major, ``[T, B]``)::

    vs, A     = vtrace(log pi(a|x), log mu(a|x), discounts, rewards, V(x), V(x_T))   # no gradient
    L_pg      = -mean(log pi(a_t|x_t) * A_t)                                          # section 4.2
    L_vf      = 0.5 * mean((V(x_t) - vs_t)^2)
    L_entropy = -mean(H(pi(.|x_t)))
    loss      = L_pg + vf_loss_coeff * L_vf + entropy_coeff * L_entropy

and the gradient is clipped by its global norm (``grad_clip``, 40 by default as in RLlib).

Batch layout. V-trace needs each fragment in time order, so a batch handed to an IMPALA (or APPO)
learner is a sequence of whole rollout fragments of ``rollout_fragment_length`` rows each, every
fragment's rows consecutive in time. The learner never shuffles rows; ``minibatch_size`` (if set)
must be a multiple of the fragment length, and with N learners each learner's shard holds whole
fragments (the training loop makes the fragment count a multiple of N). The bootstrap value at the
end of a fragment is the env runner's ``next_vf_preds`` (the contract's "bootstrap values the env
runner computed"): the value of the observation after the last step, 0 after a termination.

Episodes inside a fragment. ``discounts = gamma * (1 - terminated)`` stops the recursion at a
termination. At a truncation (time limit) the next row belongs to a new episode, so the recursion
stops there too, and the truncated step's return is bootstrapped from the value of its final
observation: ``r_t + gamma * V(final obs)`` with discount 0 (the same bootstrapped return GAE uses).

Padding rows. A multi-agent fragment of an agent that left its episode early is padded to the
fragment length; its ``loss_mask`` is False on the padding rows, which are terminated with reward 0.
V-trace runs over them unchanged (the termination before them keeps them out of every real row's
target), and every mean of the loss is taken over the rows the mask keeps. A batch without
``loss_mask`` trains on all rows.

Multi-agent batches (``{module_id: {column: array}}``) hold whole fragments of each module; the loss
runs per module, each module's fragments in time order.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from dlearner.algorithm import Algorithm
from dlearner.algorithms.losses import RowMean
from dlearner.columns import Columns
from dlearner.config import AlgorithmConfig
from dlearner.env_runner import NEXT_VF_PREDS
from dlearner.learner import TorchLearner
from dlearner.validation import NotProvided, apply_checks, non_negative, positive, positive_int


# ------------------------------------------------------------------------------------ V-trace
def vtrace(
    target_action_log_probs: torch.Tensor,
    behaviour_action_log_probs: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: Optional[float] = 1.0,
    clip_pg_rho_threshold: Optional[float] = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """V-trace targets ``vs`` and policy-gradient advantages (Espeholt et al. 2018, eq. 1 and section 4.2).

    All inputs are time-major torch tensors of shape ``[T, B]`` (``bootstrap_value``: ``[B]``, the
    value of the state after each column's last step). ``discounts[t]`` is ``gamma * (1 - terminated_t)``.
    With ``rho_t = pi(a_t|x_t) / mu(a_t|x_t)``::

        rho_t   = min(clip_rho_threshold, pi/mu)      c_t = min(1, pi/mu)
        delta_t = rho_t * (r_t + gamma_t * V(x_{t+1}) - V(x_t))
        vs_s    = V(x_s) + delta_s + gamma_s * c_s * (vs_{s+1} - V(x_{s+1}))     # backward recursion
        A_s     = min(clip_pg_rho_threshold, pi/mu) * (r_s + gamma_s * vs_{s+1} - V(x_s))

    with ``vs_T = V(x_T) = bootstrap_value``. A ``None`` threshold means no clipping. Returns
    ``(vs, advantages)``, both ``[T, B]``; no gradient flows through either.

    Example::

        vs, advantages = vtrace(logp_pi, logp_mu, 0.99 * (1 - terminated), rewards, values, values_T)
    """
    with torch.no_grad():
        target_action_log_probs, behaviour_action_log_probs, discounts, rewards, values, bootstrap_value = (
            t.detach() for t in (target_action_log_probs, behaviour_action_log_probs, discounts, rewards, values, bootstrap_value)
        )
        if values.dim() != 2 or bootstrap_value.shape != values.shape[1:]:
            raise ValueError(
                f"vtrace needs time-major [T, B] inputs and a [B] bootstrap_value, got values {tuple(values.shape)} "
                f"and bootstrap_value {tuple(bootstrap_value.shape)}."
            )
        for name, tensor in (
            ("target_action_log_probs", target_action_log_probs),
            ("behaviour_action_log_probs", behaviour_action_log_probs),
            ("discounts", discounts),
            ("rewards", rewards),
        ):
            if tensor.shape != values.shape:
                raise ValueError(
                    f"vtrace: {name} has shape {tuple(tensor.shape)}, values {tuple(values.shape)}; they must match."
                )

        rhos = torch.exp(target_action_log_probs - behaviour_action_log_probs)
        clipped_rhos = rhos if clip_rho_threshold is None else torch.clamp(rhos, max=clip_rho_threshold)
        cs = torch.clamp(rhos, max=1.0)
        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)

        # vs_s - V(x_s) = delta_s + gamma_s * c_s * (vs_{s+1} - V(x_{s+1})), from the last step backwards.
        vs_minus_v = torch.zeros_like(values)
        acc = torch.zeros_like(bootstrap_value)
        for t in range(values.shape[0] - 1, -1, -1):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            vs_minus_v[t] = acc
        vs = vs_minus_v + values

        # Policy-gradient advantage (section 4.2): bootstrapped from vs_{s+1}, with its own clipped rho.
        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        clipped_pg_rhos = rhos if clip_pg_rho_threshold is None else torch.clamp(rhos, max=clip_pg_rho_threshold)
        pg_advantages = clipped_pg_rhos * (rewards + discounts * vs_t_plus_1 - values)
    return vs, pg_advantages


# ------------------------------------------------------------------------------------ learner
class IMPALATorchLearner(TorchLearner):
    """IMPALA's loss: V-trace policy gradient, value loss towards ``vs`` and an entropy bonus.

    Batches are whole rollout fragments in time order (see the module docstring); the learner never
    shuffles their rows.
    """

    required_columns = (
        Columns.OBS,
        Columns.ACTIONS,
        Columns.ACTION_LOGP,
        Columns.REWARDS,
        Columns.TERMINATEDS,
        Columns.TRUNCATEDS,
        NEXT_VF_PREDS,  # the env runner's V(next observation): bootstraps fragment ends and truncations
    )

    # -- batch layout ---------------------------------------------------------------------------
    def update(self, batch, timesteps=None, *, num_epochs=None, minibatch_size=None, shuffle=True, shard=None):
        """:meth:`Learner.update` on whole rollout fragments. Rows are in time order, so they are
        never shuffled (``shuffle`` is ignored) and ``minibatch_size`` must be whole fragments."""
        size = minibatch_size if minibatch_size is not None else getattr(self.config, "minibatch_size", None)
        _check_minibatch_size(size, self.config.rollout_fragment_length)
        return super().update(batch, timesteps, num_epochs=num_epochs, minibatch_size=minibatch_size, shuffle=False, shard=shard)

    def _check_layout(self, local, layout) -> None:
        super()._check_layout(local, layout)
        length = self.config.rollout_fragment_length
        for mid, rows in layout.global_rows.items():
            local_rows = len(next(iter(local[mid].values()))) if mid in local else 0
            if rows % length or layout.row_offsets[mid] % length or local_rows % length:
                raise ValueError(
                    f"{type(self).__name__} trains on whole rollout fragments of rollout_fragment_length={length} rows, "
                    f"but module {mid!r} has {rows} rows (this shard: {local_rows} from row {layout.row_offsets[mid]}); "
                    "give a multiple of the fragment length, each fragment's rows in time order "
                    "(with N learners, a multiple of N fragments)."
                )

    def _time_major(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B * T, ...]`` rows (B fragments of T consecutive steps) -> ``[T, B, ...]``."""
        length = self.config.rollout_fragment_length
        return tensor.reshape(-1, length, *tensor.shape[1:]).transpose(0, 1)

    def row_means(self, batch) -> Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """``(mean of time-major [T, B] terms, mean of per-row [B * T] terms)`` over the rows the loss
        counts: all of them, or those ``loss_mask`` keeps."""
        mask = batch.get(Columns.LOSS_MASK)
        return RowMean(None if mask is None else self._time_major(mask)), RowMean(mask)

    def vtrace_inputs(self, batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(discounts, rewards, bootstrap_value)`` time-major, episodes cut at terminations and truncations.

        A truncated step's return is bootstrapped from its final observation's value (the next row
        is another episode), so the recursion stops there like at a termination.
        """
        gamma = self.config.gamma
        terminated = self._time_major(batch[Columns.TERMINATEDS]).float()
        truncated = self._time_major(batch[Columns.TRUNCATEDS]).float() * (1.0 - terminated)
        next_values = self._time_major(batch[NEXT_VF_PREDS]).float()
        rewards = self._time_major(batch[Columns.REWARDS]).float() + gamma * truncated * next_values
        discounts = gamma * (1.0 - terminated) * (1.0 - truncated)
        return discounts, rewards, next_values[-1]

    # -- the loss ---------------------------------------------------------------------------------
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        """IMPALA's loss on whole fragments, term by term as in the module docstring."""
        dist = self.module[module_id].get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        logp = self._time_major(dist.logp(batch[Columns.ACTIONS]))
        values = self._time_major(fwd_out[Columns.VF_PREDS])
        discounts, rewards, bootstrap_value = self.vtrace_inputs(batch)

        # V-trace corrects for the lag between the behaviour policy mu (that sampled) and pi (learning now).
        vs, advantages = vtrace(
            logp,
            self._time_major(batch[Columns.ACTION_LOGP]),
            discounts,
            rewards,
            values,
            bootstrap_value,
            clip_rho_threshold=config.vtrace_clip_rho_threshold,
            clip_pg_rho_threshold=config.vtrace_clip_pg_rho_threshold,
        )
        time_major_mean, flat_mean = self.row_means(batch)  # padding rows (loss_mask False) count nowhere
        policy_loss = -time_major_mean(logp * advantages)
        vf_loss = 0.5 * time_major_mean(torch.pow(values - vs, 2.0))
        entropy = flat_mean(dist.entropy())
        total_loss = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * entropy

        self.metrics.log_dict({"policy_loss": policy_loss, "vf_loss": vf_loss, "entropy": entropy}, module_id=module_id)
        return total_loss


def _check_minibatch_size(minibatch_size: Optional[int], fragment_length: int) -> None:
    if minibatch_size is not None and minibatch_size % fragment_length:
        raise ValueError(
            f"minibatch_size={minibatch_size} must be a multiple of rollout_fragment_length={fragment_length} "
            "(V-trace trains on whole fragments), or None for one step on the whole batch."
        )


# ------------------------------------------------------------------------------------- config
def _optional_threshold(name: str, value: Any) -> Optional[float]:
    return None if value is None else positive(name, value)


def _optional_seconds(name: str, value: Any) -> Optional[float]:
    return None if value is None else non_negative(name, value)


class IMPALAConfig(AlgorithmConfig):
    """Config of IMPALA: asynchronous sampling and learning with V-trace.

    Example::

        algo = IMPALAConfig().environment("CartPole-v1").env_runners(num_env_runners=1).build_algo()
        result = algo.train()
        print(result["env_runners"]["episode_return_mean"], result["policy_lag_mean"])

    Settings of the asynchronous loop (see ``docs/concepts.md``): env runners sample fragments of
    ``rollout_fragment_length`` steps per vector env, without waiting for the learners; every
    ``broadcast_interval`` updates the new weights go to them with their next request; at most
    ``learner_queue_size`` train batches of samples wait for the learners (sampling waits when the
    queue is full, nothing is dropped); one ``train()`` call lasts ``min_time_s_per_iteration``
    seconds (5 by default), or trains on ``train_batch_size`` new samples when you give
    ``train_batch_size`` (or ``min_time_s_per_iteration=None``): whichever setting you gave.
    """

    default_learner_class = IMPALATorchLearner
    algo_class_path = "dlearner.algorithms.impala.IMPALA"

    def __init__(self) -> None:
        super().__init__()
        # Tuned with benchmarks/async_throughput.py for CartPole-v1 with the default [256, 256] model.
        self.lr = 1e-3
        self.num_envs_per_env_runner = 8
        self.train_batch_size = 500
        self.minibatch_size = None  # one gradient step on each train batch, as RLlib's IMPALA
        self.num_epochs = 1
        self.grad_clip = 40.0
        self.grad_clip_by = "global_norm"
        self.max_requests_in_flight_per_learner = 2  # one update running, one waiting: the learner never idles
        self.vtrace_clip_rho_threshold: Optional[float] = 1.0
        self.vtrace_clip_pg_rho_threshold: Optional[float] = 1.0
        self.vf_loss_coeff = 0.5
        self.entropy_coeff = 0.01
        self.rollout_fragment_length = 50
        self.broadcast_interval = 1
        self.learner_queue_size = 4
        # One iteration (a progress line, a metrics line, a dashboard point) lasts this long unless the
        # user sizes it by train_batch_size: at ~10 train batches a second, per-batch iterations would
        # write ~2 GB of metrics a day (RLlib's IMPALA: 10 s).
        self.min_time_s_per_iteration: Optional[float] = 5.0

    def training(
        self,
        *,
        vtrace_clip_rho_threshold: Optional[float] = NotProvided,
        vtrace_clip_pg_rho_threshold: Optional[float] = NotProvided,
        vf_loss_coeff: float = NotProvided,
        entropy_coeff: float = NotProvided,
        rollout_fragment_length: int = NotProvided,
        broadcast_interval: int = NotProvided,
        learner_queue_size: int = NotProvided,
        min_time_s_per_iteration: Optional[float] = NotProvided,
        **kwargs,
    ) -> "IMPALAConfig":
        """IMPALA's settings plus everything :meth:`AlgorithmConfig.training` takes.

        ``vtrace_clip_rho_threshold`` / ``vtrace_clip_pg_rho_threshold`` are V-trace's rho-bar and
        rho-bar_pg (``None``: no clipping); ``rollout_fragment_length`` is the steps per fragment and
        vector env; ``broadcast_interval`` the updates between weight broadcasts to the env runners;
        ``learner_queue_size`` the train batches that may wait for the learners;
        One ``train()`` call lasts ``min_time_s_per_iteration`` seconds (5 by default), or trains on
        ``train_batch_size`` new samples: whichever setting you gave. Giving ``train_batch_size``
        without ``min_time_s_per_iteration`` makes iterations count samples (the time default no
        longer applies); giving ``min_time_s_per_iteration`` makes them count time; ``None`` or 0
        counts samples.
        """
        if "train_batch_size" in kwargs and min_time_s_per_iteration is NotProvided:
            min_time_s_per_iteration = None
        super().training(**kwargs)
        apply_checks(
            self,
            {
                "vtrace_clip_rho_threshold": (vtrace_clip_rho_threshold, _optional_threshold),
                "vtrace_clip_pg_rho_threshold": (vtrace_clip_pg_rho_threshold, _optional_threshold),
                "vf_loss_coeff": (vf_loss_coeff, non_negative),
                "entropy_coeff": (entropy_coeff, non_negative),
                "rollout_fragment_length": (rollout_fragment_length, positive_int),
                "broadcast_interval": (broadcast_interval, positive_int),
                "learner_queue_size": (learner_queue_size, positive_int),
                "min_time_s_per_iteration": (min_time_s_per_iteration, _optional_seconds),
            },
        )
        return self

    def env_runners(self, *, rollout_fragment_length: int = NotProvided, **kwargs) -> "IMPALAConfig":
        """:meth:`AlgorithmConfig.env_runners`, plus ``rollout_fragment_length`` (RLlib keeps it here too)."""
        super().env_runners(**kwargs)
        apply_checks(self, {"rollout_fragment_length": (rollout_fragment_length, positive_int)})
        return self

    def validate(self) -> None:
        super().validate()
        _check_minibatch_size(self.minibatch_size, self.rollout_fragment_length)


# ---------------------------------------------------------------------------------- algorithm
class IMPALA(Algorithm):
    """IMPALA's training step: the asynchronous loop of :mod:`dlearner.algorithms.async_pipeline`.

    Env runners sample while learners update; one ``train()`` returns once ``train_batch_size`` new
    samples were trained on (or ``min_time_s_per_iteration`` passed). Results add
    ``num_env_steps_dropped_lifetime``, ``policy_lag_mean`` / ``policy_lag_max`` and throughputs to
    the usual keys.
    """

    _pipeline = None

    @property
    def pipeline(self):
        """The :class:`~dlearner.algorithms.async_pipeline.AsyncPipeline` behind :meth:`train`."""
        if self._pipeline is None:
            from dlearner.algorithms.async_pipeline import AsyncPipeline

            self._pipeline = AsyncPipeline(self)
        return self._pipeline

    def training_step(self):
        return self.pipeline.run_iteration()

    def collect_episode_metrics(self):
        # Episode statistics arrive with every fragment, so train() never waits on a sampling runner.
        return self.pipeline.pop_episode_metrics()

    def iteration_results(self) -> Dict[str, Any]:
        return self.pipeline.iteration_results()

    def save_to_path(self, path, **kwargs: Any) -> str:
        """As :meth:`Algorithm.save_to_path`, after the updates in flight finished (their samples are
        counted as trained), so the weights and counters in the checkpoint belong together."""
        if self._pipeline is not None:
            self._pipeline.finish_updates()
        return super().save_to_path(path, **kwargs)

    # Restores and module changes replace what queued samples were taken with: the pipeline lets the
    # updates in flight finish first, and afterwards drops (and counts) what can no longer be trained.
    def _before_restore(self) -> None:
        self._before_module_change()

    def _after_restore(self) -> None:
        """Samples taken with the replaced weights (queued or being sampled) are discarded and counted
        in ``num_env_steps_dropped_lifetime``."""
        if self._pipeline is not None:
            self._pipeline.reset_after_restore()

    def _before_module_change(self) -> None:
        # Updates in flight were made for the old modules: they finish first (their results go into
        # the next iteration's), so the learners change modules between updates.
        if self._pipeline is not None:
            self._pipeline.finish_updates()

    def _after_module_change(self) -> None:
        """Queued fragments of removed modules, or of modules ``policies_to_train`` now leaves out, are
        dropped (counted in ``num_env_steps_dropped_lifetime``)."""
        if self._pipeline is not None:
            self._pipeline.forget_untrained_modules()

    def stop(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        super().stop()
