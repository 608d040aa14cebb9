"""The asynchronous training loop behind IMPALA's and APPO's ``algo.train()``.

Three things run at once: the env runners sample rollout fragments, the learners update on earlier
fragments, and the driver keeps the books between them::

    env runners --(fragment references)--> bounded queue --(shard references)--> learners
      (keep the fragments)  <------- each learner fetches its shard ---------------+
         ^  |                                                                       |
         |  +-- pull weights version k from rank 0 (the driver names k) ------------+
         +------------ (weights version k, where it is kept), every broadcast_interval updates

* **The driver out of the data path.** With Dask learners and Dask env runners (``fragment_refs``),
  a runner keeps what it samples (:class:`~dlearner.backends.dask.fragments.FragmentStore`) and replies with
  fragment ids and bookkeeping; the driver queues :class:`FragmentRef` objects, and for an update
  sends each learner its shard's ids and row ranges with its layout (:func:`fragment_shards`, the
  very shard and ``ShardInfo`` that ``shard_batch`` would cut from the columns). Learners fetch
  from the runners' workers (``learner_ops.update_from_fragment_refs``). Runners forget fragments
  when the next sample request says their update ended or they were dropped. A runner that is lost
  takes its fragments with it: queued ones are dropped, an update that needed one fails before it
  changed anything (``FragmentsLostError``), and both count in ``num_env_steps_dropped_lifetime``.
  Otherwise (a local learner or env runner, or a ``policies_to_train`` function, which looks at the
  fragments) the fragments come to the driver with each sample reply and go to ``update_async``.
* **The weights out of the data path too** (``weights_refs``, whenever fragments stay on the
  runners). Every ``broadcast_interval``-th update request also has learner rank 0 keep its weights
  after the update as version ``k`` (``learner_ops.keep_weights``, in the same request; the newest
  few versions are kept); nothing but the update's result comes back. A runner's next sample request carries a
  :class:`~dlearner.backends.dask.fragments.WeightsRef` (worker, learner key, ``k``); the runner pulls version
  ``k`` from that learner (``LearnerActor.kept_weights``, served from its event loop, never behind
  an update) before it samples, unless it has it already, and says which version it sampled with.
  If the pull fails (that learner was lost or replaced), the runner samples with the weights it
  had, the driver logs it, counts the fragments' policy lag from the version they really had
  (``num_weights_pulls_failed_lifetime``) and names newer weights with a later request.

* **Sampling never waits for learning.** Each env runner always has one ``sample_async`` request
  in flight; when it returns, the next one goes out at once. Newer weights (or their reference)
  travel *with* that next request (the runner loads them, then samples), so a broadcast never
  stops a runner.
* **A bounded queue.** Fragments (or their references) wait in the driver for the learners; at most
  ``learner_queue_size`` train batches of them, counted in env steps (including the steps still
  being sampled). When it is full, the next sample request waits: samples are never dropped to make
  room. Samples are only discarded when a restore replaces the weights that sampled them (or a
  module change leaves their module untrained), and then they are counted in
  ``num_env_steps_dropped_lifetime``.
* **Updates are futures.** A train batch goes to ``learner_group.update_async`` as soon as one is
  ready and fewer than ``max_requests_in_flight_per_learner`` updates are in flight (so the learners
  always have the next batch waiting). Rows are whole fragments, and with N learners a multiple of N
  fragments of each module, so every learner's shard is whole fragments (V-trace needs them in time
  order); see :func:`select_train_batch`.
* **Multi-agent.** A fragment is one agent slot's ``rollout_fragment_length`` consecutive rows (a
  segment of the multi-agent env runner), standing for ``sum(env_step_share)`` env steps; train
  batches are ``{module_id: {column: array}}`` with ``loss_mask`` (padding rows train nothing).
  Fragments of modules that ``policies_to_train`` leaves out are sampled (they act) but never queued.
  ``train_batch_size`` and ``num_env_steps_trained_lifetime`` count env steps, not agent rows.
* **Weights versions and policy lag.** The weights after ``k`` updates are version ``k``. After every
  ``broadcast_interval``-th update request, the weights are fetched (or kept on rank 0) by a request
  queued on the learners behind it (so they are exactly version ``k``, and fetching them never
  blocks the driver). A fragment remembers the version its runner sampled with; when it is trained in update
  ``u`` (the ``u``-th request, learning from the weights after ``u`` updates), its policy lag is ``u - version``.

One ``train()`` call (:meth:`AsyncPipeline.run_iteration`) runs this loop for ``min_time_s_per_iteration``
seconds (5 by default, so that each progress line, metrics line and dashboard point of a long run
stands for real work), or, when that is ``None``, until ``train_batch_size`` new env steps were
trained on, and returns the mean of its updates' results. Sample requests stay in flight between calls: the runners
go on sampling while the caller looks at the results.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import math
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dlearner.backends.dask.fragments import WeightsRef
from dlearner.batch import ShardInfo, shard_bounds
from dlearner.columns import ALL_MODULES, DEFAULT_MODULE_ID, TIMESTEP_KEY, Columns
from dlearner.errors import EnvRunnerDiedError, LearnerDiedError
from dlearner.multi_agent.trajectories import ENV_STEP_SHARE

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Fragment:
    """``rollout_fragment_length`` consecutive steps of one vector env (single-agent) or of one agent
    slot (multi-agent), waiting for the learners: its columns, or (with remote learners and env
    runners) a reference to it on its env runner."""

    columns: Optional[Dict[str, np.ndarray]]
    weights_version: int
    runner: int = 0  # index of the env runner that sampled it
    module_id: str = DEFAULT_MODULE_ID  # the module it trains
    env_steps: float = 0.0  # the env steps its rows stand for: its rows, or (multi-agent) sum(env_step_share)
    ref: Optional["FragmentRef"] = None  # where it waits, when it stays on its env runner


@dataclasses.dataclass(frozen=True)
class FragmentRef:
    """A fragment kept by its env runner (see :class:`~dlearner.backends.dask.fragments.FragmentStore`)."""

    runner_key: str  # the runner's actor key (a replacement runner has another)
    worker: str  # the runner's worker address
    fragment_id: int
    rows: int
    loss_mask: Optional[np.ndarray] = None  # multi-agent: which rows are padding (the learners need the global mask)


def fragment_shards(fragments: Sequence[_Fragment], world: int) -> List[Tuple[Dict[str, str], Dict[str, list], ShardInfo]]:
    """Each of ``world`` learners' ``(sources, pieces, ShardInfo)`` for a train batch of referenced
    fragments (queue order): exactly the shards and layouts that :func:`dlearner.batch.shard_batch`
    (``ShardInfo.whole`` for one learner) makes of the batch the fragments' columns would form.

    ``pieces[module_id]`` lists ``(runner key, fragment id, start, stop)``: the rows of each fragment
    in the shard, in order; ``sources`` maps the runner keys to their workers. The pipeline's batches
    are whole fragments, a multiple of ``num_learners`` per module, so with that many learners every
    piece is a whole fragment; a fault-tolerant group that runs with fewer learners for a while gets
    the same row ranges as ``shard_batch`` would give it.
    """
    by_module: Dict[str, List[FragmentRef]] = {}
    for fragment in fragments:
        by_module.setdefault(fragment.module_id, []).append(fragment.ref)
    sources = {ref.runner_key: ref.worker for refs in by_module.values() for ref in refs}
    global_rows = {mid: sum(ref.rows for ref in refs) for mid, refs in by_module.items()}
    loss_masks = {
        mid: np.concatenate([ref.loss_mask for ref in refs]) for mid, refs in by_module.items() if refs[0].loss_mask is not None
    }
    bounds = shard_bounds(global_rows, world)  # the very bounds shard_batch uses
    shards = []
    for rank in range(world):
        pieces: Dict[str, list] = {}
        offsets: Dict[str, int] = {}
        for mid, refs in by_module.items():
            lo, hi = int(bounds[mid][rank]), int(bounds[mid][rank + 1])
            offsets[mid] = lo
            start = 0  # the fragment's first row in the module's batch
            for ref in refs:
                first, last = max(lo, start), min(hi, start + ref.rows)
                if first < last:
                    pieces.setdefault(mid, []).append((ref.runner_key, ref.fragment_id, first - start, last - start))
                start += ref.rows
        used = {key: sources[key] for mid_pieces in pieces.values() for key, _, _, _ in mid_pieces}
        shards.append(
            (used, pieces, ShardInfo(row_offsets=offsets, global_rows=dict(global_rows), global_loss_masks=dict(loss_masks)))
        )
    return shards


def select_train_batch(fragments: Sequence[Tuple[str, float]], train_batch_size: float, num_shards: int) -> Optional[List[int]]:
    """The queue positions (ascending) of the fragments that make the next train batch, or ``None``
    when the queued fragments cannot make one yet.

    ``fragments`` describes the queue oldest first, each fragment as ``(module_id, env_steps)``. The
    batch is the oldest ``k_m`` fragments of each module ``m``, every ``k_m`` a multiple of
    ``num_shards`` (so each learner's shard holds whole fragments of every module), taken from the
    shortest front of the queue whose fragments, so rounded down per module, hold at least
    ``train_batch_size`` env steps. Everything else stays queued, in order.

    Example (two learners; ``p1``'s third fragment waits for a fourth)::

        select_train_batch([("p0", 5), ("p1", 5), ("p1", 5), ("p0", 5), ("p1", 5)], 20, 2)  # -> [0, 1, 2, 3]
    """
    positions: Dict[str, List[int]] = {}
    open_group_steps: Dict[str, float] = {}  # env steps of each module's fragments not yet in a whole group
    whole_group_steps = 0.0  # env steps of the whole groups of num_shards fragments seen so far
    for position, (module_id, env_steps) in enumerate(fragments):
        taken = positions.setdefault(module_id, [])
        taken.append(position)
        open_group_steps[module_id] = open_group_steps.get(module_id, 0.0) + float(env_steps)
        if len(taken) % num_shards == 0:
            whole_group_steps += open_group_steps.pop(module_id)
            if whole_group_steps >= train_batch_size:
                return sorted(p for taken in positions.values() for p in taken[: len(taken) - len(taken) % num_shards])
    return None


@dataclasses.dataclass
class _Update:
    """An update request in flight."""

    future: Any  # resolves to the reduced result dict (a distributed.Future for Dask learners)
    done: concurrent.futures.Future  # set when ``future`` finished, whatever its kind
    index: int  # the u-th request: it learns from the weights after u updates
    env_steps: float  # the env steps its fragments stand for (single-agent: its rows)
    lags: np.ndarray  # policy lag of each fragment in it
    refs: Tuple[FragmentRef, ...] = ()  # its fragments, when they stay on their env runners


class AsyncPipeline:
    """Env runners, a bounded queue and learner futures, run for IMPALA and APPO by :meth:`run_iteration`.

    Built by the algorithm (``algo.pipeline``); works with any ``num_learners`` and ``num_env_runners``
    (with 0 env runners the driver samples between looking after the learners' futures).
    """

    def __init__(self, algo: Any, *, fragment_refs: Optional[bool] = None, weights_refs: Optional[bool] = None):
        """``fragment_refs``: whether fragments stay on the env runners and the learners fetch them
        (``None``: whenever both are Dask actors and ``policies_to_train`` is not a function, which
        sees the fragments' columns; ``False``: the driver receives every fragment, as a local learner does).
        ``weights_refs``: whether the env runners pull new weights from learner rank 0 instead of
        receiving them from the driver (``None``: whenever fragments stay on the runners; needs that)."""
        self.algo = algo
        config = algo.config
        self.config = config
        self.fragment_length = int(config.rollout_fragment_length)
        self.multi_agent = bool(algo.is_multi_agent)
        # The columns of a fragment the learners train on: what the configured learner requires (and,
        # multi-agent, which rows are padding).
        self.train_columns = tuple(config.get_learner_class().required_columns)
        if self.multi_agent:
            self.train_columns += (Columns.LOSS_MASK,)
        self.num_shards = max(1, int(config.num_learners))
        # Env steps one sample request makes: each of the runner's envs steps fragment_length times.
        self.steps_per_request = self.fragment_length * int(config.num_envs_per_env_runner)
        # Single-agent: whole fragments, a multiple of the learner count, at least train_batch_size rows.
        fragments = -(-int(config.train_batch_size) // self.fragment_length)
        self.fragments_per_batch = -(-fragments // self.num_shards) * self.num_shards
        # In env steps (multi-agent fragments stand for fewer env steps than rows): a single-agent
        # batch is exactly fragments_per_batch * fragment_length of them, a multi-agent one about as many.
        self.queue_capacity = int(config.learner_queue_size) * self.fragments_per_batch * self.fragment_length
        self.max_updates_in_flight = config.resolved_max_requests_in_flight()
        if self.multi_agent:
            _check_some_module_trains(algo)
        refs_possible = (
            not algo.learner_group.is_local
            and hasattr(algo.env_runner_group, "sample_fragment_refs_async")
            and not callable(config.policies_to_train)
        )
        if fragment_refs and not refs_possible:
            raise ValueError(
                "fragment_refs=True needs Dask learners and Dask env runners, and a policies_to_train that is not a function."
            )
        #: Whether fragments stay on the env runners (the driver handles references only).
        self.fragment_refs = refs_possible if fragment_refs is None else bool(fragment_refs)
        if weights_refs and not self.fragment_refs:
            raise ValueError("weights_refs=True needs fragment references (Dask learners and env runners).")
        #: Whether the runners pull new weights from the learner that keeps them (the driver sends a WeightsRef).
        self.weights_refs = self.fragment_refs if weights_refs is None else bool(weights_refs)
        self._weights_ref: Optional[WeightsRef] = None  # the newest weights the runners pull, with weights_refs
        # Fragment ids each runner (by actor key) may forget: sent with its next sample request.
        self._releasable: Dict[str, List[int]] = {}

        self._queue: Deque[_Fragment] = collections.deque()
        # sample future -> (runner index, weights version it samples with, the version the runner had before)
        self._sampling: Dict[Any, Tuple[int, int, int]] = {}
        self._stale_samples: set = set()  # futures whose samples a restore made obsolete
        self._runner_versions = [0] * algo.env_runner_group.num_runners
        self._updates: Deque[_Update] = collections.deque()
        # (future, weights version, learner_group.num_updates_retried when it was sent, where the
        # weights are kept: (worker, learner actor key) with weights_refs, else None)
        self._weights_fetches: List[Tuple[Any, int, int, Optional[Tuple[str, str]]]] = []
        self._num_updates_received = 0
        # With learner fault tolerance, a lost learner costs at most the updates in flight (they are
        # retried), never the run: a weights fetch it broke or made stale is skipped.
        self._learners_restart = bool(config.restart_failed_learners)
        self._weights: Optional[Dict[str, Any]] = None
        self._weights_version = 0
        self._num_updates_requested = 0
        self._sampled_this_iteration = 0

        self._episode_metrics: List[Dict[str, Any]] = []
        self._finished: List[Tuple[_Update, Dict[str, Any]]] = []  # updates finished outside an iteration
        self.num_env_steps_dropped_lifetime = 0
        #: Weights pulls that failed (a runner then sampled with the weights it had; see _weights_pull_failed).
        self.num_weights_pulls_failed_lifetime = 0
        self._env_steps_trained_unsaid = 0.0  # multi-agent: fractions of an env step trained, not yet counted
        self._iteration_stats: Dict[str, Any] = {}
        self._iteration_ended: Optional[float] = None  # perf_counter() when the last iteration ended
        self._lag_by_runner: List[Tuple[int, int]] = []  # (runner index, policy lag) of fragments sent to learners

    # --------------------------------------------------------------------------- one iteration
    def run_iteration(self) -> Tuple[Dict[str, Any], int]:
        """Run the loop until ``min_time_s_per_iteration`` passed (when set; else until ``train_batch_size``
        new samples were trained on), with an update finished and new samples arrived; returns ``(mean
        learner results, env steps sampled)``.

        The iteration's time (``time_this_iter_s``) is the wall-clock window since the previous
        iteration ended, not just this call: sampling and updates go on between ``train()`` calls
        (during a ``save_to_path`` too), so that window is when this iteration's work was done, and
        its throughputs are that work over that window.
        """
        start = time.perf_counter()
        window_start = start if self._iteration_ended is None else self._iteration_ended
        min_time = self.config.min_time_s_per_iteration
        finished, self._finished = self._finished, []  # updates that save_to_path waited for
        sampled = self._sampled_this_iteration = 0
        queue_lengths: List[int] = []
        while True:
            # At least one pass: samples and updates that finished while the caller was away (a save)
            # are collected here, so an iteration never ends in microseconds having sampled nothing.
            self._request_samples()
            self._request_updates()
            queue_lengths.append(len(self._queue))
            for kind, payload in self._wait():
                if kind == "sample":
                    sampled += payload
                    self._sampled_this_iteration = sampled
                elif kind == "update":
                    finished.append(payload)
            new_samples_trained = sum(update.env_steps for update, _ in finished)
            done_time = bool(min_time) and time.perf_counter() - start >= min_time
            done_samples = not min_time and new_samples_trained >= self.config.train_batch_size
            if (done_time or done_samples) and finished and sampled > 0:
                break
        self._iteration_ended = time.perf_counter()
        elapsed = self._iteration_ended - window_start
        results = [result for _, result in finished]
        trained = sum(self._env_steps_trained(update, result) for update, result in finished)
        all_lags = np.concatenate([update.lags for update, _ in finished])
        self._iteration_stats = {
            "policy_lag_mean": float(all_lags.mean()),
            "policy_lag_max": int(all_lags.max()),
            "num_env_steps_dropped_lifetime": self.num_env_steps_dropped_lifetime,
            "num_weights_pulls_failed_lifetime": self.num_weights_pulls_failed_lifetime,
            "time_this_iter_s": elapsed,
            "num_env_steps_trained_throughput": trained / elapsed if elapsed > 0 else float("nan"),
            "num_learner_updates": len(results),
            "learner_queue_fragments_mean": float(np.mean(queue_lengths)) if queue_lengths else 0.0,
            "weights_version": self._weights_version,
            "policy_lag_mean_by_runner": self._pop_lag_by_runner(),
        }
        return mean_results(results), sampled

    def _pop_lag_by_runner(self) -> Dict[str, float]:
        """Mean policy lag of each runner's fragments sent to the learners since the last call,
        keyed like the results' ``env_runners/runners`` (the runner's worker index)."""
        per: Dict[str, List[int]] = {}
        for runner, lag in self._lag_by_runner:
            per.setdefault(str(runner + 1 if self.algo.config.num_env_runners else 0), []).append(lag)
        self._lag_by_runner = []
        return {index: float(np.mean(lags)) for index, lags in per.items()}

    def iteration_results(self) -> Dict[str, Any]:
        """Top-level result entries of the last iteration: policy lag, samples dropped, throughput."""
        return dict(self._iteration_stats)

    def pop_episode_metrics(self) -> List[Dict[str, Any]]:
        """Episode statistics that arrived with fragments since the last call (one dict per fragment request)."""
        metrics, self._episode_metrics = self._episode_metrics, []
        return metrics

    # ------------------------------------------------------------------------------- sampling
    def _queued_and_sampling(self) -> float:
        """Env steps in the queue plus those the requests in flight will bring."""
        return sum(f.env_steps for f in self._queue) + self.steps_per_request * len(self._sampling)

    def _queue_full(self) -> bool:
        """Whether sampling waits for the learners to take a batch."""
        if self._queued_and_sampling() < self.queue_capacity:
            return False
        # Multi-agent queues may hold fragments that make no batch yet (a module short of a multiple
        # of num_shards fragments); waiting on them with nothing in flight would wait forever.
        return bool(self._sampling) or self._next_batch() is not None

    def _request_samples(self) -> None:
        """Give every idle runner a sample request, with the newest weights if it lacks them,
        while the queue has room (a full queue makes sampling wait, never drop)."""
        busy = {entry[0] for entry in self._sampling.values()}
        group = self.algo.env_runner_group
        for index in range(group.num_runners):
            if index in busy:
                continue
            if self._queue_full():
                return  # full: this runner waits until the learners took a batch
            weights: Any = None
            had = self._runner_versions[index]
            if self._runner_versions[index] < self._weights_version:
                # The weights themselves, or (weights_refs) where the runner pulls them from.
                weights = self._weights_ref if self._weights_ref is not None else self._weights
                if weights is not None:
                    self._runner_versions[index] = self._weights_version
            if self.fragment_refs:
                release = self._releasable.pop(group.fragment_source(index)[0], [])
                future = group.sample_fragment_refs_async(
                    index, self.steps_per_request, columns=self.train_columns, weights=weights, release=release
                )
            else:
                future = group.sample_async(index, self.steps_per_request, weights=weights)
            self._sampling[future] = (index, self._runner_versions[index], had)

    def _receive_sample(self, future: Any) -> int:
        index, version, had = self._sampling.pop(future)
        group = self.algo.env_runner_group
        lost_key = group.fragment_source(index)[0] if self.fragment_refs else None
        try:
            reply = future.result()
        except EnvRunnerDiedError as err:
            # With restart_failed_env_runners a replacement takes over (its lost steps are counted);
            # it gets the current weights with its first request.
            group.replace_lost(err, self.steps_per_request)
            self._stale_samples.discard(future)
            self._runner_versions[index] = -1
            if lost_key is not None:
                self._forget_runner(lost_key)
            return 0
        if self.fragment_refs:
            return self._receive_refs(future, index, version, had, *reply)
        fragment, metrics = reply
        self._episode_metrics.append(metrics)
        # The env steps the request made (a multi-agent runner steps each env fragment_length times).
        env_steps = self.steps_per_request if self.multi_agent else int(np.prod(fragment[Columns.REWARDS].shape))
        if future in self._stale_samples:
            self._stale_samples.discard(future)
            self.num_env_steps_dropped_lifetime += env_steps
            return 0
        if self.multi_agent:
            self._queue_segments(fragment, version, index)
            return env_steps
        num_envs = fragment[Columns.REWARDS].shape[1]
        for env in range(num_envs):
            # Column [:, env] is one vector env's consecutive steps: one fragment.
            columns = {c: fragment[c][:, env] for c in self.train_columns}
            self._queue.append(_Fragment(columns, version, index, env_steps=float(self.fragment_length)))
        return env_steps

    def _receive_refs(
        self,
        future: Any,
        index: int,
        version: int,
        had: int,
        described: List[Dict[str, Any]],
        metrics: Dict[str, Any],
        env_steps: int,
        weights: Dict[str, Any],
    ) -> int:
        """Queue references to the fragments a runner keeps (see :meth:`_receive_sample`)."""
        self._episode_metrics.append(metrics)
        if weights["pull_error"] is not None:
            version = self._weights_pull_failed(index, version, had, weights)
        elif weights["version"] is not None and weights["version"] != version:
            # The runner says which version it acts with (e.g. a replacement that pulled the last
            # weights itself): its fragments' policy lag counts from that one.
            version = self._runner_versions[index] = int(weights["version"])
        runner_key, worker = self.algo.env_runner_group.fragment_source(index)
        if self.multi_agent:
            env_steps = self.steps_per_request
        if future in self._stale_samples:
            self._stale_samples.discard(future)
            self.num_env_steps_dropped_lifetime += env_steps
            self._releasable.setdefault(runner_key, []).extend(d["id"] for d in described)
            return 0
        if self.multi_agent:
            # As _queue_segments: fragments of removed modules and of those policies_to_train leaves out
            # are not queued (and their runner may forget them).
            by_module: Dict[str, List[Dict[str, Any]]] = {}
            for d in described:
                by_module.setdefault(d["module_id"], []).append(d)
            known = {mid: by_module[mid] for mid in by_module if mid in self.algo.module_spec.rl_module_specs}
            trained = self.algo.modules_to_train(known) if known else []
            described = [d for mid in trained for d in by_module[mid]]
            left_out = [d["id"] for mid, ds in by_module.items() if mid not in trained for d in ds]
            self._releasable.setdefault(runner_key, []).extend(left_out)
        for d in described:
            ref = FragmentRef(runner_key, worker, int(d["id"]), int(d["rows"]), d.get("loss_mask"))
            self._queue.append(_Fragment(None, version, index, d["module_id"], float(d["env_steps"]), ref=ref))
        return env_steps

    def _weights_pull_failed(self, index: int, version: int, had: int, weights: Dict[str, Any]) -> int:
        """Runner ``index`` could not pull weights ``version`` (the learner keeping them was lost or
        replaced): it sampled with the weights it had. Returns their version (what its fragments'
        policy lag counts from); the runner gets the newest weights with a later request."""
        acted_with = had if weights["version"] is None else int(weights["version"])
        logger.warning(
            "Env runner %s could not pull weights version %s (%s); it sampled with version %s and gets newer weights later.",
            index,
            version,
            weights["pull_error"],
            acted_with,
        )
        self._runner_versions[index] = acted_with
        if self._weights_ref is not None and self._weights_ref.version == version:
            # No runner can pull these: the next broadcast names newer weights on a learner that is there.
            self._weights_ref = None
        self.num_weights_pulls_failed_lifetime += 1
        return acted_with

    def _forget_runner(self, runner_key: str) -> None:
        """A runner is gone: its queued fragments are lost (counted as dropped), its ids need no release."""
        self._drop_queued(lambda fragment: fragment.ref is not None and fragment.ref.runner_key == runner_key)
        self._releasable.pop(runner_key, None)

    def _release(self, refs: Sequence[FragmentRef]) -> None:
        for ref in refs:
            self._releasable.setdefault(ref.runner_key, []).append(ref.fragment_id)

    def _queue_segments(self, segments: Dict[str, List[Dict[str, np.ndarray]]], version: int, index: int) -> None:
        """Queue a multi-agent sample's segments (each one fragment) of the modules that train."""
        # Segments of a module removed while they were sampled cannot be trained; those of modules
        # policies_to_train leaves out must not be (they act in the env, but never change).
        known = {mid: segments[mid] for mid in segments if mid in self.algo.module_spec.rl_module_specs}
        for module_id in self.algo.modules_to_train(known) if known else ():
            for segment in segments[module_id]:
                columns = {c: segment[c] for c in self.train_columns}
                env_steps = float(segment[ENV_STEP_SHARE].sum())
                self._queue.append(_Fragment(columns, version, index, module_id, env_steps))

    # -------------------------------------------------------------------------------- learning
    def _next_batch(self) -> Optional[List[int]]:
        """Queue positions of the next train batch (see :func:`select_train_batch`), or ``None``."""
        queued = [(f.module_id, f.env_steps) for f in self._queue]
        return select_train_batch(queued, float(self.config.train_batch_size), self.num_shards)

    def _take_from_queue(self, positions: List[int]) -> List[_Fragment]:
        """Remove the fragments at ``positions`` (ascending); the others keep their order."""
        wanted = set(positions)
        taken = [f for i, f in enumerate(self._queue) if i in wanted]
        self._queue = collections.deque(f for i, f in enumerate(self._queue) if i not in wanted)
        return taken

    def _batch_of(self, fragments: List[_Fragment]) -> Dict[str, Any]:
        """The train batch: ``{column: array}`` (single-agent) or ``{module_id: {column: array}}``,
        each module's fragments one after another in queue order."""
        if not self.multi_agent:
            return {c: np.concatenate([f.columns[c] for f in fragments]) for c in self.train_columns}
        by_module: Dict[str, List[_Fragment]] = {}
        for fragment in fragments:
            by_module.setdefault(fragment.module_id, []).append(fragment)
        return {
            mid: {c: np.concatenate([f.columns[c] for f in frags]) for c in self.train_columns}
            for mid, frags in by_module.items()
        }

    def _request_updates(self) -> None:
        if self.fragment_refs:
            self._forget_lost_runners()
        while len(self._updates) < self.max_updates_in_flight:
            positions = self._next_batch()
            if positions is None:
                return
            fragments = self._take_from_queue(positions)
            index = self._num_updates_requested
            lags = np.array([index - f.weights_version for f in fragments])
            self._lag_by_runner.extend((f.runner, int(lag)) for f, lag in zip(fragments, lags))
            timesteps = {TIMESTEP_KEY: self.algo.num_env_steps_sampled_lifetime + self._sampled_this_iteration}
            refs: Tuple[FragmentRef, ...] = ()
            if self.fragment_refs:
                # The learners fetch their shards from the runners; only references leave the driver.
                refs = tuple(f.ref for f in fragments)  # type: ignore[misc]
                broadcast = (index + 1) % int(self.config.broadcast_interval) == 0
                keep = index + 1 if self.weights_refs and broadcast else None
                group = self.algo.learner_group
                # The update itself has rank 0 keep the weights after it (version index + 1) for the
                # runners to pull: one request per update, and none of it comes back but the result.
                future = group.update_from_fragment_refs_async(
                    functools.partial(fragment_shards, fragments), timesteps=timesteps, keep_weights_version=keep
                )
                if keep is not None:
                    keeper = (group.learner_workers[0], group.learner_keys[0])
                    self._weights_fetches.append((future, keep, group.num_updates_retried, keeper))
            else:
                future = self.algo.learner_group.update_async(self._batch_of(fragments), timesteps=timesteps)
            env_steps = sum(f.env_steps for f in fragments)
            self._updates.append(_Update(future, _done_signal(future), index, env_steps, lags, refs))
            self._num_updates_requested += 1
            if self._num_updates_requested % int(self.config.broadcast_interval) == 0 and not self.weights_refs:
                self._fetch_weights()

    def _forget_lost_runners(self) -> None:
        """Queued fragments of a runner known to be gone can never be fetched: drop them (counted)
        before they make an update fail; the runner is replaced when its sample request fails."""
        group = self.algo.env_runner_group
        for index in range(group.num_runners):
            if group.is_lost(index):
                self._forget_runner(group.fragment_source(index)[0])

    def _fetch_weights(self) -> None:
        """Ask rank 0 for its weights, queued behind the update just sent: exactly version ``k``
        (with ``weights_refs`` the update itself has them kept instead; see :meth:`_request_updates`)."""
        # The request travels the learners' ordered request path, like update_async, so it never
        # blocks this loop; LearnerGroup.get_weights would wait for every update in flight.
        group = self.algo.learner_group
        version = self._num_updates_requested
        try:
            future = group.get_weights_async()
        except LearnerDiedError:
            if not self._learners_restart:
                raise
            return  # every learner is gone for now; the next update replaces them
        self._weights_fetches.append((future, version, group.num_updates_retried, None))

    def _take_weights(self, future: Any, version: int, retried_before: int, keeper: Optional[Tuple[str, str]]) -> None:
        """Keep fetched weights (or, with ``weights_refs``, where the runners pull them: ``keeper``,
        the learner's worker and actor key) if they are newer than the runners'. With learner fault
        tolerance a fetch is skipped when it failed (rank 0 was lost) or when updates were retried
        since it was sent (it may have read a state the loss rolled back): a later broadcast brings
        newer weights."""
        if self._learners_restart:
            if future.exception() is not None or self.algo.learner_group.num_updates_retried != retried_before:
                return
        if keeper is not None and future.exception() is not None:
            return  # the update that was to keep them failed (e.g. its fragments were lost): none kept
        weights = future.result()
        if version > self._weights_version:
            if keeper is not None:
                self._weights_ref = WeightsRef(keeper[0], keeper[1], version)
            else:
                self._weights = weights
            self._weights_version = version

    def _weights_ready(self, future: Any, version: int) -> bool:
        # With fault tolerance, only once the update it follows was received: a retry of that update
        # (or of one before it) is counted by then.
        return future.done() and (not self._learners_restart or version <= self._num_updates_received)

    def _env_steps_trained(self, update: _Update, result: Dict[str, Any]) -> float:
        """The env steps an update trained on: the learners' row count (single-agent), or its
        fragments' env steps times the epochs (multi-agent: learners count agent rows)."""
        if not self.multi_agent:
            return float(result[ALL_MODULES].get("num_env_steps_trained", 0))
        return update.env_steps * int(self.config.num_epochs)

    def _receive_update(self, update: _Update) -> Optional[Dict[str, Any]]:
        """The update's result, counted; ``None`` when its fragments could not be fetched (a runner
        was lost): it changed nothing, and its env steps count as dropped."""
        from dlearner.backends.dask.fragments import FragmentsLostError

        try:
            result = update.future.result()
        except FragmentsLostError as err:
            self._num_updates_received += 1
            self.num_env_steps_dropped_lifetime += int(round(update.env_steps))
            for runner_key in err.runner_keys:
                self._forget_runner(runner_key)
            # The fragments of the runners still there are released like those of any update that ended.
            self._release([ref for ref in update.refs if ref.runner_key not in err.runner_keys])
            logger.warning("%s", err)
            return None
        except BaseException:
            self._release(update.refs)
            raise
        self._release(update.refs)  # trained: the runners may forget them
        self._num_updates_received += 1
        trained = self._env_steps_trained(update, result)
        if self.multi_agent:
            # Multi-agent env steps come in fractions (a row stands for 1 / the agents that acted): whole
            # ones are counted, the rest carried to the next update, so the lifetime count never drifts.
            self._env_steps_trained_unsaid += trained
            trained = math.floor(self._env_steps_trained_unsaid + 1e-3)  # float32 sums: 2.99999 is 3
            self._env_steps_trained_unsaid -= trained
            # The learners count rows (agent steps); a multi-agent run reports env steps there too.
            result[ALL_MODULES]["num_env_steps_trained"] = int(trained)
        self.algo.num_env_steps_trained_lifetime += int(trained)
        if self.multi_agent:
            result[ALL_MODULES]["num_env_steps_trained_lifetime"] = self.algo.num_env_steps_trained_lifetime
        return result

    # ---------------------------------------------------------------------------------- waiting
    def _wait(self) -> List[Tuple[str, Any]]:
        """Wait until a sample, an update or a weights fetch finished; handle everything finished."""
        fetching = [fetch[0] for fetch in self._weights_fetches if not fetch[0].done()]
        futures = list(self._sampling) + [u.done for u in self._updates] + fetching
        if not futures:
            raise RuntimeError("The async pipeline has nothing in flight; this is a bug in dlearner.")
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        events: List[Tuple[str, Any]] = []
        # Updates finish in the order they were sent.
        while self._updates and self._updates[0].done.done():
            update = self._updates.popleft()
            result = self._receive_update(update)
            if result is not None:
                events.append(("update", (update, result)))
        for fetch in [f for f in self._weights_fetches if self._weights_ready(f[0], f[1])]:
            self._weights_fetches.remove(fetch)
            self._take_weights(*fetch)
        for future in [f for f in self._sampling if f.done()]:
            events.append(("sample", self._receive_sample(future)))
        return events

    # --------------------------------------------------------------------- checkpoints and stop
    def finish_updates(self) -> None:
        """Wait for the updates in flight; their results go into the next iteration's results."""
        while self._updates:
            update = self._updates.popleft()
            result = self._receive_update(update)
            if result is not None:
                self._finished.append((update, result))
        for fetch in self._weights_fetches:
            concurrent.futures.wait([fetch[0]])
            self._take_weights(*fetch)
        self._weights_fetches = []

    def reset_after_restore(self) -> None:
        """After a restore replaced the weights: drop what the old weights sampled (counted as dropped)."""
        self._finished = []
        self._drop_queued(lambda fragment: True)
        self._stale_samples = set(self._sampling)
        # The restore synced the restored weights to every runner: they count as the weights after
        # every update so far (finish_updates ran first, so none is in flight).
        self._weights = self._weights_ref = None
        self._weights_version = self._num_updates_requested
        self._runner_versions = [self._weights_version] * len(self._runner_versions)

    def forget_untrained_modules(self) -> None:
        """After a module change: drop queued fragments of modules that were removed or that
        ``policies_to_train`` now leaves out (counted as dropped; the learners would refuse them)."""
        queued: Dict[str, List[Any]] = {}  # as a sample: {module_id: [fragment columns (or reference), ...]}
        for fragment in self._queue:
            if fragment.module_id in self.algo.module_spec.rl_module_specs:
                queued.setdefault(fragment.module_id, []).append(fragment.columns if fragment.ref is None else fragment.ref)
        trained = set(self.algo.modules_to_train(queued)) if queued else set()
        self._drop_queued(lambda fragment: fragment.module_id not in trained)

    def _drop_queued(self, drop: Callable[[_Fragment], bool]) -> None:
        """Remove the queued fragments ``drop(fragment)`` is true for; their env steps count as dropped."""
        dropped, kept = [], collections.deque()
        for fragment in self._queue:
            (dropped if drop(fragment) else kept).append(fragment)
        self._queue = kept
        self.num_env_steps_dropped_lifetime += int(round(sum(f.env_steps for f in dropped)))
        self._release([f.ref for f in dropped if f.ref is not None])

    def close(self) -> None:
        """Let the updates in flight finish (at most ``max_requests_in_flight_per_learner``), then
        forget the sample requests in flight (stopping the runners ends them)."""
        try:
            concurrent.futures.wait([u.done for u in self._updates])
        except Exception:  # noqa: BLE001 - stopping must go on; the group's shutdown reports lost learners
            pass
        self._sampling.clear()
        self._updates.clear()
        self._weights_fetches = []
        self._queue.clear()


def _check_some_module_trains(algo: Any) -> None:
    """A list ``policies_to_train`` that names none of the modules would sample forever, training nothing."""
    policies_to_train = algo.config.policies_to_train
    module_ids = sorted(algo.module_spec.rl_module_specs)
    if isinstance(policies_to_train, (list, tuple)) and not algo.modules_to_train(dict.fromkeys(module_ids)):
        raise ValueError(
            f"policies_to_train={list(policies_to_train)} names none of the modules {module_ids}, "
            "so IMPALA/APPO would sample without ever training; name at least one in .multi_agent(policies_to_train=...)."
        )


def _done_signal(future: Any) -> concurrent.futures.Future:
    """A ``concurrent.futures.Future`` that finishes with ``future`` (a ``distributed.Future`` from
    Dask learners, a ``concurrent.futures.Future`` from a local group), so one ``wait`` covers all kinds."""
    if isinstance(future, concurrent.futures.Future):
        return future
    signal: concurrent.futures.Future = concurrent.futures.Future()
    future.add_done_callback(lambda _: signal.set_result(None))
    return signal


def mean_results(results: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """One result dict from several updates': counts (``num_*``) summed, lifetime counters and
    learning rates as of the last update, everything else averaged."""
    if not results:
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    for result in results:
        for mid, metrics in result.items():
            for name, value in metrics.items():
                out.setdefault(mid, {}).setdefault(name, []).append(value)
    merged: Dict[str, Dict[str, Any]] = {}
    for mid, metrics in out.items():
        merged[mid] = {}
        for name, values in metrics.items():
            if name.endswith("_lifetime") or name.endswith("_learning_rate") or name.startswith("curr_"):
                merged[mid][name] = values[-1]
            elif name.startswith("num_"):
                merged[mid][name] = sum(values)
            else:
                merged[mid][name] = float(np.mean(values))
    return merged
