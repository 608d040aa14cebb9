"""Training batches: validation, sharding across learners and the minibatch plan.

Everything here works on numpy arrays in the driver or in a learner, before any tensor is built,
so a bad batch is refused before anything (weights, optimizer, random generator) has changed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch

from dlearner.columns import ALL_COLUMNS, DEFAULT_MODULE_ID, Columns

MultiBatch = Dict[str, Dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class ModuleBatchSpec:
    """What a valid batch for one module looks like: its spaces and the columns its learner needs."""

    observation_space: gym.Space
    action_space: gym.Space
    action_dist_inputs_dim: Optional[int]
    required_columns: Tuple[str, ...]
    allowed_columns: frozenset
    #: The learner class's check of its own columns (``check_module_batch(module_id, columns)``), if any.
    check_columns: Optional[Callable[[str, Mapping[str, np.ndarray]], None]] = None


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """Where a learner's shard sits in the global batch.

    ``row_offsets[module_id]`` is the shard's first row in the global batch, ``global_rows[module_id]``
    the global row count, and ``global_loss_masks[module_id]`` the global ``loss_mask`` column (only for
    modules that have one), so every learner weights its gradient by its share of the global minibatch.
    ``validated`` says the shard was already checked by :func:`validate_batch` where it was made (by a
    LearnerGroup in the driver, or by a replay buffer when its rows were added), so the learner does
    not check it a second time; leave it ``False`` for anything else.
    """

    row_offsets: Dict[str, int]
    global_rows: Dict[str, int]
    global_loss_masks: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    validated: bool = False

    @classmethod
    def whole(cls, batch: MultiBatch) -> "ShardInfo":
        """The layout of a batch that is not sharded."""
        return cls(
            row_offsets={mid: 0 for mid in batch},
            global_rows={mid: num_rows(cols) for mid, cols in batch.items()},
            global_loss_masks={mid: cols[Columns.LOSS_MASK] for mid, cols in batch.items() if Columns.LOSS_MASK in cols},
        )


def num_rows(columns: Mapping[str, Any]) -> int:
    return len(next(iter(columns.values())))


def as_multi_batch(batch: Any) -> Dict[str, Dict[str, Any]]:
    """A flat ``{column: array}`` batch becomes ``{DEFAULT_MODULE_ID: batch}``; a multi-module one stays."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"A batch must be a dict of columns or a dict of module ids to dicts of columns, got {type(batch).__name__}."
        )
    if not batch:
        raise ValueError("The batch is empty: it has no columns and no modules.")
    nested = [isinstance(v, Mapping) for v in batch.values()]
    if all(nested):
        return {mid: dict(cols) for mid, cols in batch.items()}
    if any(nested):
        raise ValueError(
            "The batch mixes columns and module ids at the top level; use either {column: array} or {module_id: {column: array}}."
        )
    return {DEFAULT_MODULE_ID: dict(batch)}


def validate_batch(batch: Any, specs: Mapping[str, ModuleBatchSpec]) -> MultiBatch:
    """Check ``batch`` against the modules' specs and return it as ``{module_id: {column: np.ndarray}}``.

    Raises ``ValueError`` (``TypeError`` for wrong types) naming the module and column for unknown
    modules, missing or unknown columns, empty or mismatched lengths, wrong shapes, wrong dtypes,
    actions outside the action space, masked arrays that hide values, and values that are not finite
    in float32. The arrays come back in the dtypes the learner computes with (floats as float32,
    Discrete actions as int64, native byte order), so what was checked is exactly what is trained on.
    """
    multi = as_multi_batch(batch)
    unknown = sorted(set(multi) - set(specs))
    if unknown:
        raise ValueError(f"The batch names unknown module(s) {unknown}; this learner has {sorted(specs)}.")
    out: MultiBatch = {}
    for module_id, columns in multi.items():
        out[module_id] = _validate_module_columns(module_id, columns, specs[module_id])
    return out


