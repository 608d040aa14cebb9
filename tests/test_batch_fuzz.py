"""Property-based fuzz of batch validation: any batch either trains on finite numbers or is refused
with ``ValueError``/``TypeError`` and changes nothing. A batch holding a value that is not finite
in float32 must be refused by validation itself; only batches of finite numbers may reach the
update and be rejected there (``NonFiniteUpdateError``, when the loss or gradients overflow).

Mutations of a well-formed PPO batch: dtypes (floats of every width, integers, bool, complex,
strings, objects, foreign byte order), shapes (extra or missing dimensions, wrong row counts,
scalars), NaN/inf and finite extremes (in float32 and beyond it in float64), masked arrays, torch
tensors (bfloat16 included), lists, non-contiguous views, missing, extra and unknown columns,
empty and multi-module batches. One learner (and one pair of learners joined by a real gloo group)
serves all examples: each starts from the same snapshot, which keeps the run short.
"""

from __future__ import annotations

import datetime
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import ppo_batch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dlearner import DEFAULT_MODULE_ID, Columns, PPOConfig
from dlearner.algorithms.ppo import PPOTorchLearner
from dlearner.batch import shard_batch, validate_batch
from dlearner.collective import TorchCollective
from dlearner.learner import NonFiniteUpdateError, batch_specs_for

ROWS = 12
TINY_MODEL = {"fcnet_hiddens": [8]}
FUZZ_SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

SPECIAL_FLOATS = [
    np.nan,
    np.inf,
    -np.inf,
    1e300,
    -1e300,
    3.4e38,
    -3.4e38,
    3e38,
    1e30,
    -1e30,
    1e20,
    65504.0,
    1e-45,
    -0.0,
    0.0,
    1e5,
    -7.5,
]
SPECIAL_INTS = [-1, 0, 1, 2, 7, 2**31 - 1, 2**40, -(2**40)]
DTYPES = [
    "float16",
    "float32",
    "float64",
    "longdouble",
    ">f4",
    ">f8",
    "int8",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    ">i8",
    "bool",
    "complex64",
    "object",
    "U3",
    "datetime64[s]",
]
TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
EXTRA_COLUMNS = {
    Columns.REWARDS: lambda: np.linspace(-1, 1, ROWS, dtype=np.float32),
    Columns.VF_PREDS: lambda: np.zeros(ROWS, np.float64),
    Columns.TERMINATEDS: lambda: np.arange(ROWS) % 5 == 0,
    Columns.TRUNCATEDS: lambda: np.zeros(ROWS, np.int64),
    Columns.LOSS_MASK: lambda: np.arange(ROWS) % 3 != 0,
    Columns.EPS_ID: lambda: np.arange(ROWS) // 4,
    Columns.NEXT_OBS: lambda: np.ones((ROWS, 4), np.float32),
    "not_a_column": lambda: np.zeros(ROWS, np.float32),
}


