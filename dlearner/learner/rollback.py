"""Failed updates change nothing: snapshots, rollback, and the non-finite checks that trigger it.

:class:`RollbackMixin` gives :class:`~dlearner.learner.Learner` ``take_snapshot`` /
``restore_snapshot`` (a cheap in-memory copy of everything an update changes, and back) and the
check, once per update, that no loss, weight or optimizer value turned NaN or inf; a failed check
raises :class:`NonFiniteUpdateError` after :meth:`~dlearner.learner.Learner.update` rolled back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch


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


# Module parameters, buffers and submodules registered anywhere in this process: while the count
# stays put, a learner's list of its modules' state tensors stays valid (_module_state_tensors).
_registrations = [0]


def _count_registration(*_args: Any) -> None:
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


@dataclasses.dataclass(eq=False)
class _SnapshotLayout:
    """Copies of a learner's state tensors, arranged as a snapshot holds them, and the tensors (with
    their storage) they were copied from: while those are the same, the next snapshot copies into
    the same buffers and reuses the arrangement."""

    sources: List[Any]
    pointers: List[int]
    buffers: List[Any]
    modules: Dict[str, Dict[str, torch.Tensor]]
    states: Dict[Tuple[str, str], Dict[torch.nn.Parameter, Dict[str, Any]]]

    @classmethod
    def build(cls, module_items, slot_items, tensors, copies, module_ids, optimizers) -> "_SnapshotLayout":
        modules: Dict[str, Dict[str, torch.Tensor]] = {mid: {} for mid in module_ids}
        states: Dict[Tuple[str, str], Dict[torch.nn.Parameter, Dict[str, Any]]] = {key: {} for key in optimizers}
        copied = iter(copies)
        for mid, name, _ in module_items:
            modules[mid][name] = next(copied)
        for key, p, slot, _ in slot_items:
            states[key].setdefault(p, {})[slot] = next(copied)
        pointers = [t.data_ptr() if isinstance(t, torch.Tensor) else 0 for t in tensors]
        return cls(list(tensors), pointers, list(copies), modules, states)

    def matches(self, tensors: Sequence[Any]) -> bool:
        """Whether ``tensors`` are the very tensors, in the same storage, that this layout copied."""
        return len(tensors) == len(self.sources) and all(
            a is b and a.data_ptr() == ptr for a, b, ptr in zip(tensors, self.sources, self.pointers)
        )


class RollbackMixin:
    """The snapshot and non-finite-check methods of :class:`~dlearner.learner.Learner` (a part of it,
    not usable alone).

    They read the attributes ``Learner.__init__`` sets (``_module``, ``_optimizers``,
    ``_snapshot_owner``, ``_step_losses``, ``_step_position``, ``_deferred_modules``) and the learner
    state methods.
    """

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
        return self._snapshot(reuse_buffers=False)

    def _snapshot(self, *, reuse_buffers: bool) -> LearnerSnapshot:
        """:meth:`take_snapshot`. ``reuse_buffers=True`` is :meth:`update`'s own snapshot, which never
        outlives the next update: it copies into the buffers the last one used (one
        ``torch._foreach_copy_``, no allocation) and reuses their arrangement while the learner's
        state tensors are the same tensors in the same storage."""
        module_items = self._module_state_tensors()
        slot_items = [
            (key, p, slot, value)
            for key, reg in self._optimizers.items()
            for p, slots in reg.optimizer.state.items()
            for slot, value in slots.items()
        ]
        tensors = [t for _, _, t in module_items] + [value for *_, value in slot_items]
        layout = self._snapshot_layout if reuse_buffers else None
        with torch.no_grad():
            if layout is not None and layout.matches(tensors):
                torch._foreach_copy_(layout.buffers, tensors)
            else:
                copies = [v.detach().clone() if isinstance(v, torch.Tensor) else _copy_tree(v) for v in tensors]
                layout = _SnapshotLayout.build(module_items, slot_items, tensors, copies, self._module.keys(), self._optimizers)
                if reuse_buffers:  # with a non-tensor optimizer slot (rare), copied afresh every time
                    self._snapshot_layout = layout if all(isinstance(v, torch.Tensor) for v in tensors) else None
        optimizers = {
            key: _OptimizerSnapshot(
                params=tuple(p for group in reg.optimizer.param_groups for p in group["params"]),
                state=layout.states[key],
                groups=[{k: _copy_tree(v) for k, v in group.items() if k != "params"} for group in reg.optimizer.param_groups],
            )
            for key, reg in self._optimizers.items()
        }
        # get_learner_state returns copies (semantics 5); only its containers are copied here, in case a
        # subclass hands out a live dict the update then changes.
        learner_state = _copy_tree(self.learner_state_for_snapshot(), copy_arrays=False)
        return LearnerSnapshot(self._snapshot_owner, layout.modules, optimizers, learner_state)

    def _module_state_tensors(self) -> List[Tuple[str, str, torch.Tensor]]:
        """``(module_id, name, tensor)`` of every module's ``state_dict(keep_vars=True)`` (the live
        parameters and buffers), kept while no module anywhere registered a parameter, buffer or
        submodule (torch's registration hooks count them) and the learner's modules are the same."""
        key = (_registrations[0], tuple((mid, id(self._module[mid])) for mid in self._module.keys()))
        if self._module_state_key != key:
            self._module_state_items = [
                (mid, name, t) for mid, m in self._module.items() for name, t in m.state_dict(keep_vars=True).items()
            ]
            self._module_state_key = key
        return self._module_state_items

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
                raise ValueError(
                    f"Optimizer {self._optimizers[key].full_name!r} no longer matches the snapshot; take a new snapshot."
                )
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

    @contextlib.contextmanager
    def updates_as_one(self) -> Iterator[None]:
        """Several :meth:`update` calls that stand or fall together: one snapshot before the first and
        one non-finite check after the last, instead of one of each per update.

        If any of them fails (or the check finds a NaN or inf in a loss, weight or optimizer value of
        a module they trained), the learner goes back to its state before the block, every update of
        it undone, and the error propagates. For many small updates in one call (SAC's replay-buffer
        calls: 64 and more updates of 256 rows) this takes the snapshot's and the check's cost off each
        update. State outside the snapshot (a replay buffer's rows and priorities) is not rolled back.

        Example::

            with learner.updates_as_one():
                for batch in batches:
                    learner.update(batch)
        """
        self._check_is_built()
        if self._deferred_modules is not None:
            raise RuntimeError("updates_as_one() blocks do not nest.")
        snapshot = self._snapshot(reuse_buffers=True)  # no update in the block takes one of its own
        self._deferred_modules, self._step_losses = set(), []
        try:
            yield
            self._check_finite_after_update(self._deferred_modules)
        except BaseException:
            self.metrics.clear()
            self.restore_snapshot(snapshot)
            raise
        finally:
            self._deferred_modules, self._step_losses = None, []

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
        weights = [t for mid, _, t in self._module_state_tensors() if mid in wanted and t.is_floating_point()]
        regs = [reg for reg in self._optimizers.values() if reg.module_id in wanted]
        slots = [
            v
            for reg in regs
            for values in reg.optimizer.state.values()
            for v in values.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
        if _all_finite([loss for _, _, loss in losses] + weights + slots):
            return
        # Rare path: name what turned non-finite, the earliest loss first.
        for (step, steps), mid, loss in losses:
            if not math.isfinite(float(loss)):
                self._step_position = (step, steps)
                raise self._non_finite_step_error(f"the loss of module {mid!r} is {float(loss)}")
        hint = (
            "A gradient turned non-finite during the update (extreme values in the batch: check value_targets, "
            "advantages, action_logp, action_dist_inputs and obs), or the optimizer overflowed (lower the learning rate)."
        )
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
        return "; ".join(
            f"the gradients of module {mid!r} are not finite (NaN or inf) in {names}" for mid, names in by_module.items()
        )


def first_non_finite(tensors: Sequence[torch.Tensor]) -> Optional[int]:
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


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite: one ``torch._foreach_norm`` call (a NaN or inf
    makes a norm non-finite), and an exact look only when a norm is not finite (it may also overflow
    on finite values). A third cheaper than a sum per tensor for a learner's weights and moments."""
    if not tensors:
        return True
    with torch.no_grad():
        norms = torch._foreach_norm(list(tensors))
        if any(n.dtype != norms[0].dtype for n in norms):
            norms = [n.to(torch.float64) for n in norms]
        if math.isfinite(torch.stack(norms).sum().item()):
            return True
    return first_non_finite(tensors) is None


def is_finite_scalar(value: torch.Tensor) -> bool:
    """Whether the one-element tensor ``value`` is finite (one device sync)."""
    return math.isfinite(float(value.detach()))


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
