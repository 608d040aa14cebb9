"""A learner's state as numpy arrays and plain values: get, check, set.

:class:`StateMixin` gives :class:`~dlearner.learner.Learner` its ``get_state`` / ``set_state`` and
the ``learner_state`` component (counters, the shuffling generator, the last timestep, and what an
algorithm adds). Every state is checked whole before anything changes (:func:`check_weights` is the
check of one module's weights, also used for APPO's target networks).

Big integers (the 128-bit words of the shuffling generator) stay Python ints in the state; the
checkpoint writer stores ints beyond 2**53 exactly (``{"$int": "..."}``, see
:mod:`dlearner.checkpoint.encoding`). Checkpoints written before held them as decimal strings, which
:func:`rng_state_from_stored` still reads.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from dlearner.columns import COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE
from dlearner.learner.override import override_point
from dlearner.validation import is_int

COMPONENT_LEARNER_STATE = "learner_state"


class StateMixin:
    """The state methods of :class:`~dlearner.learner.Learner` (a part of it, not usable alone).

    They read the attributes ``Learner.__init__`` sets (``_module``, ``_counters``,
    ``_last_timestep``, ``_rng``); ``set_state`` rolls back with the learner's snapshots.
    """

    def get_state(
        self,
        components: Optional[Union[str, Iterable[str]]] = None,
        *,
        not_components: Optional[Union[str, Iterable[str]]] = None,
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
        # loader), the learner goes back to how it was, so a failed set_state changes nothing. The
        # snapshot reuses update()'s buffers (no allocation for a large state), except inside an
        # updates_as_one() block, whose own snapshot lives in them.
        self._check_is_built()
        snapshot = self._snapshot(reuse_buffers=self._deferred_modules is None)
        try:
            if COMPONENT_RL_MODULE in state:
                self._module.set_state(state[COMPONENT_RL_MODULE])
            if COMPONENT_OPTIMIZER in state:
                self._load_optimizer_state(state[COMPONENT_OPTIMIZER])  # checked above
            if COMPONENT_LEARNER_STATE in state:
                self.set_learner_state(state[COMPONENT_LEARNER_STATE])
        except BaseException:
            self.restore_snapshot(snapshot)
            raise

    def _check_module_state(self, module_state: Mapping[str, Any]) -> None:
        if not isinstance(module_state, Mapping):
            raise ValueError(
                f"The {COMPONENT_RL_MODULE} component must be a dict of module ids, got {type(module_state).__name__}."
            )
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
        """Load every optimizer's state (as :meth:`get_optimizer_state` gives it); checked first,
        ``ValueError`` if it does not fit (see :meth:`_check_optimizer_state`)."""
        self._check_optimizer_state(state)
        self._load_optimizer_state(state)

    def _load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _check_optimizer_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    @override_point
    def get_learner_state(self) -> Dict[str, Any]:
        """Counters, the shuffling generator and everything else that shapes the next update.

        Subclasses with more such state (PPO's KL coefficients) extend this and :meth:`set_learner_state`.
        """
        bit_state = self._rng.bit_generator.state  # a new dict at every read
        return {
            "counters": dict(self._counters),
            "last_timestep": self._last_timestep,
            "rng": {"bit_generator": bit_state["bit_generator"], "state": bit_state},
        }

    def learner_state_for_snapshot(self) -> Dict[str, Any]:
        """The part of :meth:`get_learner_state` an update may change: what a snapshot copies (see
        ``take_snapshot``). A learner whose state also holds data no update changes (a replay buffer,
        which it fills outside ``update``) leaves that out, so a snapshot stays cheap."""
        return self.get_learner_state()

    @override_point
    def set_learner_state(self, state: Mapping[str, Any]) -> None:
        """Set what :meth:`get_learner_state` returned (checked first by :meth:`_check_learner_state`)."""
        self._counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        self._last_timestep = int(state.get("last_timestep", self._last_timestep))
        if "rng" in state:
            self._rng.bit_generator.state = rng_state_from_stored(state["rng"]["state"])

    @override_point
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
                scratch.state = rng_state_from_stored(rng["state"])
            except (ValueError, TypeError, KeyError, OverflowError) as error:
                raise ValueError(f"{where}/rng holds no valid {own_kind} state: {error}") from None


# ----------------------------------------------------------------------------- checks of a state
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
        check_state_array(value, own[name], f"Weight {name} of {what}")


def check_state_array(value: Any, like: torch.Tensor, where: str) -> None:
    """``value`` (an array of a state) must be real numbers that are finite once in ``like``'s dtype."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.detach().float().cpu().numpy()
    array = np.asarray(value)
    if (
        array.dtype == object
        or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)
        or np.issubdtype(array.dtype, np.complexfloating)
    ):
        raise ValueError(f"{where} has dtype {array.dtype} in the state; it must hold real numbers.")
    if like.is_floating_point():
        target = torch.empty((), dtype=like.dtype).numpy().dtype if like.dtype != torch.bfloat16 else np.dtype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(target, copy=False)  # no copy when it is in that dtype already
            # One sum first (a NaN or inf makes it non-finite), and only if it is not finite (or
            # merely overflowed) a look at every value: the check reads a large state once, not twice.
            if np.isfinite(cast.sum()):
                return
        if not np.isfinite(cast).all():
            raise ValueError(f"{where} has values that are not finite in {like.dtype} (NaN, inf or out of range) in the state.")


def _check_count(value: Any, where: str) -> None:
    if not is_int(value) or value < 0:
        raise ValueError(f"{where} must be an int >= 0, got {value!r:.100}.")


def rng_state_from_stored(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A numpy bit generator's ``state`` from a learner state, its ints restored.

    The ints are ints already, except in checkpoints written before the learner left big ints to
    the checkpoint encoding: those hold every int of the generator state as a decimal string
    (``"state": {"state": "1234...", "inc": "5678..."}, "has_uint32": "0"``), which still restore.
    """
    out = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out[k] = rng_state_from_stored(v)
        elif isinstance(v, str) and k != "bit_generator" and v.lstrip("-").isdigit():
            out[k] = int(v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------- component paths in a state
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
