"""What an update accepts, checkable without a Learner: batch specs per module, and timesteps.

The LearnerGroup validates every batch in the driver with these (so no learner starts a collective
that another skips); :meth:`~dlearner.learner.Learner.update` validates with the same rules.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from dlearner.batch import ModuleBatchSpec, MultiBatch, default_allowed_columns
from dlearner.columns import TIMESTEP_KEY
from dlearner.rl_module import MultiRLModuleSpec
from dlearner.validation import is_real


def batch_specs_for(learner_class: type, module_spec: MultiRLModuleSpec) -> Dict[str, ModuleBatchSpec]:
    """Batch specs from a learner class and module specs, so the driver can validate without a Learner."""
    allowed = default_allowed_columns(getattr(learner_class, "optional_columns", ()) + tuple(learner_class.required_columns))
    specs = {}
    for mid, spec in module_spec.rl_module_specs.items():
        try:
            dist_dim = _dist_cls(spec.action_space).required_input_dim(spec.action_space)
        except ValueError:
            dist_dim = None
        specs[mid] = ModuleBatchSpec(
            observation_space=spec.observation_space,
            action_space=spec.action_space,
            action_dist_inputs_dim=dist_dim,
            required_columns=tuple(learner_class.required_columns),
            allowed_columns=allowed,
            check_columns=getattr(learner_class, "check_module_batch", None),
        )
    return specs


def _dist_cls(action_space):
    from dlearner.rl_module import _action_dist_cls

    return _action_dist_cls(action_space)


def validate_timesteps(timesteps: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``timesteps`` as a new dict (``{}`` for ``None``); raises unless every value is a finite number >= 0.

    ``TypeError`` when ``timesteps`` is not a mapping, ``ValueError`` naming the key of a bad value.
    """
    if timesteps is None:
        return {}
    if not isinstance(timesteps, Mapping):
        raise TypeError(f"timesteps must be a dict such as {{'{TIMESTEP_KEY}': 1000}}, got {type(timesteps).__name__}.")
    for key, value in timesteps.items():
        if not is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"timesteps[{key!r}] must be a non-negative number, got {value!r}.")
    return dict(timesteps)


def trainable_modules(batch: MultiBatch, config: Any) -> MultiBatch:
    """``batch`` without the modules ``config.policies_to_train`` leaves out (they act, but never change).

    ``ValueError`` if no module is left: an update with nothing to train is a mistake, never a no-op.
    """
    from dlearner.multi_agent.mapping import modules_to_train

    policies_to_train = getattr(config, "policies_to_train", None)
    if policies_to_train is None:
        return batch
    keep = modules_to_train(policies_to_train, list(batch), batch)
    if not keep:
        raise ValueError(
            f"None of the batch's modules {sorted(batch)} is in policies_to_train; add one to "
            ".multi_agent(policies_to_train=...), or leave the batch of frozen modules out."
        )
    return {mid: batch[mid] for mid in keep}
