"""Proximal Policy Optimization (Schulman et al., 2017): the config, the loss and GAE.

The loss, per minibatch row, with ratio ``r = pi(a|s) / pi_old(a|s)`` and advantage ``A``::

    L_clip    = -min(r * A, clip(r, 1 - eps, 1 + eps) * A)       # eps = clip_param
    L_vf      = min((V(s) - V_target)^2, vf_clip_param)          # the squared error clamped, as RLlib does
    L_entropy = -H(pi(.|s))
    L_kl      = KL(pi_old || pi)                                 # optional, adaptive coefficient
    loss      = mean(L_clip + vf_loss_coeff * L_vf + entropy_coeff * L_entropy) + kl_coeff * mean(L_kl)

The value "clip" is RLlib's: it clamps the *squared error* at ``vf_clip_param`` (rows beyond it give
no value gradient), not the value prediction around the old one as in OpenAI's PPO2 / CleanRL.

Besides the losses each module reports two diagnostics, as RLlib, CleanRL and Stable-Baselines3 do:

* ``clip_fraction``: the fraction of rows whose ratio lay outside ``[1 - eps, 1 + eps]`` (so was
  clipped), over every row of every minibatch and epoch of the update, on all learners;
* ``vf_explained_var``: ``1 - Var[y - V] / Var[y]`` with ``y`` the value targets and ``V`` the value
  predictions the loss saw, pooled over the same rows (NaN when the targets do not vary). 1 is a
  perfect critic, 0 one no better than a constant, negative one worse than that.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from dlearner.algorithm import Algorithm
from dlearner.algorithms.kl_coeffs import AdaptiveKLCoeffs
from dlearner.algorithms.losses import RowMean, clipped_surrogate_loss
from dlearner.columns import ALL_MODULES, Columns
from dlearner.config import AlgorithmConfig
from dlearner.learner import TorchLearner
from dlearner.validation import NotProvided, apply_checks, boolean, non_negative, positive, unit_interval


class PPOTorchLearner(AdaptiveKLCoeffs, TorchLearner):
    """PPO's clipped-surrogate loss with value clipping, entropy bonus and an adaptive KL penalty."""

    required_columns = (
        Columns.OBS,
        Columns.ACTIONS,
        Columns.ACTION_DIST_INPUTS,
        Columns.ACTION_LOGP,
        Columns.ADVANTAGES,
        Columns.VALUE_TARGETS,
    )

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        """PPO's loss on one minibatch, term by term as in the paper (see the module docstring)."""
        mean = RowMean(batch.get(Columns.LOSS_MASK))  # over the rows the loss counts
        dist_cls = self.module[module_id].get_train_action_dist_cls()
        curr_dist = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])

        # Probability ratio r = pi(a|s) / pi_old(a|s) of the sampled actions.
        logp_ratio = torch.exp(curr_dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP])

        # Clipped surrogate objective L^CLIP (paper, eq. 7), negated into a loss.
        policy_loss = clipped_surrogate_loss(logp_ratio, batch[Columns.ADVANTAGES], config.clip_param, mean)

        # Value loss: the squared error, clamped at vf_clip_param as RLlib does.
        values, targets = fwd_out[Columns.VF_PREDS], batch[Columns.VALUE_TARGETS]
        vf_loss = mean(torch.clamp(torch.pow(values - targets, 2.0), 0, config.vf_clip_param))

        # Entropy bonus (paper, eq. 9).
        entropy = mean(curr_dist.entropy())

        total_loss = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * entropy

        # Adaptive KL penalty (paper, section 4) on top of clipping, as RLlib does.
        if config.use_kl_loss:
            prev_dist = dist_cls.from_logits(batch[Columns.ACTION_DIST_INPUTS])
            mean_kl = mean(prev_dist.kl(curr_dist))
            total_loss = total_loss + self.curr_kl_coeffs[module_id] * mean_kl
            self.metrics.log_value((module_id, "mean_kl_loss"), mean_kl)

        self.metrics.log_dict({"policy_loss": policy_loss, "vf_loss": vf_loss, "entropy": entropy}, module_id=module_id)
        # The diagnostics (clip fraction, explained variance) need no gradient: their inputs wait
        # for the end of the update, which computes them once over all its steps.
        self.metrics.stash(
            _DIAGNOSTICS,
            (module_id, self.metrics.default_weight, mean.mask, logp_ratio.detach(), values.detach(), targets, config.clip_param),
        )
        return total_loss

    def log_step_metrics(self) -> None:
        """``clip_fraction``, and for ``vf_explained_var`` the row means it is made of (see
        :meth:`after_gradient_based_update`), over the rows of all of this update's gradient steps at
        once: the same weighted mean as one per step, for the price of one."""
        super().log_step_metrics()
        by_module: Dict[str, list] = {}
        for module_id, *step in self.metrics.take_stash(_DIAGNOSTICS):
            by_module.setdefault(module_id, []).append(step)
        for module_id, steps in by_module.items():
            weights, masks, ratios, values, targets, clips = zip(*steps)
            with torch.no_grad():
                y = torch.cat(targets).to(torch.float64)
                error = y - torch.cat(values).to(torch.float64)
                any_mask = any(m is not None for m in masks)
                mean = RowMean(
                    torch.cat([m if m is not None else torch.ones_like(r, dtype=torch.bool) for m, r in zip(masks, ratios)])
                    if any_mask
                    else None
                )
                clipped = (torch.abs(torch.cat(ratios) - 1.0) > clips[-1]).to(torch.float64)  # one config per update
                # A step's means are weighted by its rows (or kept rows): the mean over all the rows.
                means = mean.columns(torch.stack((clipped, y, y * y, error, error * error), dim=-1))
            weight = sum(weights)
            for name, value in zip(("clip_fraction",) + _VF_MOMENTS, means.unbind()):
                self.metrics.log_value((module_id, name), value, weight=weight)

    def after_gradient_based_update(self, *, timesteps):
        """Per module: the explained variance from its reduced row means, and the KL coefficient adapted
        from the mean KL over all learners' rows (so learners stay identical)."""
        super().after_gradient_based_update(timesteps=timesteps)
        for module_id in self.module.keys():
            try:
                moments = [self.metrics.pop((module_id, name)) for name in _VF_MOMENTS]
            except KeyError:
                continue  # the module was not in this update
            self.metrics.log_value((module_id, "vf_explained_var"), _explained_variance(*moments), reduce="last")
            if self.config.use_kl_loss:
                self.adapt_kl_coeff(module_id, self.metrics.peek((module_id, "mean_kl_loss")))
                self.metrics.log_value((module_id, "curr_kl_coeff"), self.curr_kl_coeffs[module_id], reduce="last")


