"""The Learner: one copy of the RL modules, their optimizers and the loss, and the update loop.

This file holds what every learner does: build the modules on a device, register optimizers, run
an update (validate, shuffle into minibatches, call the hooks and the gradient pipeline, reduce
metrics), add and remove modules. The state methods come from :mod:`.state`, snapshots and
rollback from :mod:`.rollback`; :class:`~dlearner.learner.TorchLearner` fills in the gradient steps.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dlearner.batch import (
    ModuleBatchSpec,
    MultiBatch,
    ShardInfo,
    minibatch_plan,
    num_steps_per_epoch,
    validate_batch,
)
from dlearner.columns import ALL_MODULES, DEFAULT_OPTIMIZER, TIMESTEP_KEY, Columns
from dlearner.learner.inputs import batch_specs_for, trainable_modules, validate_timesteps
from dlearner.learner.optimizers import RegisteredOptimizer, get_lr, set_lr
from dlearner.learner.override import override_point
from dlearner.learner.rollback import RollbackMixin
from dlearner.learner.state import StateMixin
from dlearner.metrics import MetricsLogger
from dlearner.rl_module import MultiRLModule, MultiRLModuleSpec, RLModule, RLModuleSpec, validate_module_id
from dlearner.schedules import PiecewiseSchedule, ScheduleLike
from dlearner.validation import is_int

#: Gradients by parameter, as the gradient pipeline passes them on.
ParamDict = Dict[torch.nn.Parameter, torch.Tensor]


class Learner(StateMixin, RollbackMixin):
    """Base class of all learners (see :class:`TorchLearner` for the one to subclass).

    Build through a config (``config.build_learner(env=env)``) and call :meth:`build` before anything else.
    The methods marked ``@override_point`` are the ones a custom learner overrides.
    """

    #: Columns every batch of a module must have; algorithms extend this.
    required_columns: Tuple[str, ...] = (Columns.OBS, Columns.ACTIONS)
    #: Extra columns (beyond :class:`~dlearner.columns.Columns`) a batch may carry for this learner.
    optional_columns: Tuple[str, ...] = ()

    def __init__(
        self,
        *,
        config: Any,
        module_spec: Optional[Union[RLModuleSpec, MultiRLModuleSpec]] = None,
        module: Optional[MultiRLModule] = None,
        device: Optional[Union[str, torch.device]] = None,
    ):
        from dlearner.columns import DEFAULT_MODULE_ID

        self.config = config
        if isinstance(module_spec, RLModuleSpec):
            module_spec = MultiRLModuleSpec(rl_module_specs={DEFAULT_MODULE_ID: module_spec})
        if module_spec is None and module is None:
            raise ValueError("A Learner needs a module_spec or a module; build it with config.build_learner(env=...).")
        self._module_spec = module_spec
        self._module: Optional[MultiRLModule] = module
        self._device = torch.device(device) if device is not None else None
        self._optimizers: Dict[Tuple[str, str], RegisteredOptimizer] = {}
        self._collective = None
        self._built = False
        self.metrics = MetricsLogger()
        self._rng = np.random.default_rng(getattr(config, "seed", None))
        self._counters = {"num_updates": 0, "num_gradient_steps": 0, "num_env_steps_trained_lifetime": 0}
        self._last_timestep = 0
        self._snapshot_owner = object()  # what a snapshot remembers of its learner (ids can be reused)
        self._snapshot_layout: Any = None  # reused by update()'s own snapshots (see RollbackMixin._snapshot)
        self._module_state_key: Any = None
        self._batch_specs: Tuple[Any, Dict[str, ModuleBatchSpec]] = (None, {})  # (modules they were made for, specs)
        self._module_state_items: List[Tuple[str, str, torch.Tensor]] = []
        self._step_position = (0, 0)  # (gradient step, of steps) of the running update, for error messages
        self._step_metrics_logged = False  # whether log_step_metrics ran in the running update
        self._step_losses: List[Tuple[Tuple[int, int], str, torch.Tensor]] = []  # this update's losses, checked at its end
        # Inside updates_as_one(): the modules its updates trained, checked (and rolled back) together at its end.
        self._deferred_modules: Optional[set] = None

    # ---------------------------------------------------------------------------------- building
    @override_point
    def build(self) -> None:
        """Build the modules on this learner's device and configure their optimizers."""
        if self._built:
            return
        self._set_torch_threads()
        if self._device is None:
            self._device = self._default_device()
        if self._module is None:
            seed = getattr(self.config, "seed", None)
            if seed is None:
                self._module = self._module_spec.build()
            else:
                # Seeded initialisation without touching the caller's global torch generator.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    self._module = self._module_spec.build()
        self._module.to(self._device)
        self._built = True
        try:
            self.configure_optimizers()
        except Exception:
            self._built = False
            self._optimizers.clear()
            raise

    def _set_torch_threads(self) -> None:
        # One thread per learner unless asked: torch's default (all cores) collapses on shared machines.
        threads = getattr(self.config, "torch_num_threads", None) or getattr(self.config, "num_cpus_per_learner", 1)
        torch.set_num_threads(max(1, int(threads)))

    def _default_device(self) -> torch.device:
        gpus = getattr(self.config, "num_gpus_per_learner", 0) or 0
        if gpus > 0:
            if not torch.cuda.is_available():
                raise ValueError(
                    f"num_gpus_per_learner={gpus} but torch sees no CUDA device here; set num_gpus_per_learner=0 "
                    "or run on a machine with a GPU."
                )
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _check_is_built(self) -> None:
        if not self._built:
            raise RuntimeError("Call learner.build() before using the Learner.")

    @property
    def module(self) -> MultiRLModule:
        """The :class:`MultiRLModule` this learner trains; ``learner.module[module_id]`` is one RLModule."""
        self._check_is_built()
        return self._module

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def module_spec(self) -> MultiRLModuleSpec:
        """Specs of the current modules (kept in step with add_module/remove_module)."""
        return MultiRLModuleSpec(rl_module_specs={mid: m.get_spec() for mid, m in self.module.items()})

    def set_collective(self, collective) -> None:
        """Attach the collective used to average gradients and metrics with the other learners (or ``None``)."""
        self._collective = collective

    # ------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> None:
        """Call :meth:`configure_optimizers_for_module` for every module."""
        for module_id in self.module.keys():
            self.configure_optimizers_for_module(module_id=module_id, config=self.config)

    @override_point
    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        """Create the module's optimizers and :meth:`register_optimizer` them. Default: one Adam."""
        raise NotImplementedError

    def register_optimizer(
        self,
        *,
        module_id: str,
        optimizer_name: str = DEFAULT_OPTIMIZER,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        lr_or_lr_schedule: Optional[ScheduleLike] = None,
    ) -> None:
        """Register ``optimizer`` over ``params`` of ``module_id``; a module may have several optimizers.

        ``lr_or_lr_schedule`` is a float or a piecewise-linear ``[[timestep, lr], ...]`` schedule
        over ``timesteps["num_env_steps_sampled_lifetime"]``.
        """
        if module_id not in self._module:
            raise ValueError(f"Cannot register an optimizer for unknown module {module_id!r}.")
        if not isinstance(optimizer_name, str) or not optimizer_name:
            raise ValueError(f"optimizer_name must be a non-empty string, got {optimizer_name!r}.")
        if (module_id, optimizer_name) in self._optimizers:
            raise ValueError(f"Module {module_id!r} already has an optimizer named {optimizer_name!r}.")
        params = list(params)
        own = {id(p) for p in self._module[module_id].parameters()}
        if not params or any(id(p) not in own for p in params):
            raise ValueError(f"Optimizer {optimizer_name!r} must get a non-empty list of parameters of module {module_id!r}.")
        taken = {id(p) for reg in self._optimizers.values() for p in reg.params}
        if any(id(p) in taken for p in params):
            raise ValueError(f"Some parameters of optimizer {optimizer_name!r} already belong to another optimizer.")
        schedule = None
        if lr_or_lr_schedule is not None:
            schedule = PiecewiseSchedule(lr_or_lr_schedule, name=f"learning rate of {optimizer_name!r}")
            set_lr(optimizer, schedule.value(self._last_timestep))
        self._optimizers[(module_id, optimizer_name)] = RegisteredOptimizer(
            module_id, optimizer_name, optimizer, params, schedule
        )

    def get_optimizer(self, module_id: str = None, optimizer_name: str = DEFAULT_OPTIMIZER) -> torch.optim.Optimizer:
        """The optimizer registered as ``optimizer_name`` for ``module_id``."""
        from dlearner.columns import DEFAULT_MODULE_ID

        module_id = DEFAULT_MODULE_ID if module_id is None else module_id
        try:
            return self._optimizers[(module_id, optimizer_name)].optimizer
        except KeyError:
            names = [n for (m, n) in self._optimizers if m == module_id]
            raise ValueError(f"No optimizer {optimizer_name!r} for module {module_id!r}; it has {names}.") from None

    def get_optimizers_for_module(self, module_id: str) -> List[Tuple[str, torch.optim.Optimizer]]:
        """``[(name, optimizer), ...]`` for ``module_id``."""
        return [(reg.name, reg.optimizer) for reg in self._optimizers.values() if reg.module_id == module_id]

    @override_point
    def get_parameters(self, module: RLModule) -> List[torch.nn.Parameter]:
        """The trainable parameters of ``module``."""
        return [p for p in module.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------- update
    def batch_specs(self) -> Dict[str, ModuleBatchSpec]:
        """What a valid batch looks like for each module (used by :meth:`update` and the LearnerGroup)."""
        # Kept while the learner has the same modules: making them (a spec per module) cost a small
        # update ~0.1-0.25 ms (benchmarks/learner_update.py, 32 rows).
        modules = tuple(self._module.items())  # the modules themselves: compared by identity
        if self._batch_specs[0] != modules:
            self._batch_specs = (modules, batch_specs_for(type(self), self.module_spec))
        return dict(self._batch_specs[1])

    def update(
        self,
        batch: Mapping[str, Any],
        timesteps: Optional[Mapping[str, Any]] = None,
        *,
        num_epochs: Optional[int] = None,
        minibatch_size: Optional[int] = None,
        shuffle: bool = True,
        shard: Optional[ShardInfo] = None,
    ) -> Dict[str, Dict[str, float]]:
        """Train on ``batch``: ``num_epochs`` shuffled passes of ``minibatch_size`` minibatches.

        Returns ``{module_id: {metric: float}, ALL_MODULES: {...}}``. A bad batch raises ``ValueError``
        (``TypeError`` for wrong types) before anything changes. An update that fails later for any
        reason (a loss, gradient, weight or optimizer value that turns non-finite raises
        :class:`NonFiniteUpdateError`, a ``ValueError``; a hook or a collective may raise anything)
        leaves the learner exactly as it was before the call: it rolls back to a
        :meth:`take_snapshot` taken at the start. With several learners every one rejects the same
        gradient step, so they stay identical. ``shard`` is set by the LearnerGroup when ``batch`` is
        one shard of a larger batch; ``minibatch_size`` then still counts rows of the whole batch.
        """
        self._check_is_built()
        if shard is not None and isinstance(batch, Mapping) and len(batch) == 0:
            # A shard may be empty (fewer rows than learners): this learner still takes part in
            # every collective of the update, or the others would wait for it forever.
            local: MultiBatch = {}
        elif shard is not None and shard.validated:
            local = dict(batch)  # checked by validate_batch where it was made (see ShardInfo)
        else:
            local = validate_batch(batch, self.batch_specs())
            if shard is None:  # a LearnerGroup applied policies_to_train before sharding
                local = trainable_modules(local, self.config)
        timesteps = validate_timesteps(timesteps)
        num_epochs = self._resolve(num_epochs, "num_epochs", 1)
        minibatch_size = self._resolve(minibatch_size, "minibatch_size", None)
        layout = shard if shard is not None else ShardInfo.whole(local)
        self._check_layout(local, layout)
        if self._collective is None and shard is not None:
            local_rows = {m: len(next(iter(cols.values()))) for m, cols in local.items()}
            if local_rows != dict(layout.global_rows):
                raise ValueError("A shard of a larger batch needs a collective to train with the other shards.")

        tensors = self._to_tensors(local)
        # Everything below may fail (a non-finite loss or gradient, a hook, a collective): the learner
        # then goes back to this snapshot, so a failed update changes nothing. Inside updates_as_one()
        # the snapshot before the first of its updates serves them all.
        deferred = self._deferred_modules is not None
        snapshot = None if deferred else self._snapshot(reuse_buffers=True)
        if not deferred:
            self._step_losses = []
        self._step_metrics_logged = False
        try:
            self._last_timestep = int(timesteps.get(TIMESTEP_KEY, self._last_timestep))
            self._apply_lr_schedules(self._last_timestep)
            self.before_gradient_based_update(timesteps=timesteps)
            local_rows = sum(len(next(iter(cols.values()))) for cols in local.values())
            self.metrics.log_value((ALL_MODULES, "num_env_steps_trained"), local_rows * num_epochs, reduce="sum")
            for mid in layout.global_rows:
                # Logged for every module of the global batch, even one missing from this shard, so all
                # learners reduce the same metric keys.
                rows = len(next(iter(local[mid].values()))) if mid in local else 0
                self.metrics.log_value((mid, "num_module_steps_trained"), rows * num_epochs, reduce="sum")
            rng = self._rng if shuffle else None
            num_steps = num_epochs * num_steps_per_epoch(layout.global_rows, minibatch_size)
            for i, step in enumerate(minibatch_plan(layout.global_rows, minibatch_size, num_epochs, rng)):
                self._step_position = (i + 1, num_steps)
                self._gradient_step(tensors, step, layout, last=i == num_steps - 1)
            self._log_step_metrics_once()  # with several learners, the last step's all-reduce did already
            self.metrics.all_reduce(self._collective)
            self.after_gradient_based_update(timesteps=timesteps)
            if deferred:
                self._deferred_modules.update(layout.global_rows)
            else:
                self._check_finite_after_update(layout.global_rows)
            for reg in self._optimizers.values():
                if reg.module_id in layout.global_rows:
                    self.metrics.log_value((reg.module_id, f"{reg.name}_learning_rate"), get_lr(reg.optimizer), reduce="last")
            self._counters["num_updates"] += 1
            self._counters["num_env_steps_trained_lifetime"] += sum(layout.global_rows.values()) * num_epochs
            results = self.metrics.reduce()
            results.setdefault(ALL_MODULES, {})["num_env_steps_trained_lifetime"] = self._counters[
                "num_env_steps_trained_lifetime"
            ]
            return _plain_numbers(results)
        except BaseException:
            self.metrics.clear()
            if snapshot is not None:
                self.restore_snapshot(snapshot)
            raise
        finally:
            if not deferred:
                self._step_losses = []

    def _resolve(self, value, name: str, default):
        if value is None:
            value = getattr(self.config, name, default)
        if value is None:
            return None
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int (or None), got {value!r}.")
        return int(value)

    def _check_layout(self, local: MultiBatch, layout: ShardInfo) -> None:
        for mid, cols in local.items():
            if mid not in layout.global_rows:
                raise ValueError(f"Module {mid!r} is in the shard but not in the shard layout.")
            rows = len(next(iter(cols.values())))
            if layout.row_offsets[mid] + rows > layout.global_rows[mid]:
                raise ValueError(f"Shard of module {mid!r} runs past the global batch ({layout}).")
        unknown = sorted(set(layout.global_rows) - set(self._module.keys()))
        if unknown:
            raise ValueError(f"The batch names unknown module(s) {unknown}; this learner has {sorted(self._module.keys())}.")

    def _to_tensors(self, batch: MultiBatch) -> Dict[str, Any]:
        raise NotImplementedError

    def _gradient_step(self, tensors, step: Mapping[str, np.ndarray], layout: ShardInfo, last: bool = False) -> None:
        raise NotImplementedError

    def _apply_lr_schedules(self, timestep: int) -> None:
        for reg in self._optimizers.values():
            if reg.schedule is not None:
                set_lr(reg.optimizer, reg.schedule.value(timestep))

    # Hooks and the gradient pipeline -----------------------------------------------------------
    @override_point
    def before_gradient_based_update(self, *, timesteps: Mapping[str, Any]) -> None:
        """Non-gradient updates before the gradient steps of an update (e.g. adding noise)."""

    @override_point
    def log_step_metrics(self) -> None:
        """Log, once per update, statistics computed from all of its gradient steps at once (PPO's
        clip fraction and explained variance, from what its loss left with ``self.metrics.stash``).

        Called after the last gradient step's loss and before the metrics are reduced over learners;
        call ``super()``. What is logged here counts like anything logged during the steps.
        """

    def _log_step_metrics_once(self) -> None:
        if not self._step_metrics_logged:
            self._step_metrics_logged = True
            self.log_step_metrics()

    @override_point
    def after_gradient_based_update(self, *, timesteps: Mapping[str, Any]) -> None:
        """Non-gradient updates after them (e.g. polyak target updates, KL coefficients).

        Metrics of the gradient steps are already reduced over all learners here:
        ``self.metrics.peek((module_id, name))`` gives the global value.
        """

    def compute_losses(self, *, fwd_out: Mapping[str, Any], batch: Mapping[str, Any]) -> Dict[str, Any]:
        """``{module_id: loss}`` by calling :meth:`compute_loss_for_module` for each module in ``batch``."""
        return {
            mid: self.compute_loss_for_module(module_id=mid, config=self.config, batch=batch[mid], fwd_out=fwd_out[mid])
            for mid in batch
        }

    @override_point
    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: Mapping[str, Any], fwd_out: Mapping[str, Any]):
        """The loss tensor of one module on one minibatch (a mean over its rows). Algorithms override this."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss_for_module().")

    @override_point
    def compute_gradients(self, loss_per_module: Mapping[str, Any], **kwargs) -> ParamDict:
        raise NotImplementedError

    @override_point
    def postprocess_gradients(self, gradients: ParamDict) -> ParamDict:
        """Clip the gradients of every module in the step (see :meth:`postprocess_gradients_for_module`)."""
        modules = {reg.module_id for reg in self._optimizers.values()}
        for mid in sorted(modules):
            gradients = self.postprocess_gradients_for_module(module_id=mid, config=self.config, module_gradients_dict=gradients)
        return gradients

    @override_point
    def postprocess_gradients_for_module(self, *, module_id: str, config: Any, module_gradients_dict: ParamDict) -> ParamDict:
        raise NotImplementedError

    @override_point
    def apply_gradients(self, gradients: ParamDict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ modules
    def add_module(self, *, module_id: str, module_spec: RLModuleSpec, config_overrides: Any = None) -> MultiRLModuleSpec:
        """Add a module (built from ``module_spec``) and configure its optimizers; returns the new specs."""
        self._check_is_built()
        validate_module_id(module_id)
        if module_id in self._module:
            raise ValueError(f"Module {module_id!r} already exists; remove it first or pick another id.")
        module = module_spec.build().to(self._device)
        self._module.add_module(module_id, module)
        try:
            self.configure_optimizers_for_module(module_id=module_id, config=self.config)
        except Exception:
            self._drop_module(module_id)
            raise
        return self.module_spec

    def remove_module(self, module_id: str) -> MultiRLModuleSpec:
        """Remove a module and its optimizers; returns the remaining specs."""
        self._check_is_built()
        if module_id not in self._module:
            raise ValueError(f"Unknown module {module_id!r}; modules are {sorted(self._module.keys())}.")
        self._drop_module(module_id)
        return self.module_spec

    def _drop_module(self, module_id: str) -> None:
        for key in [k for k in self._optimizers if k[0] == module_id]:
            del self._optimizers[key]
        if module_id in self._module:
            self._module.remove_module(module_id)

    # ---------------------------------------------------------------------------- checkpoints
    def save_to_path(self, path, *, storage_options: Optional[dict] = None) -> str:
        """Write the full state as a Zarr v3 checkpoint at ``path`` (a directory or fsspec URL); returns it."""
        from dlearner.checkpoint import objects

        return objects.save_learner(self, path, storage_options=storage_options)

    def restore_from_path(self, path, *, storage_options: Optional[dict] = None) -> None:
        """Restore the state written by :meth:`save_to_path` (or a LearnerGroup's or Algorithm's)."""
        from dlearner.checkpoint import objects

        objects.restore_learner(self, path, storage_options=storage_options)


def _plain_numbers(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    # The result dict's values as Python float, and int for whole counts ("num_...").
    out = {}
    for mid, metrics in results.items():
        out[mid] = {}
        for name, value in metrics.items():
            value = float(value) if not isinstance(value, int) else value
            if isinstance(value, float) and value.is_integer() and name.startswith("num_"):
                value = int(value)
            out[mid][name] = value
    return out
