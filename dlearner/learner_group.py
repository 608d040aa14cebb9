"""LearnerGroup: one local Learner, or N data-parallel Learner actors on Dask, behind one API.

Example::

    import gymnasium as gym
    from dlearner import PPOConfig

    config = PPOConfig().learners(num_learners=2).rl_module(model_config={"fcnet_hiddens": [64, 64]})
    with config.build_learner_group(env=gym.make("CartPole-v1")) as learner_group:
        results = learner_group.update(batch, timesteps={"num_env_steps_sampled_lifetime": 4000})
        future = learner_group.update_async(batch)       # a distributed.Future
        print(future.result()["default_policy"]["total_loss"])

The group validates a batch in the driver (a bad batch raises here, before any learner sees it, so
no learner ever enters a collective that another skips), splits it into one shard per learner and
sends each shard straight to its learner; the learners average gradients among themselves and all
return the same reduced result, of which the group returns one. It knows nothing about algorithms:
anything algorithm-specific lives in the Learner class. Where the learners run is a
:class:`~dlearner.backends.interface.LearnerPool`: :mod:`dlearner.backends.local` (one learner in
this process) or :mod:`dlearner.backends.dask` (actors on a cluster); ``docs/cluster.md`` explains
the Dask side.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from dlearner import learner_ops
from dlearner.backends.local import first_value
from dlearner.batch import MultiBatch, ShardInfo, shard_batch, validate_batch
from dlearner.columns import COMPONENT_LEARNER
from dlearner.errors import LearnerDiedError
from dlearner.learner import batch_specs_for, trainable_modules, validate_timesteps
from dlearner.rl_module import MultiRLModuleSpec, RLModuleSpec, validate_module_id
from dlearner.validation import non_negative_int, positive_int

if TYPE_CHECKING:
    from dlearner.backends.dask.cluster import ClusterConnection
    from dlearner.backends.interface import LearnerPool

ResultDict = Dict[str, Dict[str, Any]]

__all__ = ["LearnerGroup"]


@dataclasses.dataclass(frozen=True)
class _UpdateRequest:
    """A validated update, before it is split into one shard per learner."""

    batch: MultiBatch
    timesteps: Dict[str, Any]
    options: Dict[str, Any]


@dataclasses.dataclass
class _AsyncRequest:
    future: concurrent.futures.Future  # resolves to the list of per-learner values
    report: bool  # True: reported by update(async_update=True); False: an update_async future owns it


class LearnerGroup:
    """Coordinates ``config.num_learners`` learners: 0 = one local Learner, N = N Dask actors.

    Build it with ``config.build_learner_group(env=env)``. With N learners, each update's batch is
    split into N shards (one per learner), gradients are averaged over all learners every step, and
    all learners hold identical weights after every update; the result equals, to floating-point
    tolerance, that of one learner on the whole batch (batch sizes are global).

    Async updates: ``update(batch, async_update=True)`` returns at once with the results of earlier
    async requests that finished since the last call; ``update_async(batch)`` returns a
    ``distributed.Future`` (a ``concurrent.futures.Future`` for a local group). At most
    ``config.max_requests_in_flight_per_learner`` requests are in flight: a new async request
    **waits for the oldest one to finish** (nothing is dropped). Every learner runs requests in the
    order they were made.

    A LearnerGroup is used from one driver thread at a time.
    """

    def __init__(
        self,
        *,
        config: Any,
        module_spec: Union[MultiRLModuleSpec, RLModuleSpec],
        collective_timeout_s: Optional[float] = None,
        connection: Optional["ClusterConnection"] = None,
    ):
        """``collective_timeout_s`` bounds one collective call (a rank that hangs without dying;
        default: dask config ``dlearner.learner-group.collective-timeout``). ``connection``: an open
        :class:`~dlearner.backends.dask.cluster.ClusterConnection` to run on (the Algorithm shares
        its own); the group leaves it open on shutdown."""
        config.validate()
        if isinstance(module_spec, RLModuleSpec):
            from dlearner.columns import DEFAULT_MODULE_ID

            module_spec = MultiRLModuleSpec(rl_module_specs={DEFAULT_MODULE_ID: module_spec})
        self.config = config.copy()  # later changes to the caller's config do not reach a running group
        self.group_id = uuid.uuid4().hex[:8]
        self._learner_class: type = config.get_learner_class()
        self._module_spec = MultiRLModuleSpec(rl_module_specs=dict(module_spec.rl_module_specs))
        self._max_in_flight = config.resolved_max_requests_in_flight()
        self._in_flight: Deque[_AsyncRequest] = collections.deque()
        self._closed = False
        self._replay_row_batches = 0  # row batches sent by update_from_replay_buffer (numbers them)
        self._pool: Optional[LearnerPool] = None
        learner_config = config.copy_for_learner()
        if self.config.num_learners == 0:
            from dlearner.backends.local import LocalLearnerPool

            self._pool = LocalLearnerPool(learner_config, self._module_spec, self._learner_class)
            return
        if learner_config.seed is None:
            # Every learner must draw the same shuffling permutation and initial weights.
            learner_config.seed = secrets.randbits(31)
        from dlearner.backends.dask.pool import DaskLearnerPool

        self._pool = DaskLearnerPool(
            config=self.config,
            learner_config=learner_config,
            module_spec=self._module_spec,
            learner_class=self._learner_class,
            group_id=self.group_id,
            num_learners=int(self.config.num_learners),
            collective_timeout_s=collective_timeout_s,
            connection=connection,
        )

    # ------------------------------------------------------------------------------------ facts
    @property
    def num_learners(self) -> int:
        """``config.num_learners``: 0 for a local group."""
        return int(self.config.num_learners)

    @property
    def is_local(self) -> bool:
        return self.num_learners == 0

    @property
    def is_remote(self) -> bool:
        return not self.is_local

    @property
    def module_spec(self) -> MultiRLModuleSpec:
        """Specs of the learners' current modules (kept in step with add/remove_module)."""
        return self._module_spec

    @property
    def client(self):
        """The ``distributed.Client`` the learners run through (``None`` for a local group)."""
        return self._pool.client

    @property
    def dashboard_link(self) -> Optional[str]:
        return None if self.is_local else self.client.dashboard_link

    @property
    def learner_workers(self) -> List[str]:
        """The Dask worker address of each learner, by rank (empty for a local group)."""
        return list(self._pool.learner_workers)

    @property
    def learner_keys(self) -> List[str]:
        """The Dask keys of the learner actors (``learner-<rank>-<group id>``), by rank."""
        return list(self._pool.learner_keys)

    @property
    def metrics_topic(self) -> Optional[str]:
        """Dask event topic where rank 0 logs each update's results: ``client.get_events(topic)``."""
        return self._pool.metrics_topic

    @property
    def num_healthy_learners(self) -> int:
        """Learners that are alive now (1 for a local group). With fault tolerance this can be below
        ``num_learners`` for a while after a loss; without it, a loss makes the next call raise."""
        return self._pool.num_healthy_learners

    @property
    def num_learner_restarts(self) -> int:
        """Learners started to replace lost ones (or to grow back) since the group was built."""
        return self._pool.num_learner_restarts

    @property
    def num_updates_retried(self) -> int:
        """Updates (blocking or async) interrupted by a lost learner and run again on the re-formed group."""
        return self._pool.num_updates_retried

    @property
    def collective_backend(self) -> Optional[str]:
        """``"gloo"`` or ``"nccl"`` for 2+ learners, else ``None``."""
        return self._pool.backend

    def __repr__(self) -> str:
        where = "local" if self.is_local else f"{self.num_learners} Dask learners on {self.learner_workers}"
        return f"<LearnerGroup {self.group_id}: {where}{' (shut down)' if self._closed else ''}>"

    # ---------------------------------------------------------------------------------- updates
    def update(
        self,
        batch: Mapping[str, Any],
        *,
        timesteps: Optional[Mapping[str, Any]] = None,
        async_update: bool = False,
        num_epochs: Optional[int] = None,
        minibatch_size: Optional[int] = None,
        shuffle: bool = True,
    ) -> Union[ResultDict, List[ResultDict]]:
        """Train all learners on ``batch``.

        Blocking (default): returns one reduced result dict. With ``async_update=True``: sends the
        request and returns, in submission order, the results of earlier async requests that have
        finished since the last such call (possibly ``[]``). If one of those failed, its exception
        is raised by the call that reaches it (after the results before it were returned).
        ``minibatch_size`` counts rows of the whole batch, over all learners.
        """
        if not async_update:
            request = self._prepare_update(batch, timesteps, num_epochs, minibatch_size, shuffle, copy=False)
            return self._blocking_update(request)
        request = self._prepare_update(batch, timesteps, num_epochs, minibatch_size, shuffle, copy=True)
        self._wait_for_capacity()
        self._pool.ensure_ready()
        future, _ = self._pool.submit_update(
            learner_ops.update, functools.partial(self._shards, request), log_topic=self._pool.metrics_topic
        )
        self._in_flight.append(_AsyncRequest(future, report=True))
        return self._collect_finished(exclude=future)

    def update_async(
        self,
        batch: Mapping[str, Any],
        *,
        timesteps: Optional[Mapping[str, Any]] = None,
        num_epochs: Optional[int] = None,
        minibatch_size: Optional[int] = None,
        shuffle: bool = True,
    ):
        """Send an update and return a future of its reduced result dict.

        With Dask learners this is a ``distributed.Future`` (``.result()``, ``distributed.wait`` and
        ``distributed.as_completed`` work); for a local group a ``concurrent.futures.Future`` run on
        one background thread (``.result()`` and ``concurrent.futures.as_completed`` work). Counts
        towards the in-flight bound (waits while it is full). Updates run in the order they were sent.

        Example (any ``num_learners``)::

            futures = [learner_group.update_async(b) for b in batches]
            for future in futures:
                print(future.result()[ALL_MODULES]["num_env_steps_trained"])
        """
        request = self._prepare_update(batch, timesteps, num_epochs, minibatch_size, shuffle, copy=True)
        self._wait_for_capacity()
        self._pool.ensure_ready()
        pending, future = self._pool.submit_update(
            learner_ops.update, functools.partial(self._shards, request), log_topic=self._pool.metrics_topic, future=True
        )
        self._in_flight.append(_AsyncRequest(pending, report=False))
        return future

    def update_from_fragment_refs_async(
        self,
        args_for_world: Callable[[int], Sequence[tuple]],
        *,
        timesteps: Optional[Mapping[str, Any]] = None,
        keep_weights_version: Optional[int] = None,
    ) -> concurrent.futures.Future:
        """IMPALA / APPO with Dask learners and env runners: an async update whose learners fetch their
        shards straight from the env runners (the driver sends only references). ``args_for_world(n)``:
        each of ``n`` ranks' ``(sources, pieces, ShardInfo)`` (see
        :func:`dlearner.learner_ops.update_from_fragment_refs`). ``keep_weights_version``: the learner
        of rank 0 then keeps the weights after the update as that version, for env runners to pull
        (:func:`dlearner.learner_ops.keep_weights`; ``learner_workers[0]`` / ``learner_keys[0]`` say
        where). A ``concurrent.futures.Future`` of the reduced result; like :meth:`update_async`, it
        counts towards the in-flight bound and runs in order."""
        self._check_open()
        if self.is_local:
            raise ValueError("update_from_fragment_refs_async needs Dask learners: a local learner takes batches (update_async).")
        timesteps = validate_timesteps(timesteps)

        def args(world: int) -> List[tuple]:
            return [
                (*rank_args, timesteps, {}, keep_weights_version if rank == 0 else None)
                for rank, rank_args in enumerate(args_for_world(world))
            ]

        self._wait_for_capacity()
        self._pool.ensure_ready()
        pending, _ = self._pool.submit_update(learner_ops.update_from_fragment_refs, args, log_topic=self._pool.metrics_topic)
        self._in_flight.append(_AsyncRequest(pending, report=False))
        return first_value(pending)

    def update_from_replay_buffer(
        self,
        rows: Optional[Mapping[str, Any]] = None,
        *,
        num_updates: int,
        batch_size: int,
        timesteps: Optional[Mapping[str, Any]] = None,
        async_update: bool = False,
    ) -> Union[ResultDict, concurrent.futures.Future]:
        """Off-policy learners (with a replay buffer of their own, such as SAC's): add ``rows`` (a batch
        of new transitions, validated here like any batch) to every learner's buffer, then make
        ``num_updates`` updates of ``batch_size`` rows (over all learners) sampled from it.

        The rows travel once to each learner; training batches never leave the learners (see
        :mod:`dlearner.algorithms.off_policy`). Returns one reduced result dict (the updates'
        results averaged, counts summed) with ``replay_buffer_size``; with ``async_update=True`` a
        ``concurrent.futures.Future`` of it at once (learners run calls in the order they were made,
        so a ``get_weights_async()`` made next gives the weights after these updates). With fault
        tolerance a learner lost during the call is replaced with a survivor's state, buffer
        included, and the call is retried; the rows are added once.
        """
        self._check_open()  # a learner already lost is replaced (or reported) by ensure_ready() below
        if not callable(getattr(self._learner_class, "update_from_replay_buffer", None)):
            raise ValueError(
                f"{self._learner_class.__name__} has no replay buffer; update_from_replay_buffer() trains off-policy "
                "learners such as SAC's. Use update(batch) for on-policy learners."
            )
        validated = None
        if rows is not None:
            validated = validate_batch(rows, batch_specs_for(self._learner_class, self._module_spec))
            if len(validated) != 1:
                raise ValueError(f"Replay rows must be for one module, got modules {sorted(validated)}.")
            validated = next(iter(validated.values()))
        options = {
            "row_batch_id": f"{self.group_id}-{self._replay_row_batches}",
            "num_updates": non_negative_int("num_updates", num_updates),
            "batch_size": positive_int("batch_size", batch_size),
            "timesteps": validate_timesteps(timesteps),
        }
        if validated is not None:
            self._replay_row_batches += 1

        def args(world: int) -> List[tuple]:
            return [(validated, options, rank, world) for rank in range(world)]

        self._pool.ensure_ready()
        if async_update:
            self._wait_for_capacity()
            pending, _ = self._pool.submit_update(learner_ops.update_from_replay_buffer, args, log_topic=self._pool.metrics_topic)
            self._in_flight.append(_AsyncRequest(pending, report=False))
            return first_value(pending)
        call = functools.partial(
            self._pool.call, learner_ops.update_from_replay_buffer, collective=True, log_topic=self._pool.metrics_topic
        )
        try:
            return call(args(self._pool.num_learners))[0]
        except LearnerDiedError as err:
            applied, value = self._pool.recover(err)  # re-raises err without fault tolerance
            if applied:
                return value
        return call(args(self._pool.num_learners))[0]

    def drain_async_results(self) -> List[ResultDict]:
        """Wait for every async request in flight; return the results ``update(async_update=True)``
        has not reported yet, in submission order (e.g. at the end of training). A failed request
        is raised once the results submitted before it were returned."""
        self._check_open()
        concurrent.futures.wait([r.future for r in self._in_flight])
        # If a request failed, the results before it come back now and the next call raises it.
        return self._collect_finished()

    def _blocking_update(self, request: "_UpdateRequest") -> ResultDict:
        """One blocking update. With fault tolerance, a learner lost during it is replaced and the
        update is retried once on the re-formed group, unless the survivors had applied it already."""
        self._pool.ensure_ready()
        try:
            return self._pool.call(
                learner_ops.update, self._shards(request), collective=True, log_topic=self._pool.metrics_topic
            )[0]
        except LearnerDiedError as err:
            applied, value = self._pool.recover(err)  # re-raises err without fault tolerance
            if applied:
                return value
        return self._pool.call(learner_ops.update, self._shards(request), collective=True, log_topic=self._pool.metrics_topic)[0]

    def _shards(self, request: "_UpdateRequest", world: Optional[int] = None) -> List[tuple]:
        """The update's arguments for each of ``world`` learners (default: those the pool has now;
        batch sizes are global, so the same update can run on fewer or more learners)."""
        world = self._pool.num_learners if world is None else world
        if world == 1:
            # The layout says "the whole batch", so the learner never applies policies_to_train again
            # (its copy of the config may predate a change made through the group's).
            layout = dataclasses.replace(ShardInfo.whole(request.batch), validated=True)
            return [(request.batch, layout, request.timesteps, request.options)]
        # Validated in _prepare_update: the learners need not check their shards again.
        return [
            (shard, dataclasses.replace(info, validated=True), request.timesteps, request.options)
            for shard, info in shard_batch(request.batch, world)
        ]

    def _prepare_update(self, batch, timesteps, num_epochs, minibatch_size, shuffle, *, copy: bool) -> "_UpdateRequest":
        """Validate in the driver, before anything is sent or numbered."""
        self._check_open()
        validated = trainable_modules(validate_batch(batch, batch_specs_for(self._learner_class, self._module_spec)), self.config)
        if copy:
            # Async requests are serialised later: the caller may reuse its arrays in the meantime.
            validated = {mid: {c: np.array(a, copy=True) for c, a in cols.items()} for mid, cols in validated.items()}
        timesteps = validate_timesteps(timesteps)
        options: Dict[str, Any] = {}
        for name, value in (("num_epochs", num_epochs), ("minibatch_size", minibatch_size)):
            if value is not None:
                options[name] = positive_int(name, value)
        if not shuffle:
            options["shuffle"] = False
        return _UpdateRequest(validated, timesteps, options)

    def _wait_for_capacity(self) -> None:
        while True:
            self._drop_finished_unreported()
            running = [r.future for r in self._in_flight if not r.future.done()]
            if len(running) < self._max_in_flight:
                return
            concurrent.futures.wait([running[0]])  # requests finish in order: the oldest first

    def _drop_finished_unreported(self) -> None:
        # update_async requests are owned by their futures; keep only what update() must report.
        self._in_flight = collections.deque(r for r in self._in_flight if r.report or not r.future.done())

    def _collect_finished(self, exclude: Optional[concurrent.futures.Future] = None) -> List[ResultDict]:
        results: List[ResultDict] = []
        while self._in_flight and self._in_flight[0].future is not exclude and self._in_flight[0].future.done():
            request = self._in_flight[0]
            if not request.report:
                self._in_flight.popleft()
                continue
            error = request.future.exception()
            if error is not None:
                if results:
                    break  # return what finished before it; the next call raises it
                self._in_flight.popleft()
                raise error
            self._in_flight.popleft()
            results.append(request.future.result()[0])
        return results

    # ------------------------------------------------------------------------------------ state
    def get_state(
        self,
        components: Optional[Union[str, Iterable[str]]] = None,
        *,
        not_components: Optional[Union[str, Iterable[str]]] = None,
    ) -> Dict[str, Any]:
        """``{COMPONENT_LEARNER: learner_state}`` from one learner (all are identical).

        ``components`` are paths in the learner's state (``"rl_module"``, ``"optimizer"``, ...) or
        in the group's (``"learner/rl_module"``).
        """
        self._check_open()
        args = (_strip_learner_prefix(components), _strip_learner_prefix(not_components))
        rank = self._first_live_rank()
        return {COMPONENT_LEARNER: self._pool.call(learner_ops.get_state, [args], ranks=[rank])[0]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Set ``state`` (as from :meth:`get_state`) on every learner."""
        self._check_usable()
        if not isinstance(state, Mapping) or COMPONENT_LEARNER not in state:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"LearnerGroup.set_state needs {{'{COMPONENT_LEARNER}': learner_state}} as get_state() returns; got {keys}."
            )
        self._broadcast(learner_ops.set_state, (state[COMPONENT_LEARNER],))

    def get_weights(
        self, module_ids: Optional[Sequence[str]] = None, *, inference_only: bool = False
    ) -> Dict[str, Dict[str, np.ndarray]]:
        """``{module_id: {parameter name: np.ndarray}}`` of all (or the given) modules.
        ``inference_only=True``: only the weights env runners act with (e.g. SAC's policy network,
        not its Q networks; see ``RLModule.inference_only_parts``)."""
        self._check_open()
        ids = None if module_ids is None else list(module_ids)
        return self._pool.call(learner_ops.get_weights, [(ids, inference_only)], ranks=[self._first_live_rank()])[0]

    def get_weights_async(
        self, module_ids: Optional[Sequence[str]] = None, *, inference_only: bool = False
    ) -> concurrent.futures.Future:
        """A ``concurrent.futures.Future`` of :meth:`get_weights`, read after every request already
        sent (so the weights are exactly those after the last update sent) without waiting for them.
        Async algorithms use it to broadcast weights while updates are in flight."""
        self._check_open()
        ids = None if module_ids is None else list(module_ids)
        return first_value(self._pool.submit(learner_ops.get_weights, [(ids, inference_only)], ranks=[self._first_live_rank()]))

    def set_weights(self, weights: Mapping[str, Mapping[str, Any]]) -> None:
        """Set module weights on every learner (optimizer state untouched)."""
        self._check_usable()
        self._broadcast(learner_ops.set_weights, (dict(weights),))

    def foreach_learner(self, fn: Callable[..., Any], **kwargs: Any) -> List[Any]:
        """``fn(learner, **kwargs)`` on every learner, in order with the updates; results by rank.

        ``fn`` must be picklable for Dask learners (lambdas and local functions are fine).
        """
        self._check_usable()
        world = self._pool.num_learners
        return self._pool.call(learner_ops.foreach, [(fn, kwargs)] * world, result_ranks=None)

    def add_module(self, *, module_id: str, module_spec: RLModuleSpec, config_overrides: Any = None) -> MultiRLModuleSpec:
        """Add a module (and its optimizers) on every learner; returns the new specs.

        The new module starts from rank 0's randomly initialised weights on every learner.
        """
        self._check_usable()
        validate_module_id(module_id)
        if module_id in self._module_spec.rl_module_specs:
            raise ValueError(f"Module {module_id!r} already exists; remove it first or pick another id.")
        specs = self._broadcast(learner_ops.add_module, (module_id, module_spec, config_overrides), result_ranks=(0,))[0]
        if self._pool.num_learners > 1:
            weights = self._pool.call(learner_ops.get_weights, [([module_id],)], ranks=[0])[0]
            others = list(range(1, self._pool.num_learners))
            self._pool.call(learner_ops.set_weights, [(weights,)] * len(others), ranks=others, result_ranks=())
        self._module_spec = specs
        return specs

    def remove_module(self, module_id: str) -> MultiRLModuleSpec:
        """Remove a module (and its optimizers) on every learner; returns the remaining specs."""
        self._check_usable()
        if module_id not in self._module_spec.rl_module_specs:
            raise ValueError(f"Unknown module {module_id!r}; modules are {sorted(self._module_spec.rl_module_specs)}.")
        self._module_spec = self._broadcast(learner_ops.remove_module, (module_id,), result_ranks=(0,))[0]
        return self._module_spec

    def _broadcast(self, target: Callable, args: tuple, result_ranks: Optional[Sequence[int]] = ()) -> List[Any]:
        world = self._pool.num_learners
        return self._pool.call(target, [args] * world, result_ranks=result_ranks)

    # ------------------------------------------------------------------------------ checkpoints
    def save_to_path(
        self,
        path: Union[str, os.PathLike],
        *,
        metadata: Optional[Mapping[str, Any]] = None,
        storage_options: Optional[dict] = None,
    ) -> str:
        """Write the group's state as a checkpoint at ``path``; returns the path.

        ``memory://`` stores live in this process: the state comes to the driver and is written
        here. For any other path or URL, learner rank 0 writes it directly (a relative local path
        is made absolute first; on a multi-machine cluster it must be shared storage).
        ``metadata`` (JSON) is stored with it; the Algorithm keeps its counters there.
        """
        from dlearner.checkpoint import objects

        self._check_open()
        path = _normalise_path(path)
        kind = (metadata or {}).get("kind", objects.KIND_LEARNER_GROUP)
        options = dict(kind=kind, extra_metadata=metadata, storage_options=storage_options)
        if not self.is_local and path.startswith("memory://"):
            rank = self._first_live_rank()
            excluded = self._pool.call(learner_ops.checkpoint_excluded_components, [()], ranks=[rank])[0]
            state = self.get_state(not_components=excluded or None)
            objects.save_learner_group_state(state, self._module_spec, self.config, path, **options)
            saved = path
        else:
            saved = self._pool.call(learner_ops.save, [(path, options)], ranks=[self._first_live_rank()])[0]
        self._pool.checkpoint_path = saved  # a fault-tolerant group's state of last resort
        return saved

    def restore_from_path(self, path: Union[str, os.PathLike], *, storage_options: Optional[dict] = None) -> None:
        """Restore every learner from a checkpoint written by ``save_to_path`` (any ``num_learners``)."""
        self._check_usable()
        path = _normalise_path(path)
        if not self.is_local and path.startswith("memory://"):
            from dlearner.checkpoint import objects

            self.set_state(objects.load_learner_group_state(path, storage_options=storage_options))
            return
        self._broadcast(learner_ops.restore, (path, storage_options))

    # ---------------------------------------------------------------------------------- teardown
    def shutdown(self) -> None:
        """Stop the learners (after requests already sent). Clusters you brought stay running; an
        embedded cluster is closed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> "LearnerGroup":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ---------------------------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This LearnerGroup was shut down; build a new one.")

    def _check_usable(self) -> None:
        """For calls that need every learner: fail at once if one is gone."""
        self._check_open()
        error = self._pool.dead_error()
        if error is not None:
            raise error

    def _first_live_rank(self) -> int:
        ranks = self._pool.live_ranks()
        if not ranks:
            raise self._pool.dead_error()
        return ranks[0]


def _strip_learner_prefix(components):
    if components is None:
        return None
    items = [components] if isinstance(components, str) else list(components)
    out = []
    for item in items:
        if item == COMPONENT_LEARNER:
            return None
        out.append(item[len(COMPONENT_LEARNER) + 1 :] if item.startswith(COMPONENT_LEARNER + "/") else item)
    return out


def _normalise_path(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if "://" in path:
        return path
    return os.path.abspath(path)
