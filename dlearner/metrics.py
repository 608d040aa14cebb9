"""Collecting training statistics during an update and reducing them to plain floats.

Values logged during gradient steps are kept as (detached) tensors and reduced once at the end of
an update, so logging costs no device synchronisation per step. With several learners the sums and
weights are all-reduced in one collective call, so every learner reports the same global numbers.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
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
        # key -> [reduce, values, weights, replicated (every value the same on all learners)]
        self._entries: Dict[Tuple[str, str], List[Any]] = {}
        self._reduced: Dict[Tuple[str, str], float] = {}
        self._keys_agreed = False
        self.default_weight: float = 1.0
        # Folding the sums into the last gradient all-reduce (see fold_values): the keys every learner
        # reduced in the last update on this collective, and what this update's fold gave.
        self._fold_keys: Optional[List[Tuple[Tuple[str, str], str]]] = None
        self._fold_collective: Any = None
        self._fold_counts: Dict[Tuple[str, str], int] = {}
        self._folded: Dict[Tuple[str, str], Tuple[float, float]] = {}
        self._fold_rejected = False
        self._stashed: Dict[str, List[Any]] = {}

    @staticmethod
    def _key(key: MetricKey) -> Tuple[str, str]:
        if isinstance(key, str):
            return (ALL_MODULES, key)
        if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key):
            return key
        raise ValueError(f"Metric key must be a name or a (module_id, name) tuple, got {key!r}.")

    def log_value(
        self, key: MetricKey, value: Any, *, reduce: str = "mean", weight: Optional[float] = None, replicated: bool = False
    ) -> None:
        """Record ``value`` (a float or a scalar tensor) under ``key``.

        ``replicated=True`` says the value is the same on every learner (computed from all-reduced
        numbers, such as the norm of the summed gradients): with several learners it is then reduced
        without a collective. Leave it ``False`` for anything computed from a learner's own rows.
        """
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not supported; use one of {_REDUCTIONS}.")
        k = self._key(key)
        if isinstance(value, torch.Tensor):
            value = value.detach()
        entry = self._entries.get(k)
        if entry is None or entry[0] != reduce:
            entry = [reduce, [], [], replicated]
            self._entries[k] = entry
        elif not replicated:
            entry[3] = False
        if reduce == "last":
            entry[1][:] = [value]
            entry[2][:] = [1.0]
        else:
            entry[1].append(value)
            entry[2].append(self.default_weight if weight is None else float(weight))
        self._reduced.pop(k, None)

    def stash(self, name: str, item: Any) -> None:
        """Keep ``item`` (e.g. detached tensors of a gradient step) under ``name`` until
        :meth:`take_stash`: for statistics a learner computes once per update from all its steps
        (in ``Learner.log_step_metrics``). A failed update drops the stash with everything logged."""
        self._stashed.setdefault(name, []).append(item)

    def take_stash(self, name: str) -> List[Any]:
        """What was stashed under ``name`` since the last call, oldest first (``[]`` if nothing)."""
        return self._stashed.pop(name, [])

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
            reduce, values, entry_weights, _ = self._entries[k]
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
        zero weight there. ``"last"`` values are taken locally (they must be the same everywhere), and
        so are values logged with ``replicated=True``. Sums already folded into the last gradient
        all-reduce (:meth:`fold_values`) need no collective here: in a steady run, nothing does.
        """
        keys = self._reducible_keys()
        if collective is not None and collective.world_size > 1:
            world = collective.world_size
            shared = [(k, reduce) for k, reduce in keys if not self._entries[k][3]]
            sums: Dict[Tuple[str, str], Tuple[float, float]] = dict(self._folded)
            reduced_together = [k for k in self._folded]
            if shared:
                if not self._keys_agreed or self._fold_rejected:
                    shared = _agree_on_keys(shared, collective)
                present = [k for k, _ in shared if k in self._entries]
                local = dict(zip(present, self._local_sums(present)))
                flat = torch.tensor([x for k, _ in shared for x in local.get(k, (0.0, 0.0))], dtype=torch.float64)
                collective.all_reduce_sum(flat)
                values = flat.tolist()
                for i, (k, _) in enumerate(shared):
                    total, weight = sums.get(k, (0.0, 0.0))
                    sums[k] = (total + values[2 * i], weight + values[2 * i + 1])
                    reduced_together.append(k)
            replicated = [k for k, _ in keys if self._entries[k][3]]
            for k, (total, weight) in zip(replicated, self._local_sums(replicated)):
                # The same numbers on every learner: the sum over learners is world times this one's.
                folded_total, folded_weight = sums.get(k, (0.0, 0.0))
                sums[k] = (folded_total + world * total, folded_weight + world * weight)
            modes = {**self._fold_modes(), **dict(keys), **dict(shared)}
            for k, (total, weight) in sums.items():
                self._reduced[k] = (total / weight if weight > 0 else float("nan")) if modes[k] == "mean" else total
            # Keys that went through a collective are the same on every learner: the next update folds them.
            self._fold_keys = sorted({(k, modes[k]) for k in reduced_together})
            self._fold_collective = collective
        else:
            names = [k for k, _ in keys]
            self._reduced.update(zip(names, self._local_reduce(names)))
        self._keys_agreed = False
        self._fold_rejected = False
        self._folded = {}
        for k, _ in keys:
            self._entries.pop(k, None)

    # -- the sums in the last gradient all-reduce -----------------------------------------------------
    def fold_values(self, collective) -> Optional[torch.Tensor]:
        """The local sums of the keys every learner reduced in the last update, to ride along in the
        last gradient all-reduce of this one (so :meth:`all_reduce` needs no collective of its own);
        ``None`` before the first update on ``collective``.

        Five float32 numbers per key: total and weight, each split in a float32 and its float32
        remainder (so a float64 sum keeps about 48 bits through a float32 all-reduce), and a
        has-logged flag; then one flag for a sum beyond float32's range. Every learner sends the same
        keys in the same order, whatever it logged. Hand the summed numbers to :meth:`accept_fold`.
        """
        if self._fold_keys is None or self._fold_collective is not collective:
            return None
        keys = [k for k, reduce in self._fold_keys if k in self._entries and self._entries[k][0] == reduce]
        local = dict(zip(keys, self._local_sums(keys)))
        self._fold_counts = {k: len(self._entries[k][1]) for k in keys}
        numbers = np.zeros((len(self._fold_keys), 3), dtype=np.float64)
        for row, (k, _) in enumerate(self._fold_keys):
            if k in local:
                numbers[row] = (*local[k], 1.0)
        with np.errstate(over="ignore", invalid="ignore"):
            high = numbers[:, :2].astype(np.float32)
            low = (numbers[:, :2] - high).astype(np.float32)
        # A sum float32 cannot hold (or a NaN): every learner then reduces the metrics in float64 instead.
        out_of_range = 0.0 if np.isfinite(high).all() and np.isfinite(low).all() else 1.0
        packed = np.concatenate([high, low, numbers[:, 2:].astype(np.float32)], axis=1)
        return torch.from_numpy(np.append(packed.reshape(-1), np.float32(out_of_range)))

    def accept_fold(self, summed: torch.Tensor) -> None:
        """Take the summed :meth:`fold_values` of all learners: those values are reduced now, and are
        left out of :meth:`all_reduce`'s collective. Keys no learner logged are dropped."""
        values = summed.to(torch.float64)
        numbers = values[:-1].reshape(-1, 5)
        if float(values[-1]) > 0 or not bool(torch.isfinite(numbers).all()):
            # A sum beyond float32 on some learner, or in the sum over learners: all learners see the
            # same flag and sums, so all of them leave these keys to all_reduce's float64 collective.
            self._fold_counts = {}
            self._fold_rejected = True
            return
        for (k, _), (high_t, high_w, low_t, low_w, logged) in zip(self._fold_keys, numbers.tolist()):
            if logged > 0:
                self._folded[k] = (high_t + low_t, high_w + low_w)
        for k, count in self._fold_counts.items():
            entry = self._entries[k]
            del entry[1][:count], entry[2][:count]
            if not entry[1]:
                del self._entries[k]
        self._fold_counts = {}

    def _fold_modes(self) -> Dict[Tuple[str, str], str]:
        return dict(self._fold_keys or ())

    def _reducible_keys(self) -> List[Tuple[Tuple[str, str], str]]:
        return sorted((k, e[0]) for k, e in self._entries.items() if e[0] != "last")

    def key_probe(self) -> torch.Tensor:
        """A fingerprint of the keys logged so far, to be summed over all learners (see :meth:`accept_key_probe`).

        Seven 8-bit pieces and their squares: sums of both equal ``world_size`` times one learner's
        values only if every learner has the same pieces (zero variance), and stay exact in float32.
        """
        keys = [key for key in self._reducible_keys() if key[0] not in self._fold_counts]  # folded ones need no check
        digest = hashlib.blake2b(repr(keys).encode(), digest_size=7).digest()
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
        """Drop everything logged (used when an update fails).

        The fold's keys stay: every learner of a collective clears together or re-forms the
        collective, and the keys belong to one collective, so they stay the same on all learners.
        """
        self._entries.clear()
        self._reduced.clear()
        self._keys_agreed = False
        self._folded = {}
        self._fold_counts = {}
        self._fold_rejected = False
        self._stashed = {}


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
