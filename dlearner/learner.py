"""The Learner: one copy of the RL modules, their optimizers and the loss, and the update loop.

A Learner knows nothing about Dask. It runs in the driver (``num_learners=0``) or inside a Dask
actor that the :class:`~dlearner.learner_group.LearnerGroup` created; in the second case the group
hands it a :class:`~dlearner.collective.TorchCollective` and a :class:`~dlearner.batch.ShardInfo`
with each shard, and the Learner averages gradients with one all-reduce per gradient step.

Algorithms subclass :class:`TorchLearner` and override a few methods::

    class BCTorchLearner(TorchLearner):
        def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
            dist_cls = self.module[module_id].get_train_action_dist_cls()
            dist = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
            return -torch.mean(dist.logp(batch[Columns.ACTIONS]))
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dlearner.backends.dask.devices import host_transfer
from dlearner.batch import (
    ModuleBatchSpec,
    MultiBatch,
    ShardInfo,
    default_allowed_columns,
    minibatch_plan,
    num_steps_per_epoch,
    validate_batch,
)
from dlearner.columns import (
    ALL_MODULES,
    COMPONENT_OPTIMIZER,
    COMPONENT_RL_MODULE,
    DEFAULT_OPTIMIZER,
    TIMESTEP_KEY,
    Columns,
)
from dlearner.metrics import MetricsLogger
from dlearner.rl_module import MultiRLModule, MultiRLModuleSpec, RLModule, RLModuleSpec, validate_module_id
from dlearner.schedules import PiecewiseSchedule, ScheduleLike

COMPONENT_LEARNER_STATE = "learner_state"
ParamDict = Dict[torch.nn.Parameter, torch.Tensor]


@dataclasses.dataclass
class _RegisteredOptimizer:
    module_id: str
    name: str
    optimizer: torch.optim.Optimizer
    params: List[torch.nn.Parameter]
    schedule: Optional[PiecewiseSchedule]

    @property
    def full_name(self) -> str:
        return f"{self.module_id}_{self.name}"


class _ModuleTensors(NamedTuple):
    """One module's columns of an update, on the learner's device."""

    rows: int
    columns: Dict[str, torch.Tensor]


class NonFiniteUpdateError(ValueError):
    """An update whose loss, gradients, weights or optimizer state turned non-finite (NaN or inf).

    Raised by :meth:`Learner.update` after the learner rolled back to its state before the call:
    nothing of the update was applied. The message names the module and what turned non-finite.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class _OptimizerSnapshot:
    params: Tuple[torch.nn.Parameter, ...]
    state: Dict[torch.nn.Parameter, Dict[str, Any]]
    groups: List[Dict[str, Any]]  # each param group's hyperparameters, without "params"


@dataclasses.dataclass(frozen=True, eq=False)
class LearnerSnapshot:
    """An in-memory copy of everything an update changes in one learner; see :meth:`Learner.take_snapshot`.

    Opaque: hand it back to :meth:`Learner.restore_snapshot` of the learner that took it. It holds
    torch tensors on the learner's device and stays in the learner's process; use
    :meth:`Learner.get_state` for state that travels or is stored.
    """

    owner: object = dataclasses.field(repr=False)
    modules: Dict[str, Dict[str, torch.Tensor]] = dataclasses.field(repr=False)
    optimizers: Dict[Tuple[str, str], _OptimizerSnapshot] = dataclasses.field(repr=False)
    learner_state: Dict[str, Any] = dataclasses.field(repr=False)


