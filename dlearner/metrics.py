"""Collecting training statistics during an update and reducing them to plain floats.

Values logged during gradient steps are kept as (detached) tensors and reduced once at the end of
an update, so logging costs no device synchronisation per step. With several learners the sums and
weights are all-reduced in one collective call, so every learner reports the same global numbers.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from dlearner.columns import ALL_MODULES

MetricKey = Union[str, Tuple[str, str]]
_REDUCTIONS = ("mean", "sum", "last")


class MetricsLogger:
    """Accumulates metrics for one update; :meth:`reduce` returns ``{module_id: {name: float}}``.

    ``reduce="mean"`` averages weighted by rows (the rows of the current minibatch unless ``weight``
    is given), ``"sum"`` adds up, ``"last"`` keeps the latest value.

    Example (inside a Learner)::

        self.metrics.log_value((module_id, "mean_advantage"), advantages.mean())
    """

    def __init__(self) -> None:
        self._entries: Dict[Tuple[str, str], Tuple[str, List[Any], List[float]]] = {}
        self._reduced: Dict[Tuple[str, str], float] = {}
        self._keys_agreed = False
        self.default_weight: float = 1.0

    @staticmethod
    def _key(key: MetricKey) -> Tuple[str, str]:
        if isinstance(key, str):
            return (ALL_MODULES, key)
        if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key):
            return key
        raise ValueError(f"Metric key must be a name or a (module_id, name) tuple, got {key!r}.")

    def log_value(self, key: MetricKey, value: Any, *, reduce: str = "mean", weight: Optional[float] = None) -> None:
        """Record ``value`` (a float or a scalar tensor) under ``key``."""
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not supported; use one of {_REDUCTIONS}.")
        k = self._key(key)
        if isinstance(value, torch.Tensor):
            value = value.detach()
        entry = self._entries.get(k)
        if entry is None or entry[0] != reduce:
            entry = (reduce, [], [])
            self._entries[k] = entry
        if reduce == "last":
            entry[1][:] = [value]
            entry[2][:] = [1.0]
        else:
            entry[1].append(value)
            entry[2].append(self.default_weight if weight is None else float(weight))
        self._reduced.pop(k, None)

    def log_dict(self, values: Dict[str, Any], *, module_id: Optional[str] = None, reduce: str = "mean") -> None:
        """Log several values at once, under ``module_id`` when given."""
        for name, value in values.items():
            self.log_value(name if module_id is None else (module_id, name), value, reduce=reduce)

    def peek(self, key: MetricKey) -> float:
        """The current reduced value of ``key`` (``KeyError`` if nothing was logged)."""
        k = self._key(key)
        if k in self._reduced:
            return self._reduced[k]
        if k not in self._entries:
            raise KeyError(f"No metric {k} has been logged in this update.")
        return self._local_reduce([k])[0]

    def pop(self, key: MetricKey) -> float:
        """Take ``key`` out of this update's results and return its reduced value (``KeyError`` if not logged).

        For statistics that only feed a derived metric: after the reduction (in
        ``after_gradient_based_update``), read them over all learners, log the derived value with
        ``reduce="last"`` and leave the ingredients out of the result dict. PPO's ``vf_explained_var``
        is made this way from the row means of the value targets and the errors.

        Example (inside a Learner's ``after_gradient_based_update``)::

            total, count = self.metrics.pop((mid, "_hits")), self.metrics.pop((mid, "_tries"))
            self.metrics.log_value((mid, "hit_rate"), total / count, reduce="last")
        """
        value = self.peek(key)
        k = self._key(key)
        self._reduced.pop(k, None)
        self._entries.pop(k, None)
        return value

    def _local_sums(self, keys: List[Tuple[str, str]]) -> List[Tuple[float, float]]:
        """``(total, weight)`` of each key on this learner: the weighted total for ``"mean"``, the total
        for ``"sum"``, the value for ``"last"``.

        Tensor values of all keys are reduced together, with one stack, one cast and one copy to Python
        per dtype and device (not several ops per key: an update logs dozens of metrics, and their
        reduction was a visible part of a small update's time). Sums are taken in float64: exact for
        float32 values up to rounding in the last place.
        """
        totals = [0.0] * len(keys)
        weights = [0.0] * len(keys)
        groups: Dict[Tuple[torch.dtype, torch.device], Tuple[List[torch.Tensor], List[float], List[int]]] = {}
        for i, k in enumerate(keys):
            reduce, values, entry_weights = self._entries[k]
            weights[i] = float(sum(entry_weights))
            for value, weight in zip(values, entry_weights):
                factor = weight if reduce == "mean" else 1.0
                if isinstance(value, torch.Tensor):
                    group = groups.setdefault((value.dtype, value.device), ([], [], []))
                    group[0].append(value.reshape(()))
                    group[1].append(factor)
                    group[2].append(i)
                else:
                    totals[i] += float(value) * factor
        for (_, device), (values, factors, positions) in groups.items():
            stacked = torch.stack(values).to(torch.float64)
            scale = torch.tensor(factors, dtype=torch.float64, device=device)
            index = torch.tensor(positions, dtype=torch.int64, device=device)
            summed = torch.zeros(len(keys), dtype=torch.float64, device=device).index_add_(0, index, stacked * scale)
            for i, total in enumerate(summed.tolist()):
                totals[i] += total
        return list(zip(totals, weights))

    def _local_reduce(self, keys: List[Tuple[str, str]]) -> List[float]:
        """The reduced value of each key on this learner alone."""
        out = []
        for k, (total, weight) in zip(keys, self._local_sums(keys)):
            reduce = self._entries[k][0]
            out.append((total / weight if weight > 0 else float("nan")) if reduce == "mean" else total)
        return out

    def all_reduce(self, collective=None) -> None:
        """Reduce what was logged so far, across all learners when ``collective`` is given.

        Every learner must call this at the same point of an update. Keys any learner lacks count as
        zero weight there. ``"last"`` values are taken locally (they must be the same everywhere).
        """
        keys = self._reducible_keys()
        if collective is not None and collective.world_size > 1:
            if not self._keys_agreed:
                keys = _agree_on_keys(keys, collective)
            # else: the key sets were compared in the last gradient all-reduce (see key_probe); keys
            # logged since then come from post-all-reduce code that is identical on every learner.
            self._keys_agreed = False
            present = [k for k, _ in keys if k in self._entries]
            local = dict(zip(present, self._local_sums(present)))
            sums = torch.tensor([x for k, _ in keys for x in local.get(k, (0.0, 0.0))], dtype=torch.float64)
            if keys:
                collective.all_reduce_sum(sums)
            for i, (k, reduce) in enumerate(keys):
                total, weight = float(sums[2 * i]), float(sums[2 * i + 1])
                self._reduced[k] = (total / weight if weight > 0 else float("nan")) if reduce == "mean" else total
        else:
            names = [k for k, _ in keys]
            self._reduced.update(zip(names, self._local_reduce(names)))
        for k, _ in keys:
            self._entries.pop(k, None)

    def _reducible_keys(self) -> List[Tuple[Tuple[str, str], str]]:
        return sorted((k, e[0]) for k, e in self._entries.items() if e[0] != "last")

    def key_probe(self) -> torch.Tensor:
        """A fingerprint of the keys logged so far, to be summed over all learners (see :meth:`accept_key_probe`).

        Seven 8-bit pieces and their squares: sums of both equal ``world_size`` times one learner's
        values only if every learner has the same pieces (zero variance), and stay exact in float32.
        """
        digest = hashlib.blake2b(repr(self._reducible_keys()).encode(), digest_size=7).digest()
        pieces = torch.tensor(list(digest), dtype=torch.float64)
        self._probe = pieces
        return torch.cat([pieces, pieces * pieces])

    def accept_key_probe(self, summed: torch.Tensor, world_size: int) -> None:
        """Record whether all learners' key fingerprints agreed (the next :meth:`all_reduce` then skips its check)."""
        summed = summed.to(torch.float64)
        n = len(self._probe)
        self._keys_agreed = bool(
            torch.equal(summed[:n], self._probe * world_size) and torch.equal(summed[n:], self._probe * self._probe * world_size)
        )

    def reduce(self) -> Dict[str, Dict[str, float]]:
        """Everything logged in this update as ``{module_id: {name: float}}``; then starts afresh."""
        names = list(self._entries)
        self._reduced.update(zip(names, self._local_reduce(names)))
        out: Dict[str, Dict[str, float]] = {}
        for (module_id, name), value in self._reduced.items():
            out.setdefault(module_id, {})[name] = value
        self._entries.clear()
        self._reduced.clear()
        return out

    def clear(self) -> None:
        """Drop everything logged (used when an update fails)."""
        self._entries.clear()
        self._reduced.clear()
        self._keys_agreed = False


def _agree_on_keys(keys: list, collective) -> list:
    """All learners must reduce the same keys in the same order; cheap check first, then a union."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=7).digest()
    fingerprint = int.from_bytes(digest, "little")
    probe = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64)
    collective.all_reduce_max(probe)
    if int(probe[0]) == fingerprint and -int(probe[1]) == fingerprint:
        return keys
    union = set()
    for other in collective.all_gather_object(keys):
        union.update((tuple(k), reduce) for k, reduce in other)
    return sorted(union)
