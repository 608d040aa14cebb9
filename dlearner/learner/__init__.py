"""The Learner: one copy of the RL modules, their optimizers and the loss, and the update loop.

A Learner knows nothing about Dask. It runs in the driver (``num_learners=0``) or inside a Dask
actor that the :class:`~dlearner.learner_group.LearnerGroup` created; in the second case the group
hands it a :class:`~dlearner.collective.TorchCollective` and a :class:`~dlearner.batch.ShardInfo`
with each shard, and the Learner averages gradients with one all-reduce per gradient step.

Algorithms subclass :class:`TorchLearner` and override a few methods, the ones marked
:func:`override_point`::

    class BCTorchLearner(TorchLearner):
        def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
            dist_cls = self.module[module_id].get_train_action_dist_cls()
            dist = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
            return -torch.mean(dist.logp(batch[Columns.ACTIONS]))

The package, one idea per file:

* ``core.py``: :class:`Learner`, build, optimizers, the update loop and its hooks, add/remove module;
* ``torch_learner.py``: :class:`TorchLearner`, tensors, the gradient step, all-reduce, clipping;
* ``state.py``: ``get_state`` / ``set_state`` and their checks (:func:`check_weights`);
* ``rollback.py``: :class:`LearnerSnapshot`, snapshot and rollback, :class:`NonFiniteUpdateError`;
* ``optimizers.py``: registered optimizers, learning rates, optimizer state as numpy;
* ``inputs.py``: what an update accepts (:func:`batch_specs_for`, :func:`validate_timesteps`);
* ``override.py``: :func:`override_point`, the mark on the extension points.
"""

from dlearner.learner.core import Learner
from dlearner.learner.inputs import batch_specs_for, trainable_modules, validate_timesteps
from dlearner.learner.override import override_point
from dlearner.learner.rollback import LearnerSnapshot, NonFiniteUpdateError
from dlearner.learner.state import COMPONENT_LEARNER_STATE, check_weights
from dlearner.learner.torch_learner import TorchLearner

__all__ = [
    "COMPONENT_LEARNER_STATE",
    "Learner",
    "LearnerSnapshot",
    "NonFiniteUpdateError",
    "TorchLearner",
    "batch_specs_for",
    "check_weights",
    "override_point",
    "trainable_modules",
    "validate_timesteps",
]
