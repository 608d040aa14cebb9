"""What the page knows, kept in the scheduler process: one record per run, one per learner group.

:class:`MetricsStore` receives every message (training results, run status, learner-group results
and per-learner timings) and turns them into the JSON that ``/dlearner/metrics.json`` serves and
both pages draw. Liveness (is the driver still connected, is a learner actor still there) comes from
the scheduler at read time, through a :class:`Liveness`.
"""

from __future__ import annotations

import collections
import logging
import re
import statistics
import time
from typing import Any, Deque, Dict, List, Mapping, Optional, Protocol, Set, Tuple

from dlearner.callbacks import RESERVED_ENV_RUNNER_KEYS
from dlearner.columns import ALL_MODULES
from dlearner.dashboard.protocol import (
    KIND_LEARNER,
    KIND_STATUS,
    KIND_TRAIN,
    MAX_STRING,
    STATUSES,
)
from dlearner.events import EVENT_TOPIC
from dlearner.validation import is_real

logger = logging.getLogger(__name__)

#: Run ids of learner groups that no run claimed: ``learner-group-<group id>``.
GROUP_RUN_PREFIX = "learner-group-"
#: Points of a run's curve the store keeps (the newest half in full, older ones thinned; see
#: ``_Run._thin``). A point holds ~0.9 kB, so a run keeps at most ~2 MB however long it lasts (100
#: runs: 200 MB in the scheduler's process); a curve on the page is narrower than 2,000 pixels, and
#: ``metrics.jsonl`` has every iteration.
MAX_HISTORY = 2_000
#: Losses drawn on the loss curve (mean over modules), when a result has them.
LOSS_KEYS = ("total_loss", "policy_loss", "vf_loss", "entropy", "qf_loss", "alpha_loss")
#: The loss drawn per module on a multi-agent run's page.
MODULE_LOSS_KEY = "total_loss"
#: Modules a multi-agent run's per-module curves follow (the first by id): each point of the history
#: holds one return and one loss per module, so this bounds a run's memory as ``max_history`` does.
MAX_MODULE_CURVES = 10
#: Metrics logged by callbacks (``result["env_runners"]`` keys of their own) that get a curve, the
#: first by name: like :data:`MAX_MODULE_CURVES`, it bounds a run's memory.
MAX_CUSTOM_CURVES = 10
#: Per-learner timings are averaged over this many latest updates.
TIMING_WINDOW = 20
#: A run that ended this long ago is folded to one line (``?run=<id>`` still shows it in full).
FOLD_AFTER_S = 300.0
_RESTART_SUFFIX = re.compile(r"-r(\d+)$")


class Liveness(Protocol):
    """What the scheduler knows about the parts of a run (see :class:`SchedulerLiveness`)."""

    def client_connected(self, client_id: str) -> bool: ...

    def actor(self, key: str) -> Optional[Dict[str, Any]]:
        """``{"worker": address, "healthy": bool}`` for an actor task the scheduler has, else ``None``."""


