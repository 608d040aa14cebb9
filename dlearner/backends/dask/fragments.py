"""Data that stays on the worker that made it (IMPALA / APPO with Dask learners and env runners).

* **Fragments.** An env runner keeps the fragments it samples (:class:`FragmentStore`); the driver
  gets their ids and bookkeeping; each learner fetches the fragments of its shard straight from the
  runners' workers (:func:`fetch_fragment_shard`), over Dask's comms.
* **Weights.** Learner rank 0 keeps the weights of the last few versions
  (``learner_ops.keep_weights``); an env runner sent a :class:`WeightsRef` pulls that version from
  it (:func:`pull_weights`).

The driver only moves references, so its CPU and network link no longer bound the cluster's
throughput. Failures are typed: :class:`FragmentsLostError` (an update's fragments are gone with
their runner), :class:`WeightsPullError` (the runner goes on with the weights it has).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from distributed import Worker, get_worker
from distributed.core import Status
from distributed.utils import sync

from dlearner import settings
from dlearner.backends.dask.rpc import UNREACHABLE, ActorMissing, Whole, call_actor
from dlearner.errors import WeightsVersionGoneError

logger = logging.getLogger(__name__)


class FragmentsGoneError(RuntimeError):
    """An env runner was asked for fragments it does not hold (released, or never sampled by it)."""


@dataclasses.dataclass(frozen=True)
class WeightsRef:
    """Where an env runner pulls weights version ``version`` from: the learner actor ``learner_key``
    on Dask worker ``worker`` keeps it (``learner_ops.keep_weights``), so the weights never pass
    through the driver (IMPALA / APPO with Dask learners and env runners)."""

    worker: str
    learner_key: str
    version: int


# ------------------------------------------------------------------ env runners keep fragments
class FragmentStore:
    """What an env runner keeps of the fragments it sampled for the learners (IMPALA / APPO with
    remote learners): the fragments stay here, the driver gets their ids and bookkeeping, and the
    learners fetch the fragments they train on straight from this runner's worker.

    :meth:`sample_fragment_refs` samples and stores; :meth:`take_fragments` (``async``: it runs on the
    worker's event loop, never waiting behind a sample in progress on the actor thread) hands
    fragments to a learner; the driver releases them with its next sample request once their update
    ended (or when it dropped them), so a runner holds at most the fragments queued and in flight.
    Weights may come as a :class:`WeightsRef`: the runner pulls that version from the learner that
    keeps it before it samples (unless it has it already), and says which version it sampled with.
    A mixin, first among the bases of the actor class the Dask env-runner group starts
    (``dlearner.backends.dask.runner_actors``): the runner class after it provides
    ``sample_with_metrics``, ``set_weights`` and ``split_into_fragments``.
    """

    _stored_fragments: Dict[int, Dict[str, np.ndarray]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stored_fragments = {}
        self._next_fragment_id = 0
        # sample_fragment_refs runs on the actor thread, take_fragments on the worker's event loop.
        self._fragments_lock = threading.Lock()
        # The weights version this runner acts with, when it came as a WeightsRef (None: whatever the
        # driver last sent by value; the driver knows which version that was).
        self._weights_version: Optional[int] = None

    def set_weights(self, weights: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """The runner's ``set_weights``; weights sent by value carry no version of their own."""
        super().set_weights(weights)  # type: ignore[misc]
        self._weights_version = None  # weights by value: the driver knows their version

    def _keep_fragment(self, columns: Dict[str, np.ndarray]) -> int:
        with self._fragments_lock:
            fragment_id = self._next_fragment_id
            self._next_fragment_id += 1
            self._stored_fragments[fragment_id] = columns
        return fragment_id

    def sample_fragment_refs(
        self,
        num_timesteps: int,
        columns: Sequence[str],
        weights: "Optional[Mapping[str, Mapping[str, np.ndarray]] | WeightsRef]" = None,
        release: Iterable[int] = (),
    ) -> Tuple[List[Dict[str, Any]], Dict[str, Any], int, Dict[str, Any]]:
        """Forget the fragments ``release``, load ``weights`` (if given: the weights, or a
        :class:`WeightsRef` to pull them from a learner), sample ``num_timesteps`` and keep the
        fragments (their ``columns`` only) until released.

        Returns ``(fragments, episode metrics, env steps sampled, weights)``: per fragment, in the
        order the payload path queues them, a dict of ``id``, ``module_id``, ``rows``, ``env_steps``
        (the env steps its rows stand for) and, multi-agent, ``loss_mask`` (which rows are padding);
        ``weights`` says what the sample was made with: ``{"version": the version pulled last, or
        None when the weights came by value, "pull_error": why the pull of a WeightsRef failed (the
        runner then sampled with the weights it had), or None}``.
        """
        self.release_fragments(release)
        pull_error = None
        if isinstance(weights, WeightsRef):
            pull_error = self.load_weights_ref(weights)
            weights = None
        sample, metrics = self.sample_with_metrics(num_timesteps, weights)
        pieces, env_steps = self.split_into_fragments(sample, tuple(columns), num_timesteps)  # type: ignore[attr-defined]
        fragments = [{"id": self._keep_fragment(data), **description} for data, description in pieces]
        return fragments, metrics, env_steps, {"version": self._weights_version, "pull_error": pull_error}

    def load_weights_ref(self, ref: WeightsRef) -> Optional[str]:
        """Pull weights version ``ref.version`` from its learner and load them, unless this runner
        acts with that version already. ``None``, or why the pull failed (the learner is gone or no
        longer keeps that version): the runner then goes on with the weights it has, and says so."""
        if ref.version == self._weights_version:
            return None
        try:
            weights = pull_weights(ref)
        except WeightsPullError as err:
            logger.warning("%s", err)
            return str(err)
        self.set_weights(weights)
        self._weights_version = ref.version
        return None

    async def take_fragments(self, ids: Sequence[int]) -> Whole:
        """The stored fragments ``ids``, in that order (they stay stored: a retried update fetches
        them again), as one :class:`~dlearner.backends.dask.rpc.Whole`: the learner that called
        receives the list itself, serialized in one piece (half the CPU of Dask's array by array).
        :class:`FragmentsGoneError` names any this runner does not hold."""
        with self._fragments_lock:
            missing = [i for i in ids if i not in self._stored_fragments]
            if missing:
                raise FragmentsGoneError(
                    f"This env runner holds no fragments {missing} (released, or sampled by another runner)."
                )
            return Whole([self._stored_fragments[i] for i in ids])

    def release_fragments(self, ids: Iterable[int]) -> None:
        """Forget the fragments ``ids`` (trained, or dropped by the driver); unknown ids are ignored."""
        with self._fragments_lock:
            for fragment_id in ids:
                self._stored_fragments.pop(fragment_id, None)

    def num_stored_fragments(self) -> int:
        """Fragments held for the learners now."""
        return len(self._stored_fragments)


# ------------------------------------------------------------------------- learners fetch fragments
class FragmentsLostError(RuntimeError):
    """A learner could not fetch fragments of its update: their env runner is gone (its worker left,
    or it was replaced) or no longer holds them. The update changes nothing; the async pipeline counts
    its env steps as dropped. ``runner_keys``: the actor keys of the runners that failed."""

    def __init__(self, message: str, runner_keys: Sequence[str] = ()):
        super().__init__(message)
        self.runner_keys = list(runner_keys)

    def __reduce__(self):  # travels pickled from the learner to the driver
        return type(self), (str(self), self.runner_keys)


#: One piece of a learner's shard: rows ``[start, stop)`` of fragment ``fragment_id`` of runner ``runner_key``.
FragmentPiece = Tuple[str, int, int, int]


def fetch_fragment_shard(
    sources: Mapping[str, str], pieces: Mapping[str, Sequence[FragmentPiece]]
) -> Dict[str, Dict[str, np.ndarray]]:
    """A learner's shard, ``{module_id: {column: array}}``: each module's ``pieces`` fetched from the
    runners' workers (``sources``: actor key -> worker address; one request per runner, all at once)
    and concatenated in order. Runs on a learner's compute thread, in a Dask worker process.
    :class:`FragmentsLostError` if a runner cannot be reached or no longer holds a fragment."""
    if not pieces:
        return {}
    worker = _this_worker()
    return sync(worker.loop, fetch_fragment_shard_async, worker, sources, pieces)


async def fetch_fragment_shard_async(
    worker: Worker, sources: Mapping[str, str], pieces: Mapping[str, Sequence[FragmentPiece]]
) -> Dict[str, Dict[str, np.ndarray]]:
    """:func:`fetch_fragment_shard` on the worker's event loop: a learner actor starts it as soon as
    the update request arrives, so the fetch overlaps the update before it."""
    if not pieces:
        return {}
    wanted: Dict[str, List[int]] = {}
    for module_pieces in pieces.values():
        for runner_key, fragment_id, _, _ in module_pieces:
            ids = wanted.setdefault(runner_key, [])
            if fragment_id not in ids:
                ids.append(fragment_id)
    fetched = await _fetch_fragments(worker, {key: (sources[key], ids) for key, ids in wanted.items()})
    return assemble_shard(fetched, pieces)


def assemble_shard(
    fetched: Mapping[Tuple[str, int], Mapping[str, np.ndarray]], pieces: Mapping[str, Sequence[FragmentPiece]]
) -> Dict[str, Dict[str, np.ndarray]]:
    """``{module_id: {column: array}}``: each module's ``pieces`` (rows of the ``fetched`` fragments,
    keyed by ``(runner key, fragment id)``) concatenated in order."""
    shard: Dict[str, Dict[str, np.ndarray]] = {}
    for module_id, module_pieces in pieces.items():
        parts = [(fetched[(runner_key, fragment_id)], start, stop) for runner_key, fragment_id, start, stop in module_pieces]
        shard[module_id] = {
            column: np.concatenate([part[column][start:stop] for part, start, stop in parts]) for column in parts[0][0]
        }
    return shard


async def _fetch_fragments(
    worker: Worker, wanted: Mapping[str, Tuple[str, List[int]]]
) -> Dict[Tuple[str, int], Dict[str, np.ndarray]]:
    """``{(runner key, fragment id): columns}`` of every fragment ``wanted`` (runner key -> (worker
    address, fragment ids)), one ``take_fragments`` call per runner, concurrently, over the worker's
    pooled connections."""

    async def one(runner_key: str, address: str, ids: List[int]) -> List[Dict[str, np.ndarray]]:
        try:
            return await _call_peer(worker, address, runner_key, "take_fragments", (ids,))
        except (ActorMissing, FragmentsGoneError) + UNREACHABLE as err:
            raise FragmentsLostError(
                f"The fragments of env runner {runner_key} on Dask worker {address} are lost ({type(err).__name__}: {err}); "
                "the update they were part of is dropped.",
                [runner_key],
            ) from err

    keys = list(wanted)
    results = await asyncio.gather(*(one(key, *wanted[key]) for key in keys), return_exceptions=True)
    lost = [r for r in results if isinstance(r, BaseException)]
    if lost:
        errors = [e for e in lost if isinstance(e, FragmentsLostError)]
        if len(errors) < len(lost):
            raise next(e for e in lost if not isinstance(e, FragmentsLostError))
        raise FragmentsLostError(" ".join(str(e) for e in errors), [k for e in errors for k in e.runner_keys])
    fetched: Dict[Tuple[str, int], Dict[str, np.ndarray]] = {}
    for key, columns_list in zip(keys, results):
        for fragment_id, columns in zip(wanted[key][1], columns_list):
            fetched[(key, fragment_id)] = columns
    return fetched


# ------------------------------------------------------------------- env runners pull weights
class WeightsPullError(RuntimeError):
    """An env runner could not pull the weights a :class:`WeightsRef` names:
    the learner that keeps them is gone (its worker left, or it was replaced) or no longer keeps
    that version. The runner goes on with the weights it has."""


#: How long a pull of weights may take in all (connecting included) before the runner goes on without them.
_PULL_TIMEOUT_S = 60.0


def pull_weights(ref: WeightsRef) -> Dict[str, Dict[str, np.ndarray]]:
    """The weights ``ref`` names, ``{module_id: {name: array}}``, fetched from the learner's worker
    over this worker's comms (runs on an env runner's actor thread, in a Dask worker process).
    :class:`WeightsPullError` if the learner cannot be reached or does not keep that version."""
    worker = _this_worker()
    return sync(worker.loop, pull_weights_async, worker, ref)


async def pull_weights_async(worker: Worker, ref: WeightsRef) -> Dict[str, Dict[str, np.ndarray]]:
    """:func:`pull_weights` on the worker's event loop."""
    try:
        pull = _call_peer(worker, ref.worker, ref.learner_key, "kept_weights", (ref.version,))
        return await asyncio.wait_for(pull, _PULL_TIMEOUT_S)
    except (asyncio.TimeoutError, ActorMissing, WeightsVersionGoneError) + UNREACHABLE as err:
        raise WeightsPullError(
            f"Could not pull weights version {ref.version} from learner {ref.learner_key} on Dask worker {ref.worker} "
            f"({type(err).__name__}: {err}); this env runner samples with the weights it has."
        ) from err


async def _call_peer(worker: Worker, address: str, key: str, method: str, args: Sequence[Any]) -> Any:
    """:func:`call_actor` on the actor ``key`` of the worker at ``address``, over this ``worker``'s
    pooled connections. A worker that is gone refuses connections, which Dask retries until its (long)
    connect timeout: connecting with the short learner-group one first makes a lost peer count as
    lost within seconds."""
    comm = await worker.rpc.connect(address, timeout=settings.seconds("learner-group.connect-timeout"))
    worker.rpc.reuse(address, comm)
    return await call_actor(worker.rpc(address), key, method, args)


def _this_worker() -> Worker:
    """The Dask worker of this process (a learner's compute thread runs outside Dask's task context;
    a learner never shares its process with another worker; an env runner's actor thread is in it)."""
    try:
        return get_worker()
    except ValueError:
        pass
    running = [w for w in list(Worker._instances) if w.status == Status.running]
    if len(running) != 1:
        raise RuntimeError(
            f"Fetching fragments or weights needs the one Dask worker of this actor's process; found {len(running)} running."
        )
    return running[0]