#: Where the gradient steps leave the inputs of the diagnostics for log_step_metrics.
_DIAGNOSTICS = "ppo_diagnostics"

# Row means of y, y^2, e and e^2 (y: value targets, e = y - V): the explained variance's ingredients.
_VF_MOMENTS = ("_vf_target_mean", "_vf_target_sq_mean", "_vf_error_mean", "_vf_error_sq_mean")


def _explained_variance(y_mean: float, y_sq_mean: float, e_mean: float, e_sq_mean: float) -> float:
    """``1 - Var[e] / Var[y]`` from first and second moments (NaN when ``y`` does not vary)."""
    var_y = y_sq_mean - y_mean * y_mean
    var_e = max(e_sq_mean - e_mean * e_mean, 0.0)
    if not var_y > 1e-12 * max(y_sq_mean, 1e-300):  # constant targets (up to rounding): undefined
        return float("nan")
    return 1.0 - var_e / var_y


def compute_gae(
    rewards: np.ndarray,
    vf_preds: np.ndarray,
    next_vf_preds: np.ndarray,
    terminateds: np.ndarray,
    truncateds: np.ndarray,
    *,
    gamma: float,
    lambda_: float,
) -> Tuple[np.ndarray, np.ndarray]:
    """Generalized Advantage Estimation over time-major arrays of shape ``(T,)`` or ``(T, num_envs)``.

    ``next_vf_preds[t]`` is the value of the observation after step ``t``: on truncation (time limit)
    the value of the final observation, which bootstraps the return; on termination it is ignored,
    since a terminal state has no future. Returns ``(advantages, value_targets)``::

        delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}      # done = terminated or truncated
        V_target_t = A_t + V(s_t)
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(vf_preds, dtype=np.float64)
    next_values = np.asarray(next_vf_preds, dtype=np.float64)
    terminated = np.asarray(terminateds, dtype=bool)
    done = terminated | np.asarray(truncateds, dtype=bool)
    if not (rewards.shape == values.shape == next_values.shape == terminated.shape == done.shape):
        raise ValueError(
            "compute_gae needs rewards, vf_preds, next_vf_preds, terminateds and truncateds of one shape, got "
            f"{[np.shape(a) for a in (rewards, vf_preds, next_vf_preds, terminateds, truncateds)]}."
        )
    deltas = rewards + gamma * np.where(terminated, 0.0, next_values) - values
    advantages = np.zeros_like(rewards)
    last = np.zeros_like(rewards[0]) if rewards.ndim > 0 and len(rewards) else 0.0
    for t in range(len(rewards) - 1, -1, -1):
        last = deltas[t] + gamma * lambda_ * np.where(done[t], 0.0, last)
        advantages[t] = last
    return advantages.astype(np.float32), (advantages + values).astype(np.float32)


class PPOConfig(AlgorithmConfig):
    """Config of PPO. Defaults are tuned to solve CartPole-v1 quickly with the default [256, 256] model.

    Example::

        algo = PPOConfig().environment("CartPole-v1").build_algo()
        print(algo.train()["env_runners"]["episode_return_mean"])
    """

    default_learner_class = PPOTorchLearner
    algo_class_path = "dlearner.algorithms.ppo.PPO"
    #: Settings that earlier versions stored in checkpoints although nothing read them (GAE and the
    #: critic were always on); ``AlgorithmConfig.from_dict`` drops them, so those checkpoints still load.
    retired_settings = frozenset({"use_gae", "use_critic"})

    def __init__(self) -> None:
        super().__init__()
        # Tuned so the default [256, 256] model solves CartPole-v1 in ~20k env steps (see
        # benchmarks/cartpole_to_solve.py); RLlib's defaults (lr 5e-5, 30 epochs, 4000 rows) need far longer.
        self.lr = 1e-3
        self.num_envs_per_env_runner = 8  # vectorised sampling: ~10x the env steps/s of one env
        self.train_batch_size = 2000
        self.minibatch_size = 128
        self.num_epochs = 6
        self.lambda_ = 0.95
        self.use_kl_loss = True
        self.kl_coeff = 0.2
        self.kl_target = 0.01
        self.clip_param = 0.3
        # RLlib's 10.0 zeroes the value gradient whenever the squared error exceeds 10, which stalls
        # value learning once returns grow into the hundreds; 1000 keeps the clamp as a guard only.
        self.vf_clip_param = 1000.0
        self.entropy_coeff = 0.0
        self.vf_loss_coeff = 1.0
        self.standardize_advantages = True

    def training(
        self,
        *,
        lambda_: float = NotProvided,
        use_kl_loss: bool = NotProvided,
        kl_coeff: float = NotProvided,
        kl_target: float = NotProvided,
        clip_param: float = NotProvided,
        vf_clip_param: float = NotProvided,
        entropy_coeff: float = NotProvided,
        vf_loss_coeff: float = NotProvided,
        standardize_advantages: bool = NotProvided,
        **kwargs,
    ) -> "PPOConfig":
        """PPO's settings plus everything :meth:`AlgorithmConfig.training` takes."""
        super().training(**kwargs)
        apply_checks(
            self,
            {
                "lambda_": (lambda_, unit_interval),
                "use_kl_loss": (use_kl_loss, boolean),
                "standardize_advantages": (standardize_advantages, boolean),
                "kl_coeff": (kl_coeff, non_negative),
                "kl_target": (kl_target, positive),
                "clip_param": (clip_param, positive),
                "vf_clip_param": (vf_clip_param, positive),
                "entropy_coeff": (entropy_coeff, non_negative),
                "vf_loss_coeff": (vf_loss_coeff, non_negative),
            },
        )
        return self