class Learner:
    """Base class of all learners (see :class:`TorchLearner` for the one to subclass).

    Build through a config (``config.build_learner(env=env)``) and call :meth:`build` before anything else.
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
        self._optimizers: Dict[Tuple[str, str], _RegisteredOptimizer] = {}
        self._collective = None
        self._built = False
        self.metrics = MetricsLogger()
        self._rng = np.random.default_rng(getattr(config, "seed", None))
        self._counters = {"num_updates": 0, "num_gradient_steps": 0, "num_env_steps_trained_lifetime": 0}
        self._last_timestep = 0
        self._snapshot_owner = object()  # what a snapshot remembers of its learner (ids can be reused)
        self._step_position = (0, 0)  # (gradient step, of steps) of the running update, for error messages
        self._step_losses: List[Tuple[Tuple[int, int], str, torch.Tensor]] = []  # this update's losses, checked at its end

    # ---------------------------------------------------------------------------------- building
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
            _set_lr(optimizer, schedule.value(self._last_timestep))
        self._optimizers[(module_id, optimizer_name)] = _RegisteredOptimizer(
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
            raise ValueError(
                f"No optimizer {optimizer_name!r} for module {module_id!r}; it has {names}."
            ) from None

    def get_optimizers_for_module(self, module_id: str) -> List[Tuple[str, torch.optim.Optimizer]]:
        """``[(name, optimizer), ...]`` for ``module_id``."""
        return [(reg.name, reg.optimizer) for reg in self._optimizers.values() if reg.module_id == module_id]

    def get_parameters(self, module: RLModule) -> List[torch.nn.Parameter]:
        """The trainable parameters of ``module``."""
        return [p for p in module.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------- update
    def batch_specs(self) -> Dict[str, ModuleBatchSpec]:
        """What a valid batch looks like for each module (used by :meth:`update` and the LearnerGroup)."""
        return batch_specs_for(type(self), self.module_spec)

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
        else:
            local = validate_batch(batch, self.batch_specs())
        timesteps = _validate_timesteps(timesteps)
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
        # then goes back to this snapshot, so a failed update changes nothing.
        snapshot = self.take_snapshot()
        self._step_losses = []
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
            self.metrics.all_reduce(self._collective)
            self.after_gradient_based_update(timesteps=timesteps)
            self._check_finite_after_update(layout.global_rows)
            for reg in self._optimizers.values():
                if reg.module_id in layout.global_rows:
                    self.metrics.log_value((reg.module_id, f"{reg.name}_learning_rate"), _get_lr(reg.optimizer), reduce="last")
            self._counters["num_updates"] += 1
            self._counters["num_env_steps_trained_lifetime"] += sum(layout.global_rows.values()) * num_epochs
            results = self.metrics.reduce()
            results.setdefault(ALL_MODULES, {})["num_env_steps_trained_lifetime"] = self._counters["num_env_steps_trained_lifetime"]
            return _plain_numbers(results)
        except BaseException:
            self.metrics.clear()
            self.restore_snapshot(snapshot)
            raise
        finally:
            self._step_losses = []

    def _resolve(self, value, name: str, default):
        if value is None:
            value = getattr(self.config, name, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int (or None), got {value!r}.")
        return value

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
                _set_lr(reg.optimizer, reg.schedule.value(timestep))

    # Hooks and the gradient pipeline -----------------------------------------------------------
    def before_gradient_based_update(self, *, timesteps: Mapping[str, Any]) -> None:
        """Non-gradient updates before the gradient steps of an update (e.g. adding noise)."""

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

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: Mapping[str, Any], fwd_out: Mapping[str, Any]):
        """The loss tensor of one module on one minibatch (a mean over its rows). Algorithms override this."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss_for_module().")

    def compute_gradients(self, loss_per_module: Mapping[str, Any], **kwargs) -> ParamDict:
        raise NotImplementedError

    def postprocess_gradients(self, gradients: ParamDict) -> ParamDict:
        """Clip the gradients of every module in the step (see :meth:`postprocess_gradients_for_module`)."""
        modules = {reg.module_id for reg in self._optimizers.values()}
        for mid in sorted(modules):
            gradients = self.postprocess_gradients_for_module(module_id=mid, config=self.config, module_gradients_dict=gradients)
        return gradients

    def postprocess_gradients_for_module(self, *, module_id: str, config: Any, module_gradients_dict: ParamDict) -> ParamDict:
        raise NotImplementedError

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

    # -------------------------------------------------------------------------------- state
    def get_state(
        self, components: Optional[Union[str, Iterable[str]]] = None, *, not_components: Optional[Union[str, Iterable[str]]] = None
    ) -> Dict[str, Any]:
        """The learner's state as numpy arrays and plain values (copies, never views).

        ``components`` selects parts by path, e.g. ``"rl_module"``, ``"rl_module/default_policy"``,
        ``"optimizer"``; ``not_components`` excludes some.
        """
        self._check_is_built()
        getters = {
            COMPONENT_RL_MODULE: lambda: self._module.get_state(),
            COMPONENT_OPTIMIZER: self.get_optimizer_state,
            COMPONENT_LEARNER_STATE: self.get_learner_state,
        }
        wanted = _as_paths(components)
        if wanted is None:
            state = {name: get() for name, get in getters.items()}
        else:
            unknown = sorted({p[0] for p in wanted} - set(getters))
            if unknown:
                raise ValueError(f"Unknown state component(s) {unknown}; use paths under {sorted(getters)}.")
            state = {}
            for name in getters:
                paths = [p for p in wanted if p[0] == name]
                if paths:
                    state[name] = _select(getters[name](), [p[1:] for p in paths], name)
        for path in _as_paths(not_components) or []:
            _remove_path(state, path)
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Set the components present in ``state``; everything is checked first and nothing changes on error."""
        self._check_is_built()
        unknown = sorted(set(state) - {COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER, COMPONENT_LEARNER_STATE})
        if unknown:
            raise ValueError(f"Unknown state component(s) {unknown}.")
        if COMPONENT_RL_MODULE in state:
            self._check_module_state(state[COMPONENT_RL_MODULE])
        if COMPONENT_OPTIMIZER in state:
            self._check_optimizer_state(state[COMPONENT_OPTIMIZER])
        if COMPONENT_LEARNER_STATE in state:
            self._check_learner_state(state[COMPONENT_LEARNER_STATE])
        # Everything was checked; should applying fail anyway (a subclass's setter, an optimizer's
        # loader), the learner goes back to how it was, so a failed set_state changes nothing.
        snapshot = self.take_snapshot()
        try:
            if COMPONENT_RL_MODULE in state:
                self._module.set_state(state[COMPONENT_RL_MODULE])
            if COMPONENT_OPTIMIZER in state:
                self.set_optimizer_state(state[COMPONENT_OPTIMIZER])
            if COMPONENT_LEARNER_STATE in state:
                self.set_learner_state(state[COMPONENT_LEARNER_STATE])
        except BaseException:
            self.restore_snapshot(snapshot)
            raise

    def _check_module_state(self, module_state: Mapping[str, Any]) -> None:
        if not isinstance(module_state, Mapping):
            raise ValueError(f"The {COMPONENT_RL_MODULE} component must be a dict of module ids, got {type(module_state).__name__}.")
        unknown = sorted(set(module_state) - set(self._module.keys()))
        if unknown:
            raise ValueError(f"The state has module(s) {unknown} this learner lacks; it has {sorted(self._module.keys())}.")
        for mid, params in module_state.items():
            if not isinstance(params, Mapping):
                raise ValueError(f"The state of module {mid!r} must be a dict of parameter names, got {type(params).__name__}.")
            check_weights(params, self._module[mid], f"module {mid!r}")

    def get_optimizer_state(self) -> Dict[str, Any]:
        raise NotImplementedError

    def set_optimizer_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _check_optimizer_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def get_learner_state(self) -> Dict[str, Any]:
        """Counters, the shuffling generator and everything else that shapes the next update.

        Subclasses with more such state (PPO's KL coefficients) extend this and :meth:`set_learner_state`.
        """
        bit_state = self._rng.bit_generator.state
        return {
            "counters": dict(self._counters),
            "last_timestep": self._last_timestep,
            "rng": {"bit_generator": bit_state["bit_generator"], "state": _json_big_ints(bit_state)},
        }

    def set_learner_state(self, state: Mapping[str, Any]) -> None:
        """Set what :meth:`get_learner_state` returned (checked first by :meth:`_check_learner_state`)."""
        self._counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        self._last_timestep = int(state.get("last_timestep", self._last_timestep))
        if "rng" in state:
            self._rng.bit_generator.state = _from_json_big_ints(state["rng"]["state"])

    def _check_learner_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`set_learner_state` can take ``state`` whole.

        Subclasses that extend the learner state check their part here too (calling ``super()``),
        so a bad state is refused before anything changes.
        """
        where = COMPONENT_LEARNER_STATE
        if not isinstance(state, Mapping):
            raise ValueError(f"The {where} component must be a dict, got {type(state).__name__}.")
        counters = state.get("counters", {})
        if not isinstance(counters, Mapping):
            raise ValueError(f"{where}/counters must be a dict of counter names to ints, got {type(counters).__name__}.")
        unknown = sorted(set(counters) - set(self._counters))
        if unknown:
            raise ValueError(f"{where}/counters has unknown counter(s) {unknown}; this learner counts {sorted(self._counters)}.")
        for name, value in counters.items():
            _check_count(value, f"{where}/counters/{name}")
        if "last_timestep" in state:
            _check_count(state["last_timestep"], f"{where}/last_timestep")
        if "rng" in state:
            rng = state["rng"]
            own_kind = self._rng.bit_generator.state["bit_generator"]
            if not isinstance(rng, Mapping) or not isinstance(rng.get("state"), Mapping):
                raise ValueError(f"{where}/rng must be {{'bit_generator': ..., 'state': {{...}}}}, got {rng!r:.200}.")
            if rng.get("bit_generator") != own_kind:
                raise ValueError(f"Random generator {rng.get('bit_generator')!r} does not match this learner's ({own_kind!r}).")
            # Set the state on a scratch generator of the same kind: it refuses what ours would.
            try:
                scratch = type(self._rng.bit_generator)()
                scratch.state = _from_json_big_ints(rng["state"])
            except (ValueError, TypeError, KeyError, OverflowError) as error:
                raise ValueError(f"{where}/rng holds no valid {own_kind} state: {error}") from None

    # ------------------------------------------------------------------------------ snapshots
    def take_snapshot(self) -> LearnerSnapshot:
        """A cheap in-memory copy of everything an update changes, for :meth:`restore_snapshot`.

        It holds torch clones (on the learner's device) of every module's parameters and buffers and
        of every optimizer's state and hyperparameters, and a copy of :meth:`get_learner_state`
        (counters, the shuffling generator, schedule positions, an algorithm's own state such as
        PPO's KL coefficients). No numpy conversion, nothing written anywhere: on W1 (a [256, 256]
        MLP with Adam) it takes ~0.3 ms, 0.2 % of an update (``benchmarks/learner_update.py``).
        :meth:`update` takes one at its start and rolls back to it when the update fails. The
        memory it holds is one more copy of the weights and optimizer state.

        Example (retry an update after a failure elsewhere)::

            snapshot = learner.take_snapshot()
            learner.update(batch)
            ...                                  # something went wrong after the update
            learner.restore_snapshot(snapshot)   # exactly as before learner.update(batch)
        """
        self._check_is_built()
        with torch.no_grad():
            modules = {mid: {name: t.clone() for name, t in m.state_dict().items()} for mid, m in self._module.items()}
        optimizers = {}
        for key, reg in self._optimizers.items():
            optimizer = reg.optimizer
            optimizers[key] = _OptimizerSnapshot(
                params=tuple(p for group in optimizer.param_groups for p in group["params"]),
                state={p: {k: _copy_tree(v) for k, v in slots.items()} for p, slots in optimizer.state.items()},
                groups=[{k: _copy_tree(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups],
            )
        # get_learner_state returns copies (semantics 5); only its containers are copied here, in case a
        # subclass hands out a live dict the update then changes.
        learner_state = _copy_tree(self.get_learner_state(), copy_arrays=False)
        return LearnerSnapshot(self._snapshot_owner, modules, optimizers, learner_state)

    def restore_snapshot(self, snapshot: LearnerSnapshot) -> None:
        """Put the learner back exactly as it was when ``snapshot`` was taken (see :meth:`take_snapshot`).

        Weights, optimizer state and hyperparameters, counters, the shuffling generator and the
        algorithm's own state come back; gradients are cleared. It needs no collective, so it also
        works after the learner's process group is gone. A snapshot can be restored any number of
        times. Raises ``ValueError`` and changes nothing when ``snapshot`` is another learner's, or
        when modules or optimizers were added or removed since it was taken.
        """
        self._check_is_built()
        if not isinstance(snapshot, LearnerSnapshot) or snapshot.owner is not self._snapshot_owner:
            raise ValueError("This snapshot was taken by another learner; a learner only restores its own snapshots.")
        if set(snapshot.modules) != set(self._module.keys()) or set(snapshot.optimizers) != set(self._optimizers):
            raise ValueError(
                f"The learner's modules or optimizers changed since the snapshot was taken (snapshot: modules "
                f"{sorted(snapshot.modules)}; now {sorted(self._module.keys())}); take a new snapshot after "
                "add_module/remove_module."
            )
        for mid, saved in snapshot.modules.items():
            own = self._module[mid].state_dict()
            if set(own) != set(saved) or any(own[k].shape != saved[k].shape for k in saved):
                raise ValueError(f"Module {mid!r} no longer matches the snapshot (its parameters changed); take a new snapshot.")
        for key, saved in snapshot.optimizers.items():
            params = [p for group in self._optimizers[key].optimizer.param_groups for p in group["params"]]
            if len(params) != len(saved.params) or any(a is not b for a, b in zip(params, saved.params)):
                raise ValueError(f"Optimizer {self._optimizers[key].full_name!r} no longer matches the snapshot; take a new snapshot.")
        with torch.no_grad():
            for mid, saved in snapshot.modules.items():
                own = self._module[mid].state_dict()
                for name, tensor in saved.items():
                    own[name].copy_(tensor)
            for parameter in self._module.parameters():
                parameter.grad = None
        for key, saved in snapshot.optimizers.items():
            optimizer = self._optimizers[key].optimizer
            # Copies again, so the snapshot survives the updates that follow and can be restored twice.
            optimizer.state.clear()
            for p, slots in saved.state.items():
                optimizer.state[p] = {k: _copy_tree(v) for k, v in slots.items()}
            for group, hyper in zip(optimizer.param_groups, saved.groups):
                params = group["params"]
                group.clear()
                group.update(_copy_tree(hyper))
                group["params"] = params
        self.set_learner_state(_copy_tree(snapshot.learner_state))

    def _check_finite_after_update(self, module_ids: Iterable[str]) -> None:
        """Raise :class:`NonFiniteUpdateError` if a loss of this update, or a weight or optimizer value of
        the updated modules, is not finite; :meth:`update` then rolls back, so none of it is kept.

        One check per update instead of one per gradient step (a per-step check costs W1 ~3 %): a
        non-finite gradient, once applied, leaves a non-finite weight or optimizer moment behind
        (NaN and inf persist through every optimizer step), and an optimizer can also overflow on
        finite gradients. With several learners the losses and summed gradients were already checked
        at each step (see :meth:`TorchLearner._all_reduce_gradients`); the weights are identical on all
        learners, so every learner comes to the same verdict here.
        """
        wanted = set(module_ids)
        losses = self._step_losses
        weights = [t for mid in wanted for m in (self._module[mid],) for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        regs = [reg for reg in self._optimizers.values() if reg.module_id in wanted]
        slots = [v for reg in regs for values in reg.optimizer.state.values() for v in values.values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if _first_non_finite([loss for _, _, loss in losses] + weights + slots) is None:
            return
        # Rare path: name what turned non-finite, the earliest loss first.
        for (step, steps), mid, loss in losses:
            if not math.isfinite(float(loss)):
                self._step_position = (step, steps)
                raise self._non_finite_step_error(f"the loss of module {mid!r} is {float(loss)}")
        hint = ("A gradient turned non-finite during the update (extreme values in the batch: check value_targets, "
                "advantages, action_logp, action_dist_inputs and obs), or the optimizer overflowed (lower the learning rate).")
        for mid in sorted(wanted):
            for name, t in self._module[mid].state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteUpdateError(
                        f"Update rejected, the learner is as it was before the call: after the update the weight {name!r} "
                        f"of module {mid!r} is not finite (NaN or inf). {hint}"
                    )
        for reg in regs:
            names = {p: name for name, p in self._module[reg.module_id].named_parameters()}
            for p, values in reg.optimizer.state.items():
                for slot, value in values.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        raise NonFiniteUpdateError(
                            f"Update rejected, the learner is as it was before the call: after the update the optimizer "
                            f"{reg.name!r} state {slot!r} of {names.get(p)!r} of module {reg.module_id!r} is not finite "
                            f"(NaN or inf). {hint}"
                        )

    def _non_finite_step_error(self, what: str) -> NonFiniteUpdateError:
        step, steps = self._step_position
        return NonFiniteUpdateError(
            f"Update rejected, the learner is as it was before the call: {what} at gradient step {step} of {steps}. "
            "Nothing was applied. The batch likely holds values the loss cannot handle in float32 (check value_targets, "
            "advantages, action_logp, action_dist_inputs and obs for extreme magnitudes), or the learning rate is too high."
        )

    def _describe_parameters(self, params: Sequence[torch.nn.Parameter]) -> str:
        """``the gradients of module 'a' are not finite (NaN or inf) in [...]`` for the error messages."""
        names = {p: (mid, name) for mid, m in self._module.items() for name, p in m.named_parameters()}
        by_module: Dict[str, List[str]] = {}
        for p in params:
            mid, name = names.get(p, ("?", "?"))
            by_module.setdefault(mid, []).append(name)
        return "; ".join(f"the gradients of module {mid!r} are not finite (NaN or inf) in {names}" for mid, names in by_module.items())

    # ---------------------------------------------------------------------------- checkpoints
    def save_to_path(self, path, *, storage_options: Optional[dict] = None) -> str:
        """Write the full state as a Zarr v3 checkpoint at ``path`` (a directory or fsspec URL); returns it."""
        from dlearner.checkpoint import objects

        return objects.save_learner(self, path, storage_options=storage_options)

    def restore_from_path(self, path, *, storage_options: Optional[dict] = None) -> None:
        """Restore the state written by :meth:`save_to_path` (or a LearnerGroup's or Algorithm's)."""
        from dlearner.checkpoint import objects

        objects.restore_learner(self, path, storage_options=storage_options)


class TorchLearner(Learner):
    """The torch implementation of :class:`Learner`; subclass it to write an algorithm."""

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        """One Adam over all of the module's parameters, with ``config.lr`` (a float or a schedule)."""
        config = config or self.config
        lr = getattr(config, "lr", 3e-4)
        initial = PiecewiseSchedule(lr, name="lr").value(self._last_timestep)
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(
            module_id=module_id,
            optimizer_name=DEFAULT_OPTIMIZER,
            optimizer=torch.optim.Adam(params, lr=initial),
            params=params,
            lr_or_lr_schedule=lr,
        )

    def _to_tensors(self, batch: MultiBatch) -> Dict[str, "_ModuleTensors"]:
        # Pinned memory and non-blocking copies only towards a CUDA device (see devices.host_transfer).
        transfer = host_transfer(self._device.type, torch.cuda.is_available())
        out = {}
        for mid, cols in batch.items():
            discrete = _is_discrete(self._module[mid].action_space)
            tensors = {}
            rows = 0
            for col, array in cols.items():
                rows = len(array)
                tensor = torch.from_numpy(np.ascontiguousarray(array))
                if tensor.is_floating_point() and tensor.dtype != torch.float32:
                    tensor = tensor.float()
                if col == Columns.ACTIONS and discrete:
                    tensor = tensor.long()
                if transfer.pin_memory:
                    tensor = tensor.pin_memory()
                tensors[col] = tensor.to(self._device, non_blocking=transfer.non_blocking)
            out[mid] = _ModuleTensors(rows, tensors)
        return out

    def _gradient_step(self, tensors, step: Mapping[str, np.ndarray], layout: ShardInfo, last: bool = False) -> None:
        minibatch: Dict[str, Dict[str, torch.Tensor]] = {}
        scale: Dict[str, float] = {}
        weights: Dict[str, float] = {}
        for mid, global_idx in step.items():
            local = tensors.get(mid)
            if local is None:
                continue  # this learner's shard has no rows of the module; it still joins the all-reduce
            offset, rows, mask = layout.row_offsets[mid], local.rows, layout.global_loss_masks.get(mid)
            if offset == 0 and rows == layout.global_rows[mid]:
                local_idx = global_idx  # the whole batch is here: no filtering needed
            else:
                local_idx = global_idx[(global_idx >= offset) & (global_idx < offset + rows)] - offset
                if len(local_idx) == 0:
                    continue
            global_weight = float(mask[global_idx].sum()) if mask is not None else float(len(global_idx))
            local_weight = float(mask[local_idx + offset].sum()) if mask is not None else float(len(local_idx))
            index = torch.from_numpy(local_idx).to(self._device)
            minibatch[mid] = {col: t.index_select(0, index) for col, t in local.columns.items()}
            weights[mid] = local_weight
            scale[mid] = local_weight / global_weight if global_weight > 0 else 0.0

        losses, raw_losses = {}, {}
        if minibatch:
            fwd_out = self._module.forward_train(minibatch)
            for mid in minibatch:
                self.metrics.default_weight = weights[mid]
                loss = self.compute_loss_for_module(module_id=mid, config=self.config, batch=minibatch[mid], fwd_out=fwd_out[mid])
                self.metrics.log_value((mid, "total_loss"), loss)
                raw_losses[mid] = loss
                losses[mid] = loss if scale[mid] == 1.0 else loss * scale[mid]
            self.metrics.default_weight = 1.0
        module_ids = sorted(step)
        gradients = self.compute_gradients(losses, module_ids=module_ids)
        if self._collective is not None and self._collective.world_size > 1:
            # The last step's all-reduce also checks that all learners logged the same metric keys,
            # which saves the metrics reduction a collective of its own. It carries each learner's
            # non-finite-loss flags too and checks the summed gradients, so all learners reject the
            # same step (and roll back together) without a collective of their own.
            loss_flags = [float(mid in raw_losses and not _is_finite_scalar(raw_losses[mid])) for mid in module_ids] \
                if raw_losses else [0.0] * len(module_ids)
            gradients = self._all_reduce_gradients(module_ids, check_metric_keys=last, loss_flags=loss_flags)
        else:
            # Checked once, at the end of the update (see Learner._check_finite_after_update).
            self._step_losses.extend((self._step_position, mid, loss.detach()) for mid, loss in raw_losses.items())
        gradients = self.postprocess_gradients(gradients)
        self.apply_gradients(gradients)
        self._counters["num_gradient_steps"] += 1

    def _step_optimizers(self, module_ids: Iterable[str]) -> List[_RegisteredOptimizer]:
        wanted = set(module_ids)
        return [reg for reg in self._optimizers.values() if reg.module_id in wanted]

    def compute_gradients(self, loss_per_module: Mapping[str, torch.Tensor], *, module_ids: Optional[Sequence[str]] = None, **kwargs) -> ParamDict:
        """Back-propagate the sum of the module losses; returns ``{parameter: gradient}``."""
        regs = self._step_optimizers(module_ids if module_ids is not None else loss_per_module.keys())
        for reg in regs:
            reg.optimizer.zero_grad(set_to_none=True)
        if loss_per_module:
            losses = list(loss_per_module.values())
            total = losses[0]
            for loss in losses[1:]:
                total = total + loss
            total.backward()
        return {p: p.grad for reg in regs for p in reg.params if p.grad is not None}

    def _all_reduce_gradients(
        self, module_ids: Sequence[str], *, check_metric_keys: bool = False, loss_flags: Optional[Sequence[float]] = None
    ) -> ParamDict:
        """Average the gradients over all learners with ONE all-reduce of a flat buffer.

        The buffer ends with one has-gradient flag per parameter, so a parameter that got no gradient
        on any learner keeps ``grad=None`` (exactly as on a single learner); then, with
        ``loss_flags``, one "loss was non-finite" flag per module of ``module_ids``; with
        ``check_metric_keys`` it also carries the metrics logger's key-agreement probe. A non-finite
        loss on any learner, or a non-finite summed gradient, raises :class:`NonFiniteUpdateError`
        on every learner alike, since all of them see the same summed buffer.
        """
        params = [p for reg in self._step_optimizers(module_ids) for p in reg.params]
        pieces = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype) for p in params]
        flags = torch.tensor([p.grad is not None for p in params] + list(loss_flags or ()), dtype=pieces[0].dtype, device=pieces[0].device)
        probe = self.metrics.key_probe().to(flags) if check_metric_keys else flags[:0]
        flat = torch.cat(pieces + [flags, probe])
        self._collective.all_reduce_sum(flat)
        if check_metric_keys:
            self.metrics.accept_key_probe(flat[len(flat) - len(probe):].cpu(), self._collective.world_size)
            flat = flat[: len(flat) - len(probe)]
        num_values = len(flat) - len(flags)
        # The flags as Python numbers in one conversion (not one tensor comparison per parameter).
        summed_flags = flat[num_values:].tolist()
        has_grads, bad_losses = summed_flags[: len(params)], summed_flags[len(params):]
        if any(count > 0 for count in bad_losses):
            bad = [f"{mid!r} (on {int(count)} of {self._collective.world_size} learners)" for mid, count in zip(module_ids, bad_losses) if count > 0]
            raise self._non_finite_step_error(f"the loss of module(s) {', '.join(bad)} is not finite (NaN or inf)")
        if _first_non_finite([flat[:num_values]]) is not None:
            offset, bad_params = 0, []
            for p in params:
                if not bool(torch.isfinite(flat[offset : offset + p.numel()]).all()):
                    bad_params.append(p)
                offset += p.numel()
            raise self._non_finite_step_error(
                f"{self._describe_parameters(bad_params)}, summed over all {self._collective.world_size} learners"
            )
        gradients: ParamDict = {}
        offset = 0
        for p, has_grad in zip(params, has_grads):
            n = p.numel()
            if has_grad > 0:
                # A view into the reduced buffer, not a copy (as DDP's gradient_as_bucket_view): the
                # next step's zero_grad(set_to_none=True) lets the buffer go.
                p.grad = flat[offset : offset + n].view_as(p)
                gradients[p] = p.grad
            offset += n
        return gradients

    def postprocess_gradients_for_module(self, *, module_id: str, config: Any, module_gradients_dict: ParamDict) -> ParamDict:
        """Clip the module's gradients per optimizer, by ``config.grad_clip`` and ``config.grad_clip_by``
        (``"value"``, ``"norm"`` per tensor, or ``"global_norm"`` over the optimizer's parameters)."""
        clip = getattr(config, "grad_clip", None)
        if clip is None:
            return module_gradients_dict
        clip_by = getattr(config, "grad_clip_by", "global_norm")
        for name, optimizer in self.get_optimizers_for_module(module_id):
            reg = self._optimizers[(module_id, name)]
            grads = [module_gradients_dict[p] for p in reg.params if p in module_gradients_dict]
            if not grads:
                continue
            # The norm before clipping is reported in every mode, so clipping shows in the results.
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.metrics.log_value((module_id, f"gradients_{name}_global_norm"), norm)
            if clip_by == "value":
                for g in grads:
                    g.clamp_(-clip, clip)
            elif clip_by == "norm":
                for g in grads:
                    g.mul_(torch.clamp(clip / (torch.linalg.vector_norm(g) + 1e-6), max=1.0))
            else:
                torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
        return module_gradients_dict

    def apply_gradients(self, gradients: ParamDict) -> None:
        """Take one step of every optimizer whose parameters have gradients."""
        stepped = set()
        for p, g in gradients.items():
            if p.grad is not g:
                p.grad = g
        for reg in self._optimizers.values():
            # Only optimizers with parameters in `gradients`: a module outside this step may still
            # hold gradients of an earlier update, which must not be applied again.
            if reg.full_name not in stepped and any(p in gradients and p.grad is not None for p in reg.params):
                reg.optimizer.step()
                stepped.add(reg.full_name)

    # -- optimizer state as numpy ---------------------------------------------------------------
    def get_optimizer_state(self) -> Dict[str, Any]:
        """``{"<module_id>_<name>": {"state": {"<i>": {key: np.ndarray}}, "param_groups": [...]}}``."""
        out = {}
        for reg in self._optimizers.values():
            sd = reg.optimizer.state_dict()
            out[reg.full_name] = {
                "state": {
                    str(i): {k: _to_numpy_or_plain(v) for k, v in s.items()} for i, s in sd["state"].items()
                },
                "param_groups": _plain_json(sd["param_groups"]),
            }
        return out

    def _check_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless every optimizer can take its part of ``state`` and keep stepping:
        same optimizers and parameter groups, hyperparameters the optimizer accepts, and for each
        parameter exactly the slots the optimizer keeps (a missing ``exp_avg_sq`` is refused here,
        not at the next step), shaped like the parameter and finite."""
        if not isinstance(state, Mapping):
            raise ValueError(f"The {COMPONENT_OPTIMIZER} component must be a dict of optimizer names, got {type(state).__name__}.")
        own = {reg.full_name: reg for reg in self._optimizers.values()}
        if set(state) != set(own):
            raise ValueError(
                f"Optimizers differ: the state has {sorted(state)}, this learner has {sorted(own)}."
            )
        for name, opt_state in state.items():
            reg = own[name]
            if not isinstance(opt_state, Mapping) or not isinstance(opt_state.get("state", {}), Mapping) \
                    or not isinstance(opt_state.get("param_groups"), (list, tuple)):
                raise ValueError(f"Optimizer {name!r} state must be {{'state': {{...}}, 'param_groups': [...]}}.")
            groups = opt_state["param_groups"]
            if not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups):
                raise ValueError(f"Optimizer {name!r}: every param group needs a 'params' list.")
            if [len(g["params"]) for g in groups] != [len(g["params"]) for g in reg.optimizer.param_groups]:
                raise ValueError(f"Optimizer {name!r} has a different number of parameters in the state.")
            # The params of the groups are positions, 0..n-1 in order, as state_dict() writes them;
            # anything else would restore into the wrong parameters, or into none.
            positions = [i for g in groups for i in g["params"]]
            if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in positions) \
                    or [int(i) for i in positions] != list(range(len(positions))):
                raise ValueError(f"Optimizer {name!r}: the param groups' params must be the positions 0..{len(positions) - 1} in order.")
            for g, group in enumerate(groups):
                if "lr" in group and (isinstance(group["lr"], bool) or not isinstance(group["lr"], (int, float, np.number, np.ndarray, torch.Tensor)) or bool(group["lr"] < 0)):
                    raise ValueError(f"Optimizer {name!r} param group {g} has learning rate {group['lr']!r}; it must be a number >= 0.")
                for key, value in group.items():
                    numbers = value if isinstance(value, (list, tuple)) and key != "params" else [value] if key != "params" else []
                    if any(isinstance(v, (float, np.floating)) and not math.isfinite(v) for v in numbers):
                        raise ValueError(f"Optimizer {name!r} param group {g} has a non-finite {key} ({value!r}).")
            slots_per_group = _probe_optimizer_slots(reg.optimizer, groups, name)
            params = [p for g in reg.optimizer.param_groups for p in g["params"]]
            group_of = [i for i, g in enumerate(reg.optimizer.param_groups) for _ in g["params"]]
            for key, values in opt_state.get("state", {}).items():
                try:
                    i = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"Optimizer {name!r} state names parameter {key!r}; expected an index.") from None
                if not 0 <= i < len(params):
                    raise ValueError(f"Optimizer {name!r} state names parameter {i}, which does not exist.")
                if not isinstance(values, Mapping):
                    raise ValueError(f"Optimizer {name!r} state of parameter {i} must be a dict of slots.")
                slots = slots_per_group[group_of[i]] if slots_per_group is not None else None
                if slots is not None and set(values) != set(slots):
                    raise ValueError(
                        f"Optimizer {name!r} state of parameter {i} has slots {sorted(values)}, but "
                        f"{type(reg.optimizer).__name__} keeps {sorted(slots)} (missing {sorted(set(slots) - set(values))}, "
                        f"unexpected {sorted(set(values) - set(slots))})."
                    )
                for slot, value in values.items():
                    where = f"Optimizer {name!r} {slot} of parameter {i}"
                    kind = slots.get(slot) if slots is not None else None
                    is_array = isinstance(value, (np.ndarray, torch.Tensor))
                    if is_array and np.ndim(value) > 0 and tuple(np.shape(value)) != tuple(params[i].shape):
                        raise ValueError(f"{where} has shape {tuple(np.shape(value))}, expected {tuple(params[i].shape)}.")
                    if kind == "per_element" and (not is_array or tuple(np.shape(value)) != tuple(params[i].shape)):
                        raise ValueError(f"{where} must be an array shaped like the parameter {tuple(params[i].shape)}.")
                    if kind == "scalar" and (np.ndim(value) != 0 or isinstance(value, bool) or not isinstance(value, (np.ndarray, torch.Tensor, int, float, np.number))):
                        raise ValueError(f"{where} must be a single number, got {value!r:.100}.")
                    if is_array or isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                        _check_state_array(value, params[i], where)

    def set_optimizer_state(self, state: Mapping[str, Any]) -> None:
        self._check_optimizer_state(state)
        own = {reg.full_name: reg for reg in self._optimizers.values()}
        for name, opt_state in state.items():
            sd = {
                "state": {
                    int(i): {k: (torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                    for i, s in opt_state.get("state", {}).items()
                },
                "param_groups": _torch_param_groups(opt_state["param_groups"]),
            }
            own[name].optimizer.load_state_dict(sd)


# ----------------------------------------------------------------------------------- helpers
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
        )
    return specs


def _dist_cls(action_space):
    from dlearner.rl_module import _action_dist_cls

    return _action_dist_cls(action_space)


def _is_discrete(space) -> bool:
    import gymnasium as gym

    return isinstance(space, gym.spaces.Discrete)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _get_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _validate_timesteps(timesteps: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if timesteps is None:
        return {}
    if not isinstance(timesteps, Mapping):
        raise TypeError(f"timesteps must be a dict such as {{'{TIMESTEP_KEY}': 1000}}, got {type(timesteps).__name__}.")
    for key, value in timesteps.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"timesteps[{key!r}] must be a non-negative number, got {value!r}.")
    return dict(timesteps)


def _as_paths(components) -> Optional[List[Tuple[str, ...]]]:
    if components is None:
        return None
    if isinstance(components, str):
        components = [components]
    return [tuple(c.split("/")) for c in components]


def _select(tree: Mapping[str, Any], subpaths: List[Tuple[str, ...]], where: str) -> Any:
    if any(len(p) == 0 for p in subpaths):
        return tree
    out = {}
    for head in dict.fromkeys(p[0] for p in subpaths):
        if head not in tree:
            raise ValueError(f"State component {where}/{head} does not exist; it has {sorted(tree)}.")
        out[head] = _select(tree[head], [p[1:] for p in subpaths if p[0] == head], f"{where}/{head}")
    return out


def _remove_path(tree: Dict[str, Any], path: Tuple[str, ...]) -> None:
    for key in path[:-1]:
        tree = tree.get(key, {})
    tree.pop(path[-1], None)


def _torch_param_groups(groups: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Param groups as stored (JSON: tuples became lists) back in the form torch optimizers use."""
    out = copy.deepcopy([dict(g) for g in groups])
    for group in out:
        if "betas" in group and isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
    return out


def _probe_optimizer_slots(optimizer: torch.optim.Optimizer, groups: Sequence[Mapping[str, Any]], name: str) -> Optional[List[Dict[str, str]]]:
    """Per param group, the state slots ``optimizer``'s class keeps per parameter with the hyperparameters
    of ``groups``: ``{slot: "per_element" | "scalar" | "other"}``.

    Found by one step of a scratch optimizer of the same class over one two-element parameter per
    group, with the stored hyperparameters loaded as ``load_state_dict`` would (so a stored state
    the real optimizer could not step with fails here, as ``ValueError``). ``None`` when the class
    cannot be probed at all (its constructor does not take its own ``defaults``, or it needs a
    closure): such optimizers get the structural checks only.
    """
    def probe(hyperparameters: Sequence[Mapping[str, Any]]) -> List[Dict[str, str]]:
        dummies = [torch.zeros(2, dtype=g["params"][0].dtype, device=g["params"][0].device, requires_grad=True)
                   for g in optimizer.param_groups]
        scratch = type(optimizer)([{"params": [d]} for d in dummies], **optimizer.defaults)
        stored = [{**{k: v for k, v in h.items() if k != "params"}, "params": [i]} for i, h in enumerate(hyperparameters)]
        scratch.load_state_dict({"state": {}, "param_groups": _torch_param_groups(stored)})
        for d in dummies:
            d.grad = torch.zeros_like(d)
        scratch.step()
        out = []
        for d in dummies:
            kinds = {}
            for slot, value in scratch.state.get(d, {}).items():
                if isinstance(value, torch.Tensor):
                    kinds[slot] = "per_element" if tuple(value.shape) == (2,) else "scalar" if value.dim() == 0 else "other"
                else:
                    kinds[slot] = "scalar" if isinstance(value, (int, float)) else "other"
            out.append(kinds)
        return out

    try:
        probe(optimizer.param_groups)
    except (TypeError, RuntimeError, ValueError, KeyError):
        return None  # the class cannot be probed even with its own hyperparameters
    try:
        return probe(groups)
    except (TypeError, RuntimeError, ValueError, KeyError) as error:
        raise ValueError(
            f"Optimizer {name!r}: {type(optimizer).__name__} cannot step with the stored hyperparameters "
            f"({type(error).__name__}: {error})."
        ) from None


def _check_count(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{where} must be an int >= 0, got {value!r:.100}.")


def _check_state_array(value: Any, like: torch.Tensor, where: str) -> None:
    """``value`` (an array of a state) must be real numbers that are finite once in ``like``'s dtype."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.detach().float().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) \
            or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{where} has dtype {array.dtype} in the state; it must hold real numbers.")
    if like.is_floating_point():
        target = torch.empty((), dtype=like.dtype).numpy().dtype if like.dtype != torch.bfloat16 else np.dtype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(target)
        if not np.isfinite(cast).all():
            raise ValueError(f"{where} has values that are not finite in {like.dtype} (NaN, inf or out of range) in the state.")


def check_weights(params: Mapping[str, Any], module: torch.nn.Module, what: str) -> None:
    """Raise ``ValueError`` unless ``params`` (``{name: array}``) can replace ``module``'s state
    whole: the same names and shapes, numbers finite in the module's dtype. Used for every set of
    weights a state or checkpoint brings (modules, APPO's target networks)."""
    own = module.state_dict()
    if set(params) != set(own):
        raise ValueError(
            f"The weights of {what} differ: missing {sorted(set(own) - set(params))}, "
            f"unexpected {sorted(set(params) - set(own))}."
        )
    for name, value in params.items():
        if tuple(np.shape(value)) != tuple(own[name].shape):
            raise ValueError(
                f"Weight {name} of {what} has shape {tuple(np.shape(value))} in the state but "
                f"{tuple(own[name].shape)} here (another architecture?)."
            )
        _check_state_array(value, own[name], f"Weight {name} of {what}")


def _copy_tree(value: Any, *, copy_arrays: bool = True) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned and numpy arrays copied
    (``copy_arrays=False`` keeps arrays that are fresh copies already, as ``get_learner_state``'s are)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # immutable: nothing to copy (the common case, so checked first)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy() if copy_arrays else value
    if isinstance(value, Mapping):
        return {k: _copy_tree(v, copy_arrays=copy_arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v, copy_arrays=copy_arrays) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_tree(v, copy_arrays=copy_arrays) for v in value)
    return copy.deepcopy(value)


def _is_finite_scalar(value: torch.Tensor) -> bool:
    return math.isfinite(float(value.detach()))


def _first_non_finite(tensors: Sequence[torch.Tensor]) -> Optional[int]:
    """Index of the first tensor holding a NaN or inf, or ``None`` (one device sync).

    Fast path: one sum per tensor and a sum of those. A sum is finite only if every summand is, so
    a finite total clears them all; only a non-finite total (which may be a mere overflow of
    finite values) is looked at exactly. This costs a fraction of ``isfinite`` over every element.
    """
    if not tensors:
        return None
    with torch.no_grad():
        sums = [t.sum() for t in tensors]
        if any(x.dtype != sums[0].dtype for x in sums):
            sums = [x.to(torch.float64) for x in sums]
        if math.isfinite(torch.stack(sums).sum().item()):
            return None
        for i, t in enumerate(tensors):
            if not bool(torch.isfinite(t).all()):
                return i
    return None


def _to_numpy_or_plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    return _plain_json(value)


def _plain_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _plain_numbers(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for mid, metrics in results.items():
        out[mid] = {}
        for name, value in metrics.items():
            value = float(value) if not isinstance(value, int) else value
            if isinstance(value, float) and value.is_integer() and name.startswith("num_"):
                value = int(value)
            out[mid][name] = value
    return out


def _json_big_ints(state: Mapping[str, Any]) -> Dict[str, Any]:
    # PCG64 state words are 128-bit ints: JSON-safe as strings.
    out = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out[k] = _json_big_ints(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            out[k] = str(v)
        else:
            out[k] = v
    return out


def _from_json_big_ints(state: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out[k] = _from_json_big_ints(v)
        elif isinstance(v, str) and k != "bit_generator" and v.lstrip("-").isdigit():
            out[k] = int(v)
        else:
            out[k] = v
    return out