class SchedulerLiveness:
    """:class:`Liveness` read from a running scheduler (dict look-ups only: cheap on any cluster)."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def client_connected(self, client_id: str) -> bool:
        return client_id in self.scheduler.clients

    def actor(self, key: str) -> Optional[Dict[str, Any]]:
        task = self.scheduler.tasks.get(key)
        if task is None:
            return None
        workers = sorted(ws.address for ws in (task.who_has or ()))
        return {"worker": workers[0] if workers else None, "healthy": task.state == "memory" and bool(workers)}


class _Learner:
    """One rank of a learner group, from its timing events."""

    def __init__(self, rank: int):
        self.rank = rank
        self.key = ""
        self.keys_seen: List[str] = []
        self.worker: Optional[str] = None
        self.device: Optional[str] = None
        self.world_size = 1
        self.updates = 0
        self.failed_updates = 0
        self.recent: Deque[Tuple[float, float, float]] = collections.deque(maxlen=TIMING_WINDOW)

    def add(self, msg: Mapping[str, Any]) -> None:
        key = str(msg.get("learner") or "")
        if key and key != self.key:
            self.key = key
            if key not in self.keys_seen:
                self.keys_seen.append(key)
        self.worker = _str_or_none(msg.get("worker")) or self.worker
        self.device = _str_or_none(msg.get("device")) or self.device
        self.world_size = int(msg.get("world_size") or 1)
        # Learners send the means of the updates since their last event (about one a second).
        self.updates += int(_num(msg.get("updates")) or 1)
        if "failed_updates" in msg:
            self.failed_updates += int(_num(msg.get("failed_updates")) or 0)
        elif not msg.get("ok", True):
            self.failed_updates += 1
        self.recent.append((_num(msg.get("waiting_s")), _num(msg.get("update_s")), _num(msg.get("allreduce_s"))))

    def to_json(self, rows_per_update: Optional[float], liveness: Optional[Liveness]) -> Dict[str, Any]:
        waiting = statistics.fmean(r[0] for r in self.recent) if self.recent else None
        update = statistics.fmean(r[1] for r in self.recent) if self.recent else None
        allreduce = statistics.fmean(r[2] for r in self.recent) if self.recent else None
        actor = liveness.actor(self.key) if liveness is not None and self.key else None
        match = _RESTART_SUFFIX.search(self.key)
        share = rows_per_update / max(1, self.world_size) if rows_per_update is not None else None
        return {
            "rank": self.rank,
            "learner": self.key,
            "worker": (actor or {}).get("worker") or self.worker,
            "device": self.device,
            # None: the page cannot tell (no scheduler to ask, as in unit tests of the store).
            "healthy": None if liveness is None else bool(actor and actor["healthy"]),
            "restarts": max(len(self.keys_seen) - 1, int(match.group(1)) if match else 0),
            "updates": self.updates,
            "failed_updates": self.failed_updates,
            "waiting_s": waiting,
            "compute_s": None if update is None else max(0.0, update - (allreduce or 0.0)),
            "allreduce_s": allreduce,
            "update_s": update,
            # The update's rows are summed over ranks; data-parallel shards are equal, so a rank's share.
            "rows_per_s": share / update if share is not None and update else None,
        }


class _Group:
    """A learner group: its learners' timings, and its own runs' loss curve when no run claims it."""

    def __init__(self, group_id: str):
        self.group_id = group_id
        self.learners: Dict[int, _Learner] = {}
        self.rows: Deque[float] = collections.deque(maxlen=TIMING_WINDOW)
        self.updated = time.time()

    def add_timing(self, msg: Mapping[str, Any], received: float) -> None:
        rank = int(msg.get("rank") or 0)
        learner = self.learners.get(rank)
        if learner is None:
            learner = self.learners[rank] = _Learner(rank)
        learner.add(msg)
        if isinstance(msg.get("rows"), (int, float)):
            self.rows.append(float(msg["rows"]))
        world_size = int(msg.get("world_size") or 1)
        for stale in [r for r in self.learners if r >= world_size]:  # the group shrank (a learner was dropped)
            del self.learners[stale]
        self.updated = received

    def learners_json(self, liveness: Optional[Liveness]) -> List[Dict[str, Any]]:
        rows = statistics.fmean(self.rows) if self.rows else None
        return [self.learners[r].to_json(rows, liveness) for r in sorted(self.learners)]

    def alive(self, liveness: Optional[Liveness]) -> bool:
        if liveness is None:
            return True
        return any((liveness.actor(learner.key) or {}).get("healthy") for learner in self.learners.values())


class _Run:
    """What the page knows about one run: latest values, status and bounded curves."""

    def __init__(self, run_id: str, kind: str, max_history: int, now: float):
        self.run_id = run_id
        self.kind = kind
        self.first_seen = now
        self.updated = now
        self.step: Optional[int] = None  # training_iteration, or the update number of learner-only runs
        self.summary: Dict[str, Any] = {}
        self.learners: Dict[str, Dict[str, Any]] = {}
        self.env_runners: Dict[str, Any] = {}
        self.num_updates = 0
        self.status: Optional[str] = None  # as published; None: the run never said
        self.status_time: Optional[float] = None
        self.error: Optional[str] = None
        self.client: Optional[str] = None
        self.groups: Set[str] = set()
        self.env_runner_keys: List[str] = []
        # Worker index -> each env runner's latest figures: an asynchronous runner may deliver
        # nothing in an iteration, and its row then shows what it delivered last, and when.
        self.runner_figures: Dict[str, Dict[str, Any]] = {}
        self._env_runner_seen: Dict[int, Set[str]] = {}
        self.algorithm: Optional[str] = None
        self.env: Optional[str] = None
        # step -> point; a dict so that a re-sent step replaces its point, thinned to max_history.
        self.history: "collections.OrderedDict[int, Dict[str, Any]]" = collections.OrderedDict()
        self.max_history = max_history
        self.stride = 1  # older points are kept at multiples of this step (see _thin)

    @property
    def axis_labels(self) -> Tuple[str, str]:
        if self.kind == KIND_TRAIN:
            return "env steps sampled", "episode return (mean)"
        return "update", "total loss (mean over modules)"

    def add_point(self, step: int, point: Dict[str, Any]) -> None:
        late = bool(self.history) and step < next(reversed(self.history))
        self.history[step] = {"step": step, **point}
        if late:  # messages may overtake each other: keep the curve in step order
            self.history = collections.OrderedDict(sorted(self.history.items()))
        if len(self.history) > self.max_history:
            self._thin()

    def _thin(self) -> None:
        """Keep the whole run's shape in at most ``max_history`` points: the newest half in full, and
        older points (but the first) only at steps that are multiples of a stride, doubled whenever
        they would fill the other half. The old part of the curve stays evenly spaced however long
        the run; ``metrics.jsonl`` has every iteration."""
        while len(self.history) > self.max_history:
            steps = list(self.history)
            for step in steps[1 : len(steps) - self.max_history // 2]:
                if step % self.stride:
                    del self.history[step]
            if len(self.history) > self.max_history:
                self.stride *= 2

    def status_now(
        self, liveness: Optional[Liveness], groups: Mapping[str, _Group]
    ) -> Tuple[str, Optional[str], Optional[float]]:
        """``(status, detail, ended)``: as published, unless the driver or the learners went away."""
        if self.status is not None and self.status != "running":
            return self.status, self.error, self.status_time
        if liveness is None:
            return "running", None, None
        if self.client is not None:
            if liveness.client_connected(self.client):
                return "running", None, None
            if self.status == "running":
                return "failed", "the driver disconnected without reporting how the run ended", self.updated
            return "ended", "the driver disconnected", self.updated
        # A learner group's own run: it runs while one of its learner actors is there.
        mine = [groups[g] for g in self.groups if g in groups]
        if mine and not any(g.alive(liveness) for g in mine):
            return "ended", "its learner actors are gone", self.updated
        return "running", None, None

    def to_json(self, groups: Mapping[str, _Group], liveness: Optional[Liveness], now: float) -> Dict[str, Any]:
        x_label, y_label = self.axis_labels
        status, detail, ended = self.status_now(liveness, groups)
        learner_rows: List[Dict[str, Any]] = []
        for group_id in sorted(self.groups):
            group = groups.get(group_id)
            if group is not None:
                learner_rows.extend(dict(row, group=group_id) for row in group.learners_json(liveness))
        return {
            "run_id": self.run_id,
            "kind": self.kind,
            "algorithm": self.algorithm,
            "env": self.env,
            "status": status,
            "error": detail,
            "ended": ended,
            "folded": ended is not None and now - ended > FOLD_AFTER_S,
            "first_seen": self.first_seen,
            "updated": self.updated,
            "step": self.step,
            "summary": self.summary,
            "learners": self.learners,
            "env_runners": self.env_runners,
            "learner_groups": sorted(self.groups),
            "learner_ranks": learner_rows,
            "env_runner_actors": self._env_runner_actors(liveness),
            "history": list(self.history.values()),
            "x_label": x_label,
            "y_label": y_label,
        }

    def _env_runner_actors(self, liveness: Optional[Liveness]) -> List[Dict[str, Any]]:
        """One row per Dask env-runner actor: its worker, whether it is there, how often it was
        replaced, and its latest figures with the iteration (and time) they are from."""
        restarts = int(self.summary.get("num_env_runner_restarts") or 0)
        out = []
        for index, key in enumerate(self.env_runner_keys):
            # A replaced runner gets ``<key>-r<n>`` (n counts the group's restarts): the newest one there
            # is the current actor. Keys seen at earlier reads count this runner's restarts.
            current = key
            if liveness is not None:
                current = next((f"{key}-r{n}" for n in range(restarts, 0, -1) if liveness.actor(f"{key}-r{n}") is not None), key)
            seen = self._env_runner_seen.setdefault(index, {key})
            seen.add(current)
            actor = liveness.actor(current) if liveness is not None else None
            # The run's results key runners by worker index: index + 1 for Dask env runners.
            figures = self.runner_figures.get(str(index + 1)) or {}
            out.append(
                {
                    "index": index,
                    "actor": current,
                    "worker": (actor or {}).get("worker"),
                    "healthy": None if liveness is None else bool(actor and actor["healthy"]),
                    "restarts": len(seen) - 1,
                    "env_steps_per_s": figures.get("env_steps_per_s"),
                    "episodes": figures.get("episodes"),
                    "policy_lag_mean": figures.get("policy_lag_mean"),
                    "figures_iteration": figures.get("iteration"),
                    "figures_time": figures.get("time"),
                }
            )
        return out


class MetricsStore:
    """The metrics of every run that published to this scheduler (lives in the scheduler process)."""

    def __init__(self, *, max_history: int = MAX_HISTORY, max_runs: int = 100):
        self.max_history = max_history
        self.max_runs = max_runs
        self.runs: Dict[str, _Run] = {}
        self.groups: Dict[str, _Group] = {}

    # ----------------------------------------------------------------------------- receiving
    def add(self, message: Any, received: Optional[float] = None) -> None:
        """Record one published message; malformed messages are logged and ignored."""
        received = received or time.time()
        if isinstance(message, Mapping) and message.get("kind") == KIND_STATUS:
            self._add_status(message, received)
            return
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("run_id"), str)
            and message.get("kind") in (KIND_TRAIN, KIND_LEARNER)
            and isinstance(message.get("result"), Mapping)
        ):
            logger.warning("Ignoring a malformed %r event: %.200r", EVENT_TOPIC, message)
            return
        run_id, kind, result = message["run_id"], message["kind"], message["result"]
        run = self._run(run_id, kind, received)
        run.updated = float(message.get("time") or received)  # the sender's clock if it has one
        run.kind = kind
        if isinstance(message.get("client"), str):
            run.client = message["client"]
        if kind == KIND_TRAIN:
            self._add_train(run, result)
        else:
            self._add_learner_update(run, result, message.get("step"))

    def add_group_result(self, group_id: str, result: Optional[Mapping[str, Any]], received: float) -> None:
        """A learner group's rank-0 update result (topic ``learner-metrics-<group id>``).

        Kept only for a group that no run claimed: a run's page shows its own curve, never its
        group's, and an asynchronous run's group updates several times a second, so its curve
        would fill ``max_history`` points that nothing reads.
        """
        if result is None or self._claimed(group_id):
            return
        run = self._run(GROUP_RUN_PREFIX + group_id, KIND_LEARNER, received)
        run.groups.add(group_id)
        run.updated = received
        self._add_learner_update(run, result, None)

    def add_timing(self, message: Any, received: float) -> None:
        """One learner rank's timing of one update (topic ``dlearner-learner-timings``)."""
        if not isinstance(message, Mapping) or not isinstance(message.get("group"), str):
            logger.warning("Ignoring a malformed learner timing event: %.200r", message)
            return
        group = self.groups.get(message["group"])
        if group is None:
            group = self.groups[message["group"]] = _Group(message["group"])
            while len(self.groups) > self.max_runs:
                del self.groups[min(self.groups, key=lambda g: self.groups[g].updated)]
        group.add_timing(message, received)

    def _add_status(self, message: Mapping[str, Any], received: float) -> None:
        status = message.get("status")
        if not isinstance(message.get("run_id"), str) or status not in STATUSES:
            logger.warning("Ignoring a malformed %r status event: %.200r", EVENT_TOPIC, message)
            return
        run = self._run(message["run_id"], KIND_TRAIN, received)
        when = float(message.get("time") or received)
        if status == "running" and run.status not in (None, "running"):
            # The same run id started again (a resumed run): it continues its curve as a new start.
            run.first_seen = when
        run.status, run.status_time = status, when
        run.error = str(message["error"])[:MAX_STRING] if message.get("error") else None
        run.updated = max(run.updated, when)
        if isinstance(message.get("client"), str):
            run.client = message["client"]
        for group_id in message.get("learner_groups") or ():
            run.groups.add(str(group_id))
            if not run.run_id.startswith(GROUP_RUN_PREFIX):  # claimed: the group's own curve is not shown
                self.runs.pop(GROUP_RUN_PREFIX + str(group_id), None)
        keys = message.get("env_runner_keys")
        if isinstance(keys, (list, tuple)) and keys:  # Dask's events decode lists as tuples
            run.env_runner_keys = [str(k) for k in keys]
        for name in ("algorithm", "env"):
            if isinstance(message.get(name), str):
                setattr(run, name, message[name][:MAX_STRING])

    def _claimed(self, group_id: str) -> bool:
        """Whether a run's status named learner group ``group_id`` (the page shows it inside that run)."""
        return any(group_id in run.groups for run in self.runs.values() if not run.run_id.startswith(GROUP_RUN_PREFIX))

    def _run(self, run_id: str, kind: str, now: float) -> _Run:
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = _Run(run_id, kind, self.max_history, now)
            while len(self.runs) > self.max_runs:
                # Forget the run that was updated longest ago.
                del self.runs[min(self.runs, key=lambda r: self.runs[r].updated)]
        return run

    @staticmethod
    def _add_train(run: _Run, result: Mapping[str, Any]) -> None:
        step = result.get("training_iteration")
        step = int(step) if isinstance(step, int) else (run.step or 0) + 1
        env_runners = result.get("env_runners") if isinstance(result.get("env_runners"), Mapping) else {}
        learners = result.get("learners") if isinstance(result.get("learners"), Mapping) else {}
        trained = (
            (learners.get(ALL_MODULES) or {}).get("num_env_steps_trained")
            if isinstance(learners.get(ALL_MODULES), Mapping)
            else None
        )
        elapsed = result.get("time_this_iter_s")
        trained_per_s = result.get("num_env_steps_trained_throughput")
        if trained_per_s is None and isinstance(trained, (int, float)) and isinstance(elapsed, (int, float)) and elapsed > 0:
            trained_per_s = trained / elapsed
        point = {
            "x": result.get("num_env_steps_sampled_lifetime"),
            "y": env_runners.get("episode_return_mean"),
            "losses": _mean_losses(learners),
            "throughput": {"env steps sampled/s": result.get("env_steps_per_s"), "env steps trained/s": trained_per_s},
        }
        module_returns = env_runners.get("module_episode_returns_mean")
        if isinstance(module_returns, Mapping):  # a multi-agent run: its curves per module too
            point.update(_module_curves(module_returns, learners))
        custom = custom_metric_keys(env_runners)[:MAX_CUSTOM_CURVES]
        if custom:  # metrics that callbacks logged: a curve each
            point["custom_metrics"] = {key: env_runners[key] for key in custom}
        run.add_point(step, point)
        if run.step is not None and step < run.step:
            return  # an older iteration arrived late: it only adds its point to the curve
        run.step = step
        run.summary = {k: v for k, v in result.items() if not isinstance(v, Mapping)}
        run.learners = {str(m): dict(v) for m, v in learners.items() if isinstance(v, Mapping)}
        run.env_runners = dict(env_runners)
        lags = result.get("policy_lag_mean_by_runner")
        lags = lags if isinstance(lags, Mapping) else {}
        run.env_runners["policy_lag_by_runner"] = dict(lags)
        runners = env_runners.get("runners") if isinstance(env_runners.get("runners"), Mapping) else {}
        for index, figures in runners.items():
            if isinstance(figures, Mapping):
                latest = run.runner_figures.setdefault(str(index), {})
                latest.update(
                    env_steps_per_s=figures.get("env_steps_per_s"),
                    episodes=figures.get("num_episodes_lifetime"),
                    iteration=step,
                    time=run.updated,
                )
        for index, lag in lags.items():  # fragments reach the learners later than their runner reported
            run.runner_figures.setdefault(str(index), {})["policy_lag_mean"] = lag

    @staticmethod
    def _add_learner_update(run: _Run, results: Mapping[str, Any], step: Any) -> None:
        run.num_updates += 1
        step = int(step) if isinstance(step, int) else run.num_updates
        losses = _mean_losses(results)
        run.add_point(step, {"x": float(step), "y": losses.get("total_loss"), "losses": losses, "throughput": {}})
        if run.step is not None and step < run.step:
            return
        run.step = step
        run.summary = {"update": step, "num_updates_received": run.num_updates}
        run.learners = {str(m): dict(v) for m, v in results.items() if isinstance(v, Mapping)}

    # ------------------------------------------------------------------------------- reading
    def to_json(
        self, run_id: Optional[str] = None, *, liveness: Optional[Liveness] = None, now: Optional[float] = None
    ) -> Dict[str, Any]:
        """``{"runs": [run, ...], "generated": time}``: newest run first (by when it started, so
        sections never reorder), only ``run_id`` if given. A learner group that a run claimed (its
        ``running`` status named it) shows inside that run, not as a run of its own."""
        now = time.time() if now is None else now
        claimed = {g for run in self.runs.values() if not run.run_id.startswith(GROUP_RUN_PREFIX) for g in run.groups}
        runs = [
            run
            for run in self.runs.values()
            if not (run.run_id.startswith(GROUP_RUN_PREFIX) and run.groups & claimed) and (run_id is None or run.run_id == run_id)
        ]
        runs.sort(key=lambda run: (run.first_seen, run.run_id), reverse=True)
        return {"runs": [run.to_json(self.groups, liveness, now) for run in runs], "generated": now}

    def has_run(self, run_id: str) -> bool:
        """Whether ``?run=<run_id>`` names a run the page shows."""
        return bool(self.to_json(run_id)["runs"])


