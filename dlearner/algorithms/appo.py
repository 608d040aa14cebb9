"""APPO: IMPALA's asynchronous loop with PPO's clipped surrogate (as in RLlib's APPO).

The importance ratio of PPO's surrogate is taken against a **target network**, a lagged copy of
the module that is updated every ``target_network_update_freq`` updates (polyak averaging with
``tau``; ``tau=1`` copies). V-trace corrects from the behaviour policy ``mu`` that sampled to the
target network's policy ``pi_target``. The loss on one minibatch of rollout fragments::

    vs, A     = vtrace(log pi_target(a|x), log mu(a|x), discounts, rewards, V(x), V(x_T))   # no gradient
    ratio     = pi(a|x) / pi_target(a|x)        # via mu, with mu / pi_target clipped at 2 as RLlib does
    L_clip    = -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))                   # eps = clip_param
    L_vf      = 0.5 * mean((V(x) - vs)^2)
    L_entropy = -mean(H(pi(.|x)))
    L_kl      = mean(KL(pi_target || pi))                                                  # use_kl_loss only
    loss      = L_clip + vf_loss_coeff * L_vf + entropy_coeff * L_entropy + kl_coeff * L_kl

Every mean is over the rows ``loss_mask`` keeps when the batch has one (multi-agent padding rows;
see :mod:`dlearner.algorithms.impala`).

Only modules that an update trained since the last target update get their target network
updated, so a module ``policies_to_train`` leaves out keeps its target bit for bit.

The target networks and their update counters are learner state: numpy arrays and numbers in
``get_state()["learner_state"]["appo"]``; the KL coefficients sit where PPO's do, in
``get_state()["learner_state"]["curr_kl_coeffs"]`` (earlier versions kept them in ``appo``, which a
restore still accepts). All are checkpointed and restored exactly, and the same on every learner
(they change only from identical weights and all-reduced metrics).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Set

import torch

from dlearner.algorithms.impala import IMPALA, IMPALAConfig, IMPALATorchLearner, vtrace
from dlearner.algorithms.kl_coeffs import KL_COEFFS_STATE, AdaptiveKLCoeffs
from dlearner.algorithms.losses import clipped_surrogate_loss
from dlearner.columns import Columns
from dlearner.learner import check_weights
from dlearner.validation import NotProvided, apply_checks, boolean, is_int, non_negative, positive, positive_int

#: Key of APPO's part of the learner state.
APPO_STATE = "appo"


class APPOTorchLearner(AdaptiveKLCoeffs, IMPALATorchLearner):
    """APPO's loss (see the module docstring) and its target networks."""

    #: APPO kept its KL coefficients in its own section before they moved next to PPO's.
    legacy_kl_coeffs_path = (APPO_STATE, KL_COEFFS_STATE)

    def build(self) -> None:
        super().build()
        self.target_networks: Dict[str, torch.nn.Module] = {mid: _target_copy(m) for mid, m in self.module.items()}
        self.num_updates_since_target_update = 0
        self.num_target_updates = 0
        # Modules some update trained since the last target update: only their targets move (a module
        # policies_to_train leaves out keeps its target network bit for bit, as its weights).
        self.modules_trained_since_target_update: Set[str] = set()

    # -- the loss ---------------------------------------------------------------------------------
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        """APPO's loss on whole fragments, term by term as in the module docstring."""
        dist_cls = self.module[module_id].get_train_action_dist_cls()
        dist = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        with torch.no_grad():
            target_out = self.target_networks[module_id].forward_inference({Columns.OBS: batch[Columns.OBS]})
        target_dist = dist_cls.from_logits(target_out[Columns.ACTION_DIST_INPUTS])

        actions = batch[Columns.ACTIONS]
        logp = self._time_major(dist.logp(actions))
        target_logp = self._time_major(target_dist.logp(actions))
        behaviour_logp = self._time_major(batch[Columns.ACTION_LOGP])
        values = self._time_major(fwd_out[Columns.VF_PREDS])
        discounts, rewards, bootstrap_value = self.vtrace_inputs(batch)

        # V-trace from the behaviour policy mu to the target network's policy.
        vs, advantages = vtrace(
            target_logp,
            behaviour_logp,
            discounts,
            rewards,
            values,
            bootstrap_value,
            clip_rho_threshold=config.vtrace_clip_rho_threshold,
            clip_pg_rho_threshold=config.vtrace_clip_pg_rho_threshold,
        )

        # ratio = pi / pi_target, written through mu so the possibly large mu / pi_target can be clipped.
        is_ratio = torch.clamp(torch.exp(behaviour_logp - target_logp), 0.0, 2.0)
        ratio = is_ratio * torch.exp(logp - behaviour_logp)
        time_major_mean, flat_mean = self.row_means(batch)  # padding rows (loss_mask False) count nowhere
        policy_loss = clipped_surrogate_loss(ratio, advantages, config.clip_param, time_major_mean)
        vf_loss = 0.5 * time_major_mean(torch.pow(values - vs, 2.0))
        entropy = flat_mean(dist.entropy())
        total_loss = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * entropy

        if config.use_kl_loss:
            mean_kl = flat_mean(target_dist.kl(dist))
            total_loss = total_loss + self.curr_kl_coeffs[module_id] * mean_kl
            self.metrics.log_value((module_id, "mean_kl_loss"), mean_kl)

        self.metrics.log_dict({"policy_loss": policy_loss, "vf_loss": vf_loss, "entropy": entropy}, module_id=module_id)
        return total_loss

    # -- the target networks --------------------------------------------------------------------
    def after_gradient_based_update(self, *, timesteps):
        """Every ``target_network_update_freq`` updates: polyak-update with ``tau`` the target networks
        of the modules trained since the last target update, and adapt the KL coefficients from the
        mean KL over all learners' rows. Results report both for the modules of this update."""
        super().after_gradient_based_update(timesteps=timesteps)
        in_update = [mid for mid in self.module.keys() if self._in_this_update(mid)]
        self.modules_trained_since_target_update.update(in_update)
        self.num_updates_since_target_update += 1
        if self.num_updates_since_target_update >= self.config.target_network_update_freq:
            tau = self.config.tau
            with torch.no_grad():
                for mid, target in self.target_networks.items():
                    if mid not in self.modules_trained_since_target_update:
                        continue  # unchanged weights: t * (1 - tau) + t * tau could still move it by rounding
                    for target_param, param in zip(target.parameters(), self.module[mid].parameters()):
                        target_param.mul_(1.0 - tau).add_(param, alpha=tau)
            self.modules_trained_since_target_update = set()
            self.num_updates_since_target_update = 0
            self.num_target_updates += 1
            if self.config.use_kl_loss:
                self._adapt_kl_coeffs()
        for mid in in_update:
            self.metrics.log_value((mid, "num_target_updates"), self.num_target_updates, reduce="last")
            if self.config.use_kl_loss:
                self.metrics.log_value((mid, "curr_kl_coeff"), self.curr_kl_coeffs[mid], reduce="last")

    def _in_this_update(self, module_id: str) -> bool:
        """Whether ``module_id`` has rows in this update's batch (every learner logs the row count of
        every module of the whole batch, so all learners agree)."""
        try:
            self.metrics.peek((module_id, "num_module_steps_trained"))
        except KeyError:
            return False
        return True

    def _adapt_kl_coeffs(self) -> None:
        for mid in self.module.keys():
            try:
                mean_kl = self.metrics.peek((mid, "mean_kl_loss"))
            except KeyError:
                continue  # the module was not in this update
            self.adapt_kl_coeff(mid, mean_kl)

    # -- modules --------------------------------------------------------------------------------
    def add_module(self, *, module_id, module_spec, config_overrides=None):
        specs = super().add_module(module_id=module_id, module_spec=module_spec, config_overrides=config_overrides)
        self.target_networks[module_id] = _target_copy(self.module[module_id])
        return specs

    def remove_module(self, module_id):
        specs = super().remove_module(module_id)
        self.target_networks.pop(module_id, None)
        self.modules_trained_since_target_update.discard(module_id)
        return specs

    # -- state ----------------------------------------------------------------------------------
    def get_learner_state(self) -> Dict[str, Any]:
        state = super().get_learner_state()
        state[APPO_STATE] = {
            "target_networks": {mid: net.get_state() for mid, net in self.target_networks.items()},
            "num_updates_since_target_update": self.num_updates_since_target_update,
            "num_target_updates": self.num_target_updates,
            "modules_trained_since_target_update": sorted(self.modules_trained_since_target_update),
        }
        return state

    def _check_learner_state(self, state) -> None:
        super()._check_learner_state(state)
        appo = state.get(APPO_STATE)
        if appo is None:
            return
        if not isinstance(appo, Mapping) or not isinstance(appo.get("target_networks"), Mapping):
            raise ValueError(f"learner_state/{APPO_STATE} must hold 'target_networks' as {{module_id: {{name: array}}}}.")
        for mid, params in appo["target_networks"].items():
            if mid not in self.target_networks:
                raise ValueError(f"The state has a target network for module {mid!r}, which this learner lacks.")
            if not isinstance(params, Mapping):
                raise ValueError(f"The target network of module {mid!r} must be a dict of parameter names.")
            check_weights(params, self.target_networks[mid], f"the target network of module {mid!r}")
        for name in ("num_updates_since_target_update", "num_target_updates"):
            value = appo.get(name, 0)
            if not is_int(value) or value < 0:
                raise ValueError(f"learner_state/{APPO_STATE}/{name} must be an int >= 0, got {value!r}.")
        trained = appo.get("modules_trained_since_target_update", [])
        if not isinstance(trained, (list, tuple)) or any(mid not in self.target_networks for mid in trained):
            raise ValueError(
                f"learner_state/{APPO_STATE}/modules_trained_since_target_update must list module ids of this "
                f"learner {sorted(self.target_networks)}, got {trained!r}."
            )

    def set_learner_state(self, state) -> None:
        super().set_learner_state(state)
        appo = state.get(APPO_STATE)
        if appo is None:
            return
        for mid, params in appo["target_networks"].items():
            self.target_networks[mid].set_state(params)
        self.num_updates_since_target_update = int(appo.get("num_updates_since_target_update", 0))
        self.num_target_updates = int(appo.get("num_target_updates", 0))
        # States saved before it was kept: the next target update moves the targets of the modules trained by then.
        self.modules_trained_since_target_update = set(appo.get("modules_trained_since_target_update", []))