def _as_numpy(module_id: str, column: str, value: Any) -> np.ndarray:
    where = f"Column {column!r} of module {module_id!r}"
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{where} is a {value.layout} torch tensor; give a dense tensor (tensor.to_dense()).")
        if value.dtype == torch.bfloat16:
            value = value.float()  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        try:
            return value.detach().cpu().resolve_conj().resolve_neg().numpy()
        except (RuntimeError, TypeError, NotImplementedError) as error:
            raise TypeError(f"{where} is a torch tensor numpy cannot hold ({value.dtype}, {value.device}): {error}") from None
    if isinstance(value, np.ma.MaskedArray):
        # A mask does not reach the learner: it would train on the hidden values (NaN included).
        masked = int(np.ma.getmaskarray(value).sum())
        if masked:
            raise ValueError(
                f"{where} is a masked array with {masked} masked value(s); the learner would train on the values "
                f"under the mask. Fill them (array.filled(...)) or drop those rows, and mark rows the loss must "
                f"skip with a boolean {Columns.LOSS_MASK!r} column."
            )
        return np.asarray(np.ma.getdata(value))
    if isinstance(value, np.ndarray):
        return np.asarray(value)  # subclasses (np.matrix, memmap) as plain arrays
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            array = None
        if array is None or array.dtype == object:
            raise TypeError(f"{where} is a ragged or non-numeric list; give a numpy array.")
        return array
    raise TypeError(f"{where} must be a numpy array or torch tensor, got {type(value).__name__}.")


#: Columns that hold real numbers: the learner computes with them in float32, so they must be floats.
FLOAT_COLUMNS = frozenset(
    {
        Columns.ACTION_DIST_INPUTS,
        Columns.ACTION_LOGP,
        Columns.ADVANTAGES,
        Columns.VALUE_TARGETS,
        Columns.VF_PREDS,
        Columns.REWARDS,
    }
)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Integer dtypes torch only partly supports (no index_select and friends), widened to ones it does.
_WIDER_INTS = {
    np.dtype(np.uint16): np.dtype(np.int32),
    np.dtype(np.uint32): np.dtype(np.int64),
    np.dtype(np.uint64): np.dtype(np.int64),
}


def _in_compute_dtype(column: str, array: np.ndarray, where: str, n: int) -> np.ndarray:
    """``array`` in the dtype the learner computes with (floats: float32; integers torch fully
    supports; native byte order), after checking that every value is representable there.

    A float64 ``1e300`` is finite in the batch but ``inf`` in float32, so finiteness is checked
    after the cast, never before.
    """
    dtype = array.dtype
    if dtype.kind == "O" or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise TypeError(f"Column {column!r} of {where} has dtype {dtype}; it must be numeric or bool.")
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"Column {column!r} of {where} is complex; it must be real.")
    if column in FLOAT_COLUMNS and not np.issubdtype(dtype, np.floating):
        raise TypeError(
            f"Column {column!r} of {where} has dtype {dtype}; it holds real numbers and must be a floating-point "
            "array (e.g. array.astype(np.float32))."
        )
    if np.issubdtype(dtype, np.floating):
        if dtype != np.float32 or not dtype.isnative:
            with np.errstate(over="ignore"):  # overflow to inf is what the check below reports
                array = array.astype(np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            bad = int((~finite).reshape(n, -1).any(axis=1).sum())
            raise ValueError(
                f"Column {column!r} of {where} has values that are not finite in float32, the dtype the learner "
                f"computes in (NaN, inf, or beyond +-{_FLOAT32_MAX:.4g}), in {bad} row(s)."
            )
        return array
    wider = _WIDER_INTS.get(dtype.newbyteorder("="))
    if wider is not None:
        if dtype.newbyteorder("=") == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"Column {column!r} of {where} has values beyond the int64 range the learner computes in.")
        return array.astype(wider)
    if not dtype.isnative:
        return array.astype(dtype.newbyteorder("="))
    return array