def _mean_losses(learners: Mapping[str, Any]) -> Dict[str, Optional[float]]:
    """Each of :data:`LOSS_KEYS` averaged over the modules that report it (``__all_modules__`` aside)."""
    out: Dict[str, Optional[float]] = {}
    for name in LOSS_KEYS:
        values = [
            float(metrics[name])
            for module, metrics in learners.items()
            if module != ALL_MODULES and isinstance(metrics, Mapping) and is_real(metrics.get(name))
        ]
        if values:
            out[name] = sum(values) / len(values)
    return out


def _module_curves(returns: Mapping[str, Any], learners: Mapping[str, Any]) -> Dict[str, Dict[str, Optional[float]]]:
    """A multi-agent point's per-module values: ``{"module_returns": {module: mean episode return},
    "module_losses": {module: total loss}}``, for at most :data:`MAX_MODULE_CURVES` modules (the first
    by id, so that a module keeps its curve from one point to the next). A module that did not train in
    the iteration has no loss there (no point on its curve); one without a finished episode no return."""
    trained = {str(m): v for m, v in learners.items() if m != ALL_MODULES and isinstance(v, Mapping)}
    modules = sorted(set(map(str, returns)) | set(trained))[:MAX_MODULE_CURVES]
    by_id = {str(m): v for m, v in returns.items()}
    return {
        "module_returns": {m: float(by_id[m]) if is_real(by_id.get(m)) else None for m in modules},
        "module_losses": {
            m: float(trained[m][MODULE_LOSS_KEY]) if m in trained and is_real(trained[m].get(MODULE_LOSS_KEY)) else None
            for m in modules
        },
    }


def custom_metric_keys(env_runners: Mapping[str, Any]) -> List[str]:
    """The keys of ``result["env_runners"]`` that callbacks logged (``metrics_logger.log_value``): those
    that are not dlearner's own, with a number (or ``None``: no value yet) each, by name."""
    return sorted(
        str(key)
        for key, value in env_runners.items()
        if key not in RESERVED_ENV_RUNNER_KEYS and (value is None or is_real(value))
    )


def _num(value: Any) -> float:
    return float(value) if is_real(value) else 0.0


def _str_or_none(value: Any) -> Optional[str]:
    return str(value)[:MAX_STRING] if value else None