# ---------------------------------------------------------------------------------- mutations
def _cast(array, dtype):
    """``array`` as ``dtype``, garbage included (NaN -> int and the like); unchanged where numpy
    cannot cast at all (a string column to int): such a mutation is simply not generated."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            return np.asarray(array).astype(dtype)
        except (ValueError, TypeError, OverflowError):
            return array


def plain_column(draw, batch):
    """A column that is (still) a plain numpy array, or None: later mutations build on earlier ones."""
    columns = sorted(c for c, v in batch.items() if type(v) is np.ndarray)
    return draw(st.sampled_from(columns)) if columns else None


def mutate_value(draw, batch):
    column = plain_column(draw, batch)
    if column is None or batch[column].size == 0:
        return
    array = batch[column].copy()
    index = draw(st.integers(0, array.size - 1))
    if np.issubdtype(array.dtype, np.floating):
        value = draw(st.sampled_from(SPECIAL_FLOATS))
        if abs(value) > float(np.finfo(array.dtype).max) and not np.isinf(value):
            array = array.astype(np.float64)  # keep a float64 extreme as the batch would carry it
        with np.errstate(over="ignore"):
            array.flat[index] = value
    elif np.issubdtype(array.dtype, np.integer):
        value = draw(st.sampled_from(SPECIAL_INTS))
        array = array.astype(np.int64)
        array.flat[index] = value
    else:
        return
    batch[column] = array


def mutate_extreme(draw, batch):
    """A value that is finite in float32 but makes the loss or its gradients overflow."""
    columns = sorted(c for c, v in batch.items() if type(v) is np.ndarray and v.dtype == np.float32 and v.size)
    if not columns:
        return
    column = draw(st.sampled_from(columns))
    array = batch[column].copy()
    array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([3.4e38, -3.4e38, 3e38, 1e30, -1e30, 1e20, -1e20]))
    batch[column] = array


def mutate_dtype(draw, batch):
    column = plain_column(draw, batch)
    if column is not None:
        batch[column] = _cast(batch[column], draw(st.sampled_from(DTYPES)))


def mutate_shape(draw, batch):
    column = plain_column(draw, batch)
    if column is None:
        return
    array = batch[column]
    how = draw(st.sampled_from(["extra_dim", "flatten", "drop_row", "add_row", "transpose", "scalar", "zero_width"]))
    if how == "extra_dim":
        batch[column] = array[..., None]
    elif how == "flatten":
        batch[column] = array.reshape(-1)
    elif how == "drop_row":
        batch[column] = array[:-1]
    elif how == "add_row":
        batch[column] = np.concatenate([array, array[:1]]) if array.ndim else array
    elif how == "transpose":
        batch[column] = array.T
    elif how == "scalar":
        batch[column] = array.reshape(-1)[0] if array.size else np.float32(0)
    else:
        batch[column] = np.zeros((len(array) if array.ndim else 1, 0), np.float32)


def mutate_drop(draw, batch):
    if batch:
        del batch[draw(st.sampled_from(sorted(batch)))]


def mutate_extra(draw, batch):
    column = draw(st.sampled_from(sorted(EXTRA_COLUMNS)))
    batch[column] = EXTRA_COLUMNS[column]()


def mutate_empty(draw, batch):
    for column, array in list(batch.items()):
        if isinstance(array, (np.ndarray, torch.Tensor)) and array.ndim:
            batch[column] = array[:0]


def mutate_rows(draw, batch):
    rows = draw(st.integers(1, ROWS))
    for column, array in list(batch.items()):
        if isinstance(array, (np.ndarray, torch.Tensor)) and array.ndim:
            batch[column] = array[:rows]


def mutate_masked(draw, batch):
    column = plain_column(draw, batch)
    if column is None:
        return
    array = batch[column]
    if array.dtype.kind not in "biuf" or array.size == 0:
        return
    if draw(st.booleans()):
        mask = False  # a masked array that hides nothing
    else:
        mask = np.zeros(array.shape, bool)
        mask.flat[draw(st.integers(0, array.size - 1))] = True
        if array.dtype.kind == "f":
            array = array.copy()
            array[mask] = np.nan  # the NaN a mask would hide
    batch[column] = np.ma.masked_array(array, mask=mask)


def mutate_torch(draw, batch):
    column = plain_column(draw, batch)
    if column is None:
        return
    array = batch[column]
    if array.dtype.kind not in "biuf":
        return
    try:
        tensor = torch.from_numpy(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="))))
    except TypeError:
        return  # a dtype torch has no tensor for (e.g. longdouble): nothing to fuzz here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch[column] = tensor.to(draw(st.sampled_from(TORCH_DTYPES)))


def mutate_list(draw, batch):
    column = plain_column(draw, batch)
    if column is not None:
        batch[column] = batch[column].tolist()


def mutate_strided(draw, batch):
    column = plain_column(draw, batch)
    if column is None:
        return
    array = batch[column]
    if array.ndim:
        batch[column] = np.repeat(array, 2, axis=0)[::2]  # same values, a non-contiguous view


MUTATIONS = [
    mutate_value,
    mutate_value,
    mutate_extreme,
    mutate_extreme,
    mutate_dtype,
    mutate_dtype,
    mutate_shape,
    mutate_drop,
    mutate_extra,
    mutate_extra,
    mutate_empty,
    mutate_rows,
    mutate_masked,
    mutate_torch,
    mutate_torch,
    mutate_list,
    mutate_strided,
]


# For two learners: more finite extremes, so more updates fail inside the learners (on one shard).
PAIR_MUTATIONS = [
    mutate_extreme,
    mutate_extreme,
    mutate_extreme,
    mutate_value,
    mutate_rows,
    mutate_masked,
    mutate_torch,
    mutate_dtype,
    mutate_extra,
]


@st.composite
def mutated_batches(draw, mutations=tuple(MUTATIONS)):
    batch = ppo_batch(rows=ROWS, seed=draw(st.integers(0, 3)))
    for mutation in draw(st.lists(st.sampled_from(mutations), min_size=0, max_size=3)):
        mutation(draw, batch)
    layout = draw(st.sampled_from(["flat", "flat", "flat", "multi", "unknown_module", "mixed"]))
    if layout == "multi":
        return {DEFAULT_MODULE_ID: batch}
    if layout == "unknown_module":
        return {"nobody": batch}
    if layout == "mixed":
        return {DEFAULT_MODULE_ID: batch, **batch}
    return batch


# ------------------------------------------------------------------------------------ oracles
def make_learner(env):
    config = PPOConfig().training(minibatch_size=8, num_epochs=1).rl_module(model_config=TINY_MODEL).debugging(seed=0)
    learner = config.build_learner(env=env)
    learner.build()
    learner.update(ppo_batch(rows=ROWS, seed=9))  # optimizer state, counters and KL coefficient in play
    return learner


def flat_state(learner):
    """Weights, optimizer state, counters, RNG and KL coefficient as ``{path: value}``."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        else:
            out[prefix] = value

    walk("", learner.get_state())
    return out


def assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value, err_msg=key)
        else:
            assert after[key] == value or (value != value and after[key] != after[key]), key


def holds_non_finite_float32(batch) -> bool:
    """Whether any float value of the batch (masked or not) is NaN/inf once in float32, the dtype the
    learner computes in: validation must refuse such a batch itself, before the update starts."""
    columns = [c for v in batch.values() for c in (v.values() if isinstance(v, dict) else [v])]
    for column in columns:
        if isinstance(column, torch.Tensor):
            column = column.float().numpy() if column.is_floating_point() else column.numpy()
        array = np.ma.getdata(column) if isinstance(column, np.ma.MaskedArray) else np.asarray(column)
        if array.dtype.kind == "f":
            with np.errstate(over="ignore"):
                if not np.isfinite(array.astype(np.float32)).all():
                    return True
    return False


def assert_all_finite(learner):
    for key, value in flat_state(learner).items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), f"{key} is not finite after an accepted update"


@pytest.fixture(scope="module")
def env():
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    yield env
    env.close()


@pytest.fixture(scope="module")
def learner_and_snapshot(env):
    learner = make_learner(env)
    return learner, learner.take_snapshot()


@FUZZ_SETTINGS
@given(batch=mutated_batches())
def test_any_batch_trains_on_finite_numbers_or_is_refused_changing_nothing(learner_and_snapshot, batch):
    learner, start = learner_and_snapshot
    learner.restore_snapshot(start)
    before = flat_state(learner)
    try:
        learner.update(batch)
    except (ValueError, TypeError) as error:
        event(f"refused: {type(error).__name__}")  # shown by pytest --hypothesis-show-statistics
        assert_unchanged(before, flat_state(learner))
        if isinstance(error, NonFiniteUpdateError):
            assert not holds_non_finite_float32(batch), "validation let a non-finite value through to the update"
    else:
        event("trained")
        assert_all_finite(learner)


# ------------------------------------------------------------------------------- two learners
class GlooPair:
    """Two learners in threads of this process, joined by a real gloo group, fed as a LearnerGroup
    feeds its actors: the driver validates the whole batch, shards it, each learner updates its shard."""

    def __init__(self, env):
        self.learners = [make_learner(env) for _ in range(2)]
        self.specs = batch_specs_for(PPOTorchLearner, self.learners[0].module_spec)
        store = torch.distributed.HashStore()

        def connect(rank):
            options = torch.distributed.ProcessGroupGloo._Options()
            options._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._timeout = datetime.timedelta(seconds=30)
            group = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("fuzz", store), rank, 2, options)
            self.learners[rank].set_collective(TorchCollective.from_process_group(group))

        self.run(connect)
        self.snapshots = [learner.take_snapshot() for learner in self.learners]

    @staticmethod
    def run(fn):
        outcomes = [None, None]

        def call(rank):
            try:
                outcomes[rank] = ("ok", fn(rank))
            except BaseException as error:  # noqa: BLE001 - every rank's outcome is checked by the test
                outcomes[rank] = ("error", error)

        threads = [threading.Thread(target=call, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert None not in outcomes, "a learner hung: the two learners disagreed about the update"
        return outcomes


@pytest.fixture(scope="module")
def gloo_pair(env):
    return GlooPair(env)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=mutated_batches(tuple(PAIR_MUTATIONS)))
def test_two_learners_train_alike_or_both_refuse_changing_nothing(gloo_pair, batch):
    for learner, snapshot in zip(gloo_pair.learners, gloo_pair.snapshots):
        learner.restore_snapshot(snapshot)
    before = [flat_state(learner) for learner in gloo_pair.learners]
    try:
        validated = validate_batch(batch, gloo_pair.specs)  # the LearnerGroup's driver-side check
    except (ValueError, TypeError):
        event("refused by the driver")
        return  # refused before anything was sent
    shards = shard_batch(validated, 2)
    outcomes = gloo_pair.run(lambda rank: gloo_pair.learners[rank].update(shards[rank][0], shard=shards[rank][1]))
    kinds = [kind for kind, _ in outcomes]
    event(f"learners: {kinds[0]}")
    if kinds == ["ok", "ok"]:
        for learner in gloo_pair.learners:
            assert_all_finite(learner)
        assert_unchanged(*[flat_state(learner) for learner in gloo_pair.learners])  # still identical
    else:
        assert kinds == ["error", "error"], outcomes
        assert not holds_non_finite_float32(batch), "the driver's validation let a non-finite value through"
        for (_, error), learner, state in zip(outcomes, gloo_pair.learners, before):
            assert isinstance(error, NonFiniteUpdateError), error
            assert_unchanged(state, flat_state(learner))
