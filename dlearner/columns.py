"""Batch column names and the constants of the public contract.

The strings are RLlib's, so batches and results read the same in both libraries.
"""

from __future__ import annotations

DEFAULT_MODULE_ID = "default_policy"
"""Module id of a single-module batch given as a flat ``{column: array}`` mapping."""

ALL_MODULES = "__all_modules__"
"""Result-dict key for metrics that belong to the whole update, not one module."""

COMPONENT_LEARNER = "learner"
COMPONENT_RL_MODULE = "rl_module"
COMPONENT_OPTIMIZER = "optimizer"

DEFAULT_OPTIMIZER = "default_optimizer"
"""Name of the optimizer that :meth:`Learner.configure_optimizers_for_module` registers by default."""

TIMESTEP_KEY = "num_env_steps_sampled_lifetime"
"""Key of the ``timesteps`` dict that drives learning-rate schedules (the env steps sampled so far).

Example::

    learner.update(batch, timesteps={TIMESTEP_KEY: 4000})
"""


class Columns:
    """Column names of a training batch.

    Example::

        batch = {Columns.OBS: obs, Columns.ACTIONS: actions}
    """

    OBS = "obs"
    NEXT_OBS = "new_obs"
    ACTIONS = "actions"
    REWARDS = "rewards"
    TERMINATEDS = "terminateds"
    TRUNCATEDS = "truncateds"
    ACTION_DIST_INPUTS = "action_dist_inputs"
    ACTION_LOGP = "action_logp"
    VF_PREDS = "vf_preds"
    ADVANTAGES = "advantages"
    VALUE_TARGETS = "value_targets"
    EPS_ID = "eps_id"
    LOSS_MASK = "loss_mask"


ALL_COLUMNS = frozenset(v for k, v in vars(Columns).items() if k.isupper())
