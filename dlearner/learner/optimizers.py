"""The torch optimizers of a learner: their registration, learning rates, and state as numpy.

:class:`RegisteredOptimizer` is what ``Learner.register_optimizer`` keeps per optimizer. The
optimizer component of a learner's state is built, checked whole and loaded by
:func:`optimizer_state`, :func:`check_optimizer_state` and :func:`load_optimizer_state`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from dlearner.columns import COMPONENT_OPTIMIZER
from dlearner.learner.state import check_state_array
from dlearner.schedules import PiecewiseSchedule
from dlearner.validation import is_int, is_real


@dataclasses.dataclass
class RegisteredOptimizer:
    """One optimizer of a module: its name, the parameters it steps and its learning-rate schedule."""

    module_id: str
    name: str
    optimizer: torch.optim.Optimizer
    params: List[torch.nn.Parameter]
    schedule: Optional[PiecewiseSchedule]

    @property
    def full_name(self) -> str:
        """``"<module_id>_<name>"``, the optimizer's key in the learner's state."""
        return f"{self.module_id}_{self.name}"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group (in place where it is a tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def get_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first param group."""
    return float(optimizer.param_groups[0]["lr"])


# ------------------------------------------------------------------------- optimizer state as numpy
def optimizer_state(registered: Iterable[RegisteredOptimizer]) -> Dict[str, Any]:
    """``{"<module_id>_<name>": {"state": {"<i>": {key: np.ndarray}}, "param_groups": [...]}}``."""
    out = {}
    for reg in registered:
        sd = reg.optimizer.state_dict()
        out[reg.full_name] = {
            "state": {str(i): {k: _to_numpy_or_plain(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": _plain_json(sd["param_groups"]),
        }
    return out


def check_optimizer_state(registered: Iterable[RegisteredOptimizer], state: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless every optimizer can take its part of ``state`` and keep stepping:
    same optimizers and parameter groups, hyperparameters the optimizer accepts, and for each
    parameter exactly the slots the optimizer keeps (a missing ``exp_avg_sq`` is refused here,
    not at the next step), shaped like the parameter and finite."""
    if not isinstance(state, Mapping):
        raise ValueError(f"The {COMPONENT_OPTIMIZER} component must be a dict of optimizer names, got {type(state).__name__}.")
    own = {reg.full_name: reg for reg in registered}
    if set(state) != set(own):
        raise ValueError(f"Optimizers differ: the state has {sorted(state)}, this learner has {sorted(own)}.")
    for name, opt_state in state.items():
        reg = own[name]
        if (
            not isinstance(opt_state, Mapping)
            or not isinstance(opt_state.get("state", {}), Mapping)
            or not isinstance(opt_state.get("param_groups"), (list, tuple))
        ):
            raise ValueError(f"Optimizer {name!r} state must be {{'state': {{...}}, 'param_groups': [...]}}.")
        groups = opt_state["param_groups"]
        if not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups):
            raise ValueError(f"Optimizer {name!r}: every param group needs a 'params' list.")
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in reg.optimizer.param_groups]:
            raise ValueError(f"Optimizer {name!r} has a different number of parameters in the state.")
        # The params of the groups are positions, 0..n-1 in order, as state_dict() writes them;
        # anything else would restore into the wrong parameters, or into none.
        positions = [i for g in groups for i in g["params"]]
        if not all(is_int(i) for i in positions) or [int(i) for i in positions] != list(range(len(positions))):
            raise ValueError(
                f"Optimizer {name!r}: the param groups' params must be the positions 0..{len(positions) - 1} in order."
            )
        for g, group in enumerate(groups):
            if "lr" in group and (not _is_number(group["lr"]) or bool(group["lr"] < 0)):
                raise ValueError(
                    f"Optimizer {name!r} param group {g} has learning rate {group['lr']!r}; it must be a number >= 0."
                )
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
                if kind == "scalar" and (np.ndim(value) != 0 or not _is_number(value)):
                    raise ValueError(f"{where} must be a single number, got {value!r:.100}.")
                if is_array or _is_number(value):
                    check_state_array(value, params[i], where)


def load_optimizer_state(registered: Iterable[RegisteredOptimizer], state: Mapping[str, Any]) -> None:
    """Load ``state`` (checked by :func:`check_optimizer_state`) into the optimizers.

    A slot the optimizer already keeps in a tensor of the stored shape (an optimizer that has
    stepped, restored again) is copied into that tensor: one copy, no allocation, and the tensor
    stays the one the update's rollback snapshot copies from, so the next snapshot reuses its
    buffers too. Other slots become new tensors, as ``load_state_dict`` makes them.
    """
    own = {reg.full_name: reg for reg in registered}
    for name, opt_state in state.items():
        optimizer = own[name].optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sd = {
            "state": {
                int(i): {k: _slot_value(optimizer.state.get(params[int(i)], {}).get(k), v) for k, v in s.items()}
                for i, s in opt_state.get("state", {}).items()
            },
            "param_groups": _torch_param_groups(opt_state["param_groups"]),
        }
        optimizer.load_state_dict(sd)


def _slot_value(current: Any, value: Any) -> Any:
    """A stored optimizer slot as ``load_state_dict`` takes it: an array copied into ``current`` (the
    optimizer's tensor for the slot) when that has its shape, else into a new tensor; other values as they are.
    ``load_state_dict`` keeps a tensor already in the parameter's dtype and device as it is."""
    if not isinstance(value, np.ndarray):
        return value
    if not (value.flags.writeable and value.flags.c_contiguous and value.dtype.isnative):
        value = value.astype(value.dtype.newbyteorder("="), order="C")  # a copy torch.from_numpy takes
    if isinstance(current, torch.Tensor) and not current.requires_grad and tuple(current.shape) == value.shape:
        with torch.no_grad():
            current.copy_(torch.from_numpy(value))
        return current
    return torch.from_numpy(np.array(value, copy=True))


def _is_number(value: Any) -> bool:
    # A stored hyperparameter or slot: a real number, any numpy number, or an array or tensor
    # (whose values check_state_array checks).
    return is_real(value) or isinstance(value, (np.number, np.ndarray, torch.Tensor))


def _torch_param_groups(groups: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Param groups as stored (JSON: tuples became lists) back in the form torch optimizers use."""
    out = copy.deepcopy([dict(g) for g in groups])
    for group in out:
        if "betas" in group and isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
    return out


def _probe_optimizer_slots(
    optimizer: torch.optim.Optimizer, groups: Sequence[Mapping[str, Any]], name: str
) -> Optional[List[Dict[str, str]]]:
    """Per param group, the state slots ``optimizer``'s class keeps per parameter with the hyperparameters
    of ``groups``: ``{slot: "per_element" | "scalar" | "other"}``.

    Found by one step of a scratch optimizer of the same class over one two-element parameter per
    group, with the stored hyperparameters loaded as ``load_state_dict`` would (so a stored state
    the real optimizer could not step with fails here, as ``ValueError``). ``None`` when the class
    cannot be probed at all (its constructor does not take its own ``defaults``, or it needs a
    closure): such optimizers get the structural checks only.
    """

    def probe(hyperparameters: Sequence[Mapping[str, Any]]) -> List[Dict[str, str]]:
        dummies = [
            torch.zeros(2, dtype=g["params"][0].dtype, device=g["params"][0].device, requires_grad=True)
            for g in optimizer.param_groups
        ]
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