def _validate_module_columns(module_id: str, columns: Mapping[str, Any], spec: ModuleBatchSpec) -> Dict[str, np.ndarray]:
    where = f"module {module_id!r}"
    if not columns:
        raise ValueError(f"The batch for {where} is empty: it has no columns.")
    missing = [c for c in spec.required_columns if c not in columns]
    if missing:
        raise ValueError(f"The batch for {where} lacks column(s) {missing} that this learner needs.")
    extra = sorted(c for c in columns if c not in spec.allowed_columns)
    if extra:
        raise ValueError(
            f"The batch for {where} has unknown column(s) {extra}; known columns are {sorted(spec.allowed_columns)} "
            "(a custom Learner can accept more by extending `optional_columns`)."
        )
    arrays = {c: _as_numpy(module_id, c, v) for c, v in columns.items()}
    lengths = {c: (a.shape[0] if a.ndim else None) for c, a in arrays.items()}
    if any(n is None for n in lengths.values()):
        scalars = [c for c, n in lengths.items() if n is None]
        raise ValueError(f"Column(s) {scalars} of {where} are scalars; every column needs one row per sample.")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Columns of {where} have mismatched lengths {lengths}; every column needs the same rows.")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"The batch for {where} has 0 rows; give at least one.")
    for column in list(arrays):
        arrays[column] = _in_compute_dtype(column, arrays[column], where, n)
    obs_shape, obs_what = _observation_row_shape(spec.observation_space)
    _check_shape(arrays, Columns.OBS, obs_shape, where, obs_what)
    _check_shape(arrays, Columns.NEXT_OBS, obs_shape, where, obs_what)
    _check_actions(arrays, spec.action_space, where)
    if spec.action_dist_inputs_dim is not None:
        _check_shape(arrays, Columns.ACTION_DIST_INPUTS, (spec.action_dist_inputs_dim,), where, "the action distribution")
    for column in (
        Columns.ACTION_LOGP,
        Columns.ADVANTAGES,
        Columns.VALUE_TARGETS,
        Columns.VF_PREDS,
        Columns.REWARDS,
        Columns.TERMINATEDS,
        Columns.TRUNCATEDS,
        Columns.LOSS_MASK,
    ):
        _check_shape(arrays, column, (), where, "one value per row")
    if Columns.LOSS_MASK in arrays and arrays[Columns.LOSS_MASK].dtype != np.bool_:
        raise TypeError(f"Column {Columns.LOSS_MASK!r} of {where} must be bool, got {arrays[Columns.LOSS_MASK].dtype}.")
    if spec.check_columns is not None:
        spec.check_columns(module_id, arrays)
    return arrays


def _observation_row_shape(space: gym.Space) -> Tuple[Tuple[int, ...], str]:
    from dlearner.spaces import needs_flattening, observation_row_shape

    if needs_flattening(space):
        return observation_row_shape(space), f"the flattened observation space {space} (gymnasium's spaces.flatten)"
    return tuple(space.shape), "the observation space"


def _check_shape(arrays, column, row_shape, where, what) -> None:
    if column in arrays and tuple(arrays[column].shape[1:]) != tuple(row_shape):
        raise ValueError(
            f"Column {column!r} of {where} has rows of shape {tuple(arrays[column].shape[1:])}, "
            f"but {what} needs {tuple(row_shape)}."
        )


