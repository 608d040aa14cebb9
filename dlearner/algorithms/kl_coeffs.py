"""The adaptive KL coefficients of PPO and APPO: one per module, kept as learner state.

Both algorithms store them at ``learner_state/curr_kl_coeffs`` (``{module_id: float}``), so they
are checkpointed, restored exactly and the same on every learner (they change only from
all-reduced metrics). Each algorithm decides *when* to adapt them (PPO after every update, APPO
with every target-network update); the rule itself is
:func:`~dlearner.algorithms.losses.adapted_kl_coeff`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

from dlearner.algorithms.losses import adapted_kl_coeff
from dlearner.validation import is_real

__all__ = ["KL_COEFFS_STATE", "AdaptiveKLCoeffs"]

#: Key of the KL coefficients in the learner state.
KL_COEFFS_STATE = "curr_kl_coeffs"


class AdaptiveKLCoeffs:
    """Mixin for a Learner with a KL penalty: ``self.curr_kl_coeffs``, one coefficient per module.

    Put it before the Learner base, e.g. ``class PPOTorchLearner(AdaptiveKLCoeffs, TorchLearner)``.
    Coefficients start at ``config.kl_coeff`` (also for modules added later) and move towards
    ``config.kl_target`` through :meth:`adapt_kl_coeff`.
    """

    #: Where an earlier version of the subclass kept the coefficients inside its learner state
    #: (a path of keys); states written there are still accepted, the new path taking precedence.
    legacy_kl_coeffs_path: Tuple[str, ...] = ()

    def build(self) -> None:
        super().build()
        self.curr_kl_coeffs: Dict[str, float] = {mid: float(self.config.kl_coeff) for mid in self.module.keys()}

    def adapt_kl_coeff(self, module_id: str, mean_kl: float) -> None:
        """Adapt ``module_id``'s coefficient from the mean KL of the update (over all learners' rows)."""
        self.curr_kl_coeffs[module_id] = adapted_kl_coeff(self.curr_kl_coeffs[module_id], mean_kl, self.config.kl_target)

    def add_module(self, *, module_id, module_spec, config_overrides=None):
        specs = super().add_module(module_id=module_id, module_spec=module_spec, config_overrides=config_overrides)
        self.curr_kl_coeffs[module_id] = float(self.config.kl_coeff)
        return specs

    def remove_module(self, module_id):
        specs = super().remove_module(module_id)
        self.curr_kl_coeffs.pop(module_id, None)
        return specs

    # -- state ----------------------------------------------------------------------------------
    def get_learner_state(self) -> Dict[str, Any]:
        state = super().get_learner_state()
        state[KL_COEFFS_STATE] = dict(self.curr_kl_coeffs)
        return state

    def _check_learner_state(self, state) -> None:
        super()._check_learner_state(state)
        found = self._stored_kl_coeffs(state)
        if found is None:
            return
        where, coeffs = found
        if not isinstance(coeffs, Mapping):
            raise ValueError(f"{where} must be a dict of module ids to numbers, got {type(coeffs).__name__}.")
        unknown = sorted(set(coeffs) - set(self.curr_kl_coeffs))
        if unknown:
            raise ValueError(f"{where} names module(s) {unknown} this learner lacks.")
        for mid, value in coeffs.items():
            if not (is_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{where}/{mid} must be a finite number >= 0, got {value!r:.100}.")

    def set_learner_state(self, state) -> None:
        super().set_learner_state(state)
        found = self._stored_kl_coeffs(state)
        if found is not None:
            self.curr_kl_coeffs.update({mid: float(v) for mid, v in found[1].items()})

    def _stored_kl_coeffs(self, state: Mapping[str, Any]) -> Optional[Tuple[str, Any]]:
        """``(path for messages, coefficients)`` from ``state``'s current or legacy path; ``None`` if neither."""
        if KL_COEFFS_STATE in state:
            return f"learner_state/{KL_COEFFS_STATE}", state[KL_COEFFS_STATE]
        if not self.legacy_kl_coeffs_path:
            return None
        node: Any = state
        for key in self.legacy_kl_coeffs_path:
            if not isinstance(node, Mapping) or key not in node:
                return None  # a malformed enclosing section is the subclass's own check to refuse
            node = node[key]
        return "learner_state/" + "/".join(self.legacy_kl_coeffs_path), node