def _target_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``module``: same weights now, changed only by the polyak update."""
    target = copy.deepcopy(module)
    for param in target.parameters():
        param.requires_grad_(False)
    target.eval()
    return target


class APPOConfig(IMPALAConfig):
    """Config of APPO: IMPALA's asynchronous loop with PPO's clipped surrogate against a target network.

    Example::

        algo = APPOConfig().environment("CartPole-v1").env_runners(num_env_runners=1).build_algo()
        while algo.train()["env_runners"]["episode_return_mean"] < 450:
            pass
    """

    default_learner_class = APPOTorchLearner
    algo_class_path = "dlearner.algorithms.appo.APPO"

    def __init__(self) -> None:
        super().__init__()
        self.clip_param = 0.4
        self.use_kl_loss = False
        self.kl_coeff = 1.0
        self.kl_target = 0.01
        self.target_network_update_freq = 2
        self.tau = 1.0

    def training(
        self,
        *,
        clip_param: float = NotProvided,
        use_kl_loss: bool = NotProvided,
        kl_coeff: float = NotProvided,
        kl_target: float = NotProvided,
        target_network_update_freq: int = NotProvided,
        tau: float = NotProvided,
        **kwargs,
    ) -> "APPOConfig":
        """APPO's settings plus everything :meth:`IMPALAConfig.training` takes.

        ``target_network_update_freq``: learner updates between target-network updates; ``tau`` in
        ``(0, 1]``: the polyak weight of the current network (1 copies it); ``use_kl_loss`` adds
        ``kl_coeff * KL(pi_target || pi)``, the coefficient adapted towards ``kl_target``.
        """
        super().training(**kwargs)
        apply_checks(
            self,
            {
                "use_kl_loss": (use_kl_loss, boolean),
                "tau": (tau, _polyak_weight),
                "clip_param": (clip_param, positive),
                "kl_coeff": (kl_coeff, non_negative),
                "kl_target": (kl_target, positive),
                "target_network_update_freq": (target_network_update_freq, positive_int),
            },
        )
        return self


def _polyak_weight(name: str, value: Any) -> float:
    weight = positive(name, value)
    if weight > 1:
        raise ValueError(f"{name} must be in (0, 1] (1 copies the network into the target), got {value!r}.")
    return weight


class APPO(IMPALA):
    """APPO's training step: the same asynchronous loop as :class:`~dlearner.algorithms.impala.IMPALA`."""