def _check_actions(arrays, action_space, where) -> None:
    if Columns.ACTIONS not in arrays:
        return
    actions = arrays[Columns.ACTIONS]
    if isinstance(action_space, gym.spaces.Discrete):
        _check_shape(arrays, Columns.ACTIONS, (), where, f"the action space {action_space}")
        if not (np.issubdtype(actions.dtype, np.integer) or actions.dtype == np.bool_):
            raise TypeError(f"Column 'actions' of {where} has dtype {actions.dtype}; Discrete actions must be integers.")
        # Batches carry the env's own action values: Discrete(n, start=s) actions are s .. s+n-1.
        low, high = int(action_space.start), int(action_space.start + action_space.n)
        if actions.min() < low or actions.max() >= high:
            raise ValueError(
                f"Column 'actions' of {where} has values outside [{low}, {high - 1}] of {action_space}; "
                "actions are the environment's own values (for Discrete(n, start=s): s .. s+n-1)."
            )
        arrays[Columns.ACTIONS] = actions.astype(np.int64, copy=False)  # the learner indexes logits with int64
    elif isinstance(action_space, gym.spaces.Box):
        _check_shape(arrays, Columns.ACTIONS, action_space.shape, where, f"the action space {action_space}")
        # Continuous actions enter the distribution's float32 arithmetic (integers up to 2**64 fit).
        arrays[Columns.ACTIONS] = actions.astype(np.float32, copy=False)


def shard_batch(batch: MultiBatch, num_shards: int) -> List[Tuple[MultiBatch, ShardInfo]]:
    """Split every module's rows into ``num_shards`` contiguous, nearly equal shards.

    Shards may be uneven or lack a module; each comes with the :class:`ShardInfo` its learner needs
    to take part in the same global minibatches as the others.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    whole = ShardInfo.whole(batch)
    shards: List[Tuple[MultiBatch, ShardInfo]] = []
    bounds = shard_bounds(whole.global_rows, num_shards)
    for i in range(num_shards):
        part: MultiBatch = {}
        offsets = {}
        for mid, cols in batch.items():
            lo, hi = int(bounds[mid][i]), int(bounds[mid][i + 1])
            offsets[mid] = lo
            if hi > lo:
                part[mid] = {c: a[lo:hi] for c, a in cols.items()}
        shards.append((part, dataclasses.replace(whole, row_offsets=offsets)))
    return shards


def shard_bounds(global_rows: Mapping[str, int], num_shards: int) -> Dict[str, np.ndarray]:
    """Per module, the ``num_shards + 1`` row bounds of its nearly equal contiguous shards (shard
    ``i`` holds rows ``bounds[i]:bounds[i + 1]``); what :func:`shard_batch` cuts, for those that
    shard references to rows rather than the rows themselves."""
    return {mid: np.linspace(0, rows, num_shards + 1).round().astype(int) for mid, rows in global_rows.items()}


def minibatch_plan(
    global_rows: Mapping[str, int],
    minibatch_size: Optional[int],
    num_epochs: int,
    rng: Optional[np.random.Generator],
) -> Iterator[Dict[str, np.ndarray]]:
    """Yield, per gradient step, each module's global row indices.

    Each epoch shuffles each module's rows with ``rng`` (``None``: no shuffling) and cuts them into
    ``ceil(rows / minibatch_size)`` minibatches (the last may be smaller). An epoch has as many steps
    as the module with the most minibatches; a module with fewer cycles through its own, so a module
    with fewer rows than ``minibatch_size`` trains on all of them each step.
    """
    module_ids = sorted(global_rows)
    for _ in range(num_epochs):
        chunks: Dict[str, List[np.ndarray]] = {}
        for mid in module_ids:
            n = global_rows[mid]
            order = rng.permutation(n) if rng is not None else np.arange(n)
            size = n if minibatch_size is None or minibatch_size >= n else minibatch_size
            chunks[mid] = [order[i : i + size] for i in range(0, n, size)]
        steps = max(len(c) for c in chunks.values())
        for s in range(steps):
            yield {mid: chunks[mid][s % len(chunks[mid])] for mid in module_ids}


def num_steps_per_epoch(global_rows: Mapping[str, int], minibatch_size: Optional[int]) -> int:
    if minibatch_size is None:
        return 1
    return max(math.ceil(n / minibatch_size) for n in global_rows.values())


def default_allowed_columns(extra: Iterable[str] = ()) -> frozenset:
    return frozenset(ALL_COLUMNS) | frozenset(extra)