class PPO(Algorithm):
    """PPO's training step: sample → GAE (standardised over the whole batch) → update → weight sync.

    Multi-agent: GAE runs along each agent's trajectory and advantages are standardised per module;
    the modules ``policies_to_train`` leaves out are not sent to the learners.
    """

    def training_step(self):
        config = self.config
        samples = self.env_runner_group.sample(config.train_batch_size)
        if not self.is_multi_agent:
            batch = postprocess_fragments(
                samples, gamma=config.gamma, lambda_=config.lambda_, standardize=config.standardize_advantages
            )
            num_sampled = len(batch[Columns.OBS])
            results = self.learner_group.update(batch=batch, timesteps=self.timesteps(num_sampled))
            self.num_env_steps_trained_lifetime += int(results[ALL_MODULES]["num_env_steps_trained"])
        else:
            batch, env_steps = postprocess_segments(
                samples, gamma=config.gamma, lambda_=config.lambda_, standardize=config.standardize_advantages
            )
            num_sampled = int(round(sum(env_steps.values())))
            trained = self.modules_to_train(batch)
            results = {}
            if trained:
                results = self.learner_group.update(
                    batch={mid: batch[mid] for mid in trained}, timesteps=self.timesteps(num_sampled)
                )
                trained_env_steps = int(round(sum(env_steps[mid] for mid in trained))) * int(config.num_epochs)
                self.num_env_steps_trained_lifetime += trained_env_steps
                # The learners count rows (agent steps); a multi-agent run reports env steps there too.
                results[ALL_MODULES]["num_env_steps_trained"] = trained_env_steps
                results[ALL_MODULES]["num_env_steps_trained_lifetime"] = self.num_env_steps_trained_lifetime
        self.env_runner_group.sync_weights(self.learner_group.get_weights(inference_only=True))
        return results, num_sampled


