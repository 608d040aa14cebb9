"""The uniform replay buffer: transitions as columns of preallocated numpy arrays, in a ring.

Why columns: a buffer of a million transitions held as Python objects (a dict or tuple per row)
costs hundreds of bytes of object headers per row and a Python loop to build every batch. Here each
column (``obs``, ``actions``, ...) is one array of ``capacity`` rows allocated by the first
:meth:`ReplayBuffer.add`; adding copies a fragment into a slice (two slices where it wraps around)
and a batch is one fancy-indexing gather per column. So the buffer takes the bytes of its columns
and nothing more, sampling 256 rows costs microseconds, and the data can be checkpointed as arrays.

The ring: rows ``0 .. len(self) - 1`` are always the filled ones (the buffer fills from row 0 and
never shrinks); ``_next_index`` is where the next row goes, always ``num_added_lifetime % capacity``.
A full buffer overwrites its oldest rows, and adding a block of rows is the same as adding its rows
one at a time (so a block larger than ``capacity`` leaves its last ``capacity`` rows).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from dlearner.learner.state import rng_state_from_stored
from dlearner.validation import is_int, positive_int

# Column dtypes a buffer holds: bool, signed and unsigned ints, floats (what a checkpoint stores as raw numbers).
_COLUMN_KINDS = "biuf"
_STATE_KEYS = ("type", "capacity", "next_index", "num_added_lifetime", "columns", "rng")


class ReplayBuffer:
    """Uniform replay: every held row is equally likely; batches are drawn with replacement.

    Args:
        capacity: Most rows held; once full, each new row overwrites the oldest one.
        seed: Seeds the buffer's own ``numpy`` generator: two buffers with the same seed and the same
            adds sample the same indices.
    """

    buffer_type = "uniform"

    def __init__(self, capacity: int, *, seed: Optional[int] = None) -> None:
        self.capacity: int = positive_int("capacity", capacity)
        self.num_added_lifetime: int = 0
        self._size = 0
        self._next_index = 0
        self._columns: Dict[str, np.ndarray] = {}  # empty until the first add fixes the columns
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        """Rows held now (at most ``capacity``)."""
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated column arrays."""
        return sum(column.nbytes for column in self._columns.values())

    # ------------------------------------------------------------------------------------ adding
    def add(self, columns: Mapping[str, np.ndarray]) -> None:
        """Copy rows in: ``columns`` maps each column name to an array of the new rows (same length, >= 1).

        The first add fixes the column names, dtypes and per-row shapes and preallocates
        ``capacity`` rows of each; later adds must match them exactly. Nothing changes on error.
        """
        arrays = self._check_new_rows(columns)
        if not self._columns:
            self._columns = {name: np.empty((self.capacity, *a.shape[1:]), dtype=a.dtype) for name, a in arrays.items()}
        num_rows = len(next(iter(arrays.values())))
        kept = min(num_rows, self.capacity)
        # Rows that would be overwritten within this very add are skipped (the last `capacity` rows stay).
        start = (self._next_index + num_rows - kept) % self.capacity
        first = min(kept, self.capacity - start)
        for name, column in self._columns.items():
            rows = arrays[name][num_rows - kept :]
            column[start : start + first] = rows[:first]
            column[: kept - first] = rows[first:]
        self.num_added_lifetime += num_rows
        self._next_index = self.num_added_lifetime % self.capacity
        self._size = min(self.capacity, self._size + num_rows)
        self._rows_written(start, kept)

    def _rows_written(self, start: int, count: int) -> None:
        """Called after an add wrote ``count`` rows from ``start`` on (wrapping around); for subclasses."""

    def _check_new_rows(self, columns: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if not isinstance(columns, Mapping) or not columns:
            raise ValueError(f"add() takes a non-empty dict of column name -> array of rows, got {type(columns).__name__}.")
        arrays = {}
        for name, value in columns.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Replay buffer column names must be non-empty strings, got {name!r}.")
            array = np.asarray(value)
            if array.ndim == 0 or array.dtype.kind not in _COLUMN_KINDS:
                raise ValueError(
                    f"Column {name!r} must be an array of rows (ndim >= 1) of bool or real numbers, "
                    f"got dtype {array.dtype} and shape {array.shape}."
                )
            arrays[name] = array
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"Every column of an add needs the same number of rows (>= 1); got {lengths}.")
        if self._columns:
            _check_same_columns(self._columns, arrays, "the buffer's")
        return arrays

    # ---------------------------------------------------------------------------------- sampling
    def sample_indices(self, batch_size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``(indices, weights)``: ``batch_size`` row indices (int64) drawn with replacement, and the
        importance weights (``None``: uniform replay needs none)."""
        self._check_can_sample(batch_size)
        return self._rng.integers(0, self._size, size=batch_size, dtype=np.int64), None

    def _check_can_sample(self, batch_size: int) -> None:
        positive_int("batch_size", batch_size)
        if self._size == 0:
            raise ValueError("The replay buffer is empty; add rows before sampling.")

    def gather(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        """The rows at ``indices`` (in that order, repeats kept), each column as a new array."""
        indices = self._check_indices(indices, "gather()")
        return {name: column[indices] for name, column in self._columns.items()}

    def sample(self, batch_size: int) -> Dict[str, np.ndarray]:
        """A batch of ``batch_size`` rows; prioritized buffers add a float32 ``"weights"`` column."""
        indices, weights = self.sample_indices(batch_size)
        batch = self.gather(indices)
        if weights is not None:
            batch["weights"] = weights
        return batch

    def _check_indices(self, indices: np.ndarray, where: str) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.int64)  # np.asarray([]) is float64
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise ValueError(f"{where} takes a 1-D array of int row indices, got dtype {indices.dtype} shape {indices.shape}.")
        if indices.size and (indices.min() < 0 or indices.max() >= self._size):
            raise ValueError(
                f"{where}: row indices must lie in [0, {self._size}) (the rows held), got {indices.min()}..{indices.max()}."
            )
        return indices

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Only prioritized buffers take priorities (see :class:`~dlearner.replay.PrioritizedReplayBuffer`)."""
        raise ValueError(
            "Only prioritized replay buffers take priorities; this buffer is 'uniform'. "
            "Set replay_buffer_config={'type': 'prioritized', ...} to sample by TD error."
        )

    # ------------------------------------------------------------------------------------- state
    def get_state(self) -> Dict[str, Any]:
        """The buffer as numpy arrays and plain values (copies): the filled rows of each column,
        the write position, counters and the sampling generator's exact state."""
        bit_state = self._rng.bit_generator.state  # a new dict at every read
        return {
            "type": self.buffer_type,
            "capacity": self.capacity,
            "next_index": self._next_index,
            "num_added_lifetime": self.num_added_lifetime,
            "columns": {name: column[: self._size].copy() for name, column in self._columns.items()},
            "rng": {"bit_generator": bit_state["bit_generator"], "state": bit_state},
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Become the buffer ``state`` describes (from :meth:`get_state`, maybe via a checkpoint).

        Everything is checked first, so a bad state (it may come from anyone's checkpoint) changes
        nothing. Works on a fresh buffer too: the state's columns fix the buffer's columns.
        """
        self.check_state(state)
        columns = {name: np.asarray(array) for name, array in state["columns"].items()}
        if not _same_spec(self._columns, columns):
            self._columns = {name: np.empty((self.capacity, *a.shape[1:]), dtype=a.dtype) for name, a in columns.items()}
        self._size = len(next(iter(columns.values()))) if columns else 0
        for name, array in columns.items():
            self._columns[name][: self._size] = array
        self._next_index = int(state["next_index"])
        self.num_added_lifetime = int(state["num_added_lifetime"])
        self._rng.bit_generator.state = rng_state_from_stored(state["rng"]["state"])

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`set_state` can take ``state`` whole; changes nothing and
        allocates nothing (to check a state before setting it along with others). Subclasses extend it."""
        if not isinstance(state, Mapping):
            raise ValueError(f"A replay buffer state must be a dict, got {type(state).__name__}.")
        missing = [key for key in self._state_keys() if key not in state]
        unknown = sorted(set(state) - set(self._state_keys()))
        if missing or unknown:
            raise ValueError(
                f"Replay buffer state: missing keys {missing}, unknown keys {unknown}; is it a {self.buffer_type!r} buffer's?"
            )
        if state["type"] != self.buffer_type:
            raise ValueError(
                f"The state is of a {state['type']!r:.50} replay buffer, this one is {self.buffer_type!r}; "
                f"restore it with replay_buffer_config['type'] = {state['type']!r:.50}."
            )
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"The state is of a replay buffer with capacity {state['capacity']!r:.50}, this one has {self.capacity}; "
                f"restore it with replay_buffer_config['capacity'] = {state['capacity']!r:.50}."
            )
        size = _check_state_columns(state["columns"], self.capacity)
        added, next_index = state["num_added_lifetime"], state["next_index"]
        if not is_int(added) or added < size or (size < self.capacity and added != size):
            raise ValueError(f"Replay buffer state: num_added_lifetime {added!r:.50} does not fit its {size} rows.")
        if not is_int(next_index) or next_index != added % self.capacity:
            raise ValueError(
                f"Replay buffer state: next_index {next_index!r:.50} must be num_added_lifetime % capacity "
                f"= {added % self.capacity}; the state is corrupted."
            )
        self._check_rng_state(state["rng"])

    def _state_keys(self) -> Tuple[str, ...]:
        return _STATE_KEYS

    def _check_rng_state(self, rng: Any) -> None:
        own_kind = self._rng.bit_generator.state["bit_generator"]
        if not isinstance(rng, Mapping) or not isinstance(rng.get("state"), Mapping):
            raise ValueError(f"Replay buffer state: rng must be {{'bit_generator': ..., 'state': {{...}}}}, got {rng!r:.200}.")
        if rng.get("bit_generator") != own_kind:
            raise ValueError(
                f"Replay buffer state: generator {rng.get('bit_generator')!r:.50} is not this buffer's {own_kind!r}."
            )
        try:  # a scratch generator of the same kind refuses what ours would
            type(self._rng.bit_generator)().state = rng_state_from_stored(rng["state"])
        except (ValueError, TypeError, KeyError, OverflowError) as error:
            raise ValueError(f"Replay buffer state: rng holds no valid {own_kind} state: {error}") from None


def _check_same_columns(expected: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], whose: str) -> None:
    """Raise ``ValueError`` naming the first column whose name, dtype or per-row shape differs."""
    if set(arrays) != set(expected):
        raise ValueError(
            f"The columns differ from {whose} {sorted(expected)}: missing {sorted(set(expected) - set(arrays))}, "
            f"unexpected {sorted(set(arrays) - set(expected))}. Every add must bring the same columns."
        )
    for name, array in arrays.items():
        like = expected[name]
        if array.dtype != like.dtype:
            raise ValueError(f"Column {name!r} has dtype {array.dtype}, {whose} is {like.dtype}; cast it with .astype().")
        if array.shape[1:] != like.shape[1:]:
            raise ValueError(f"Column {name!r} has rows of shape {array.shape[1:]}, {whose} has rows of shape {like.shape[1:]}.")


def _same_spec(columns: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> bool:
    return set(columns) == set(other) and all(
        columns[k].dtype == other[k].dtype and columns[k].shape[1:] == other[k].shape[1:] for k in other
    )


def _check_state_columns(columns: Any, capacity: int) -> int:
    """The row count of a state's columns, after checking they are arrays of numbers of equal length."""
    if not isinstance(columns, Mapping):
        raise ValueError(f"Replay buffer state: columns must be a dict of arrays, got {type(columns).__name__}.")
    sizes = set()
    for name, array in columns.items():
        if not isinstance(name, str) or not name or not isinstance(array, np.ndarray):
            raise ValueError(f"Replay buffer state: column {name!r:.50} must be a numpy array under a non-empty name.")
        if array.ndim == 0 or array.dtype.kind not in _COLUMN_KINDS:
            raise ValueError(
                f"Replay buffer state: column {name!r} has dtype {array.dtype} and shape {array.shape}; "
                "columns hold rows of bool or real numbers."
            )
        sizes.add(len(array))
    if len(sizes) > 1:
        raise ValueError(f"Replay buffer state: the columns have different row counts {sorted(sizes)}; the state is corrupted.")
    size = sizes.pop() if sizes else 0
    if size > capacity:
        raise ValueError(f"Replay buffer state: {size} rows do not fit the capacity {capacity}.")
    return size
