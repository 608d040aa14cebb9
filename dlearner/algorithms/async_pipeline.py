"""The asynchronous training loop behind IMPALA's and APPO's ``algo.train()``.

Three things run at once: the env runners sample rollout fragments, the learners update on earlier
fragments, and the driver moves data between them::

    env runners --(fragments)--> bounded queue --(train batches)--> learners (update_async)
         ^                                                              |
         +------ weights, every broadcast_interval updates -------------+

* **Sampling never waits for learning.** Each env runner always has one ``sample_async`` request
  in flight; when it returns, the next one goes out at once. Newer weights travel *with* that next
  request (the runner loads them, then samples), so a broadcast never stops a runner.
* **A bounded queue.** Fragments wait in the driver for the learners; at most
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
  ``broadcast_interval``-th update request, the weights are fetched by a request queued on the
  learners behind it (so they are exactly version ``k``, and fetching them never blocks the
  driver). A fragment remembers the version its runner sampled with; when it is trained in update
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
import math
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dlearner.columns import ALL_MODULES, DEFAULT_MODULE_ID, TIMESTEP_KEY, Columns
from dlearner.errors import EnvRunnerDiedError, LearnerDiedError
from dlearner.multi_agent.trajectories import ENV_STEP_SHARE


@dataclasses.dataclass
class _Fragment:
    """``rollout_fragment_length`` consecutive steps of one vector env (single-agent) or of one agent
    slot (multi-agent), waiting for the learners."""

    columns: Dict[str, np.ndarray]
    weights_version: int
    runner: int = 0  # index of the env runner that sampled it
    module_id: str = DEFAULT_MODULE_ID  # the module it trains
    env_steps: float = 0.0  # the env steps its rows stand for: its rows, or (multi-agent) sum(env_step_share)


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


class AsyncPipeline:
    """Env runners, a bounded queue and learner futures, run for IMPALA and APPO by :meth:`run_iteration`.

    Built by the algorithm (``algo.pipeline``); works with any ``num_learners`` and ``num_env_runners``
    (with 0 env runners the driver samples between looking after the learners' futures).
    """

    def __init__(self, algo: Any):
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

        self._queue: Deque[_Fragment] = collections.deque()
        self._sampling: Dict[Any, Tuple[int, int]] = {}  # sample future -> (runner index, weights version)
        self._stale_samples: set = set()  # futures whose samples a restore made obsolete
        self._runner_versions = [0] * algo.env_runner_group.num_runners
        self._updates: Deque[_Update] = collections.deque()
        # (future, weights version, learner_group.num_updates_retried when it was sent)
        self._weights_fetches: List[Tuple[Any, int, int]] = []
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
        busy = {index for index, _ in self._sampling.values()}
        group = self.algo.env_runner_group
        for index in range(group.num_runners):
            if index in busy:
                continue
            if self._queue_full():
                return  # full: this runner waits until the learners took a batch
            weights = None
            if self._weights is not None and self._runner_versions[index] < self._weights_version:
                weights = self._weights
                self._runner_versions[index] = self._weights_version
            future = group.sample_async(index, self.steps_per_request, weights=weights)
            self._sampling[future] = (index, self._runner_versions[index])

    def _receive_sample(self, future: Any) -> int:
        index, version = self._sampling.pop(future)
        try:
            fragment, metrics = future.result()
        except EnvRunnerDiedError as err:
            # With restart_failed_env_runners a replacement takes over (its lost steps are counted);
            # it gets the current weights with its first request.
            self.algo.env_runner_group.replace_lost(err, self.steps_per_request)
            self._stale_samples.discard(future)
            self._runner_versions[index] = -1
            return 0
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
        while len(self._updates) < self.max_updates_in_flight:
            positions = self._next_batch()
            if positions is None:
                return
            fragments = self._take_from_queue(positions)
            batch = self._batch_of(fragments)
            index = self._num_updates_requested
            lags = np.array([index - f.weights_version for f in fragments])
            self._lag_by_runner.extend((f.runner, int(lag)) for f, lag in zip(fragments, lags))
            timesteps = {TIMESTEP_KEY: self.algo.num_env_steps_sampled_lifetime + self._sampled_this_iteration}
            future = self.algo.learner_group.update_async(batch, timesteps=timesteps)
            env_steps = sum(f.env_steps for f in fragments)
            self._updates.append(_Update(future, _done_signal(future), index, env_steps, lags))
            self._num_updates_requested += 1
            if self._num_updates_requested % int(self.config.broadcast_interval) == 0:
                self._fetch_weights()

    def _fetch_weights(self) -> None:
        """Ask rank 0 for its weights, queued behind the update just sent: exactly version ``k``."""
        # The request travels the learners' ordered request path, like update_async, so it never
        # blocks this loop; LearnerGroup.get_weights would wait for every update in flight.
        group = self.algo.learner_group
        try:
            future = group.get_weights_async()
        except LearnerDiedError:
            if not self._learners_restart:
                raise
            return  # every learner is gone for now; the next update replaces them
        self._weights_fetches.append((future, self._num_updates_requested, group.num_updates_retried))

    def _take_weights(self, future: Any, version: int, retried_before: int) -> None:
        """Keep fetched weights if they are newer than the runners'. With learner fault tolerance a
        fetch is skipped when it failed (rank 0 was lost) or when updates were retried since it was
        sent (it may have read a state the loss rolled back): a later broadcast brings newer weights."""
        if self._learners_restart:
            if future.exception() is not None or self.algo.learner_group.num_updates_retried != retried_before:
                return
        weights = future.result()
        if version > self._weights_version:
            self._weights, self._weights_version = weights, version

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

    def _receive_update(self, update: _Update) -> Dict[str, Any]:
        result = update.future.result()
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
        fetching = [f for f, _, _ in self._weights_fetches if not f.done()]
        futures = list(self._sampling) + [u.done for u in self._updates] + fetching
        if not futures:
            raise RuntimeError("The async pipeline has nothing in flight; this is a bug in dlearner.")
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        events: List[Tuple[str, Any]] = []
        # Updates finish in the order they were sent.
        while self._updates and self._updates[0].done.done():
            update = self._updates.popleft()
            events.append(("update", (update, self._receive_update(update))))
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
            self._finished.append((update, self._receive_update(update)))
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
        self._weights = None
        self._weights_version = self._num_updates_requested
        self._runner_versions = [self._weights_version] * len(self._runner_versions)

    def forget_untrained_modules(self) -> None:
        """After a module change: drop queued fragments of modules that were removed or that
        ``policies_to_train`` now leaves out (counted as dropped; the learners would refuse them)."""
        queued: Dict[str, List[Dict[str, np.ndarray]]] = {}  # as a sample: {module_id: [fragment columns, ...]}
        for fragment in self._queue:
            if fragment.module_id in self.algo.module_spec.rl_module_specs:
                queued.setdefault(fragment.module_id, []).append(fragment.columns)
        trained = set(self.algo.modules_to_train(queued)) if queued else set()
        self._drop_queued(lambda fragment: fragment.module_id not in trained)

    def _drop_queued(self, drop: Callable[[_Fragment], bool]) -> None:
        """Remove the queued fragments ``drop(fragment)`` is true for; their env steps count as dropped."""
        dropped, kept = [], collections.deque()
        for fragment in self._queue:
            (dropped if drop(fragment) else kept).append(fragment)
        self._queue = kept
        self.num_env_steps_dropped_lifetime += int(round(sum(f.env_steps for f in dropped)))

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