def postprocess_segments(samples, *, gamma: float, lambda_: float, standardize: bool):
    """Multi-agent samples (``[{module_id: [segment, ...]}, ...]``, one dict per env runner) into one
    training batch per module, GAE along each segment (one agent's consecutive steps); advantages
    standardised over each module's whole batch. Returns ``(batch, env steps per module)``."""
    from dlearner.multi_agent.trajectories import ENV_STEP_SHARE

    pieces: Dict[str, list] = {}
    env_steps: Dict[str, float] = {}
    for sample in samples:
        for module_id, segments in sample.items():
            for segment in segments:
                advantages, targets = _gae_of(segment, gamma, lambda_)
                rows = {k: segment[k] for k in _TRAIN_COLUMNS}
                rows[Columns.ADVANTAGES], rows[Columns.VALUE_TARGETS] = advantages, targets
                pieces.setdefault(module_id, []).append(rows)
                env_steps[module_id] = env_steps.get(module_id, 0.0) + float(segment[ENV_STEP_SHARE].sum())
    batch = {}
    for module_id, rows in pieces.items():
        columns = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        if standardize:
            columns[Columns.ADVANTAGES] = _standardized(columns[Columns.ADVANTAGES])
        batch[module_id] = columns
    return batch, env_steps


def _gae_of(fragment: Dict[str, np.ndarray], gamma: float, lambda_: float) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`compute_gae` on a sampled fragment's columns."""
    from dlearner.env_runner import NEXT_VF_PREDS

    return compute_gae(
        fragment[Columns.REWARDS],
        fragment[Columns.VF_PREDS],
        fragment[NEXT_VF_PREDS],
        fragment[Columns.TERMINATEDS],
        fragment[Columns.TRUNCATEDS],
        gamma=gamma,
        lambda_=lambda_,
    )


def _standardized(advantages: np.ndarray) -> np.ndarray:
    return ((advantages - advantages.mean()) / max(float(advantages.std()), 1e-4)).astype(np.float32)


def postprocess_fragments(fragments, *, gamma: float, lambda_: float, standardize: bool) -> Dict[str, np.ndarray]:
    """GAE on each time-major fragment, then one flat training batch (advantages standardised over all of it)."""
    pieces = []
    for fragment in fragments:
        advantages, targets = _gae_of(fragment, gamma, lambda_)
        flat = {k: _flatten_time_major(v) for k, v in fragment.items() if k in _TRAIN_COLUMNS}
        flat[Columns.ADVANTAGES] = _flatten_time_major(advantages)
        flat[Columns.VALUE_TARGETS] = _flatten_time_major(targets)
        pieces.append(flat)
    batch = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    if standardize:
        batch[Columns.ADVANTAGES] = _standardized(batch[Columns.ADVANTAGES])
    return batch


_TRAIN_COLUMNS = (Columns.OBS, Columns.ACTIONS, Columns.ACTION_LOGP, Columns.ACTION_DIST_INPUTS, Columns.VF_PREDS)


def _flatten_time_major(array: np.ndarray) -> np.ndarray:
    # (T, num_envs, ...) -> (num_envs * T, ...), env-major so each env's steps stay contiguous.
    array = np.asarray(array)
    return np.swapaxes(array, 0, 1).reshape(-1, *array.shape[2:])
