"""Callbacks: user code that runs at points of training, and the metrics it logs.

Subclass :class:`Callbacks`, override the methods you need and pass the class to
``config.callbacks(MyCallbacks)``. The names and keyword-only signatures follow RLlib's new-stack
``RLlibCallback``; every method takes ``**kwargs`` so that later versions can pass more.

Where each method runs:

* ``on_algorithm_init``, ``on_train_result``, ``on_checkpoint_loaded``: in the driver, on one
  instance the Algorithm builds.
* ``on_episode_start``, ``on_episode_step``, ``on_episode_end``, ``on_sample_end``: in each env
  runner (in the driver with ``num_env_runners=0``, in its Dask actor otherwise), on one instance
  per runner, built there from the class (so the class must be importable, or picklable by value,
  where the runners run). They get a :class:`MetricsLogger`: what they log is reduced across env
  runners into ``result["env_runners"][key]``.

Example (a success rate from ``info``)::

    class SuccessRate(Callbacks):
        def on_episode_end(self, *, episode, metrics_logger, **kwargs):
            metrics_logger.log_value("success_rate", float(episode.last_info.get("is_success", False)))

    config.callbacks(SuccessRate)
    result = config.build_algo().train()
    result["env_runners"]["success_rate"]   # mean over the last metrics_num_episodes_for_smoothing episodes

A callback that raises stops training with a :class:`~dlearner.errors.CallbackError` naming the
callback, the method and where it ran (episode id, env index, env runner); it is never skipped.
Episode callbacks do not run during ``algo.evaluate()``.

When the configured class overrides none of the episode methods, the env runners do no per-step
work for callbacks at all.
"""

from __future__ import annotations

import collections
import math
import uuid
from typing import Any, Deque, Dict, Mapping, Optional

from dlearner.class_paths import import_class
from dlearner.errors import callback_error
from dlearner.validation import is_real

__all__ = [
    "Callbacks",
    "MetricsLogger",
    "SingleAgentEpisode",
    "CustomMetrics",
    "RESERVED_ENV_RUNNER_KEYS",
    "REDUCTIONS",
    "callbacks_from_path",
    "sub_env_info",
]

#: How logged values of one key are reduced over env runners and episodes.
REDUCTIONS = ("mean", "sum", "min", "max")

#: Keys dlearner itself reports in ``result["env_runners"]`` (and the dashboard adds there): a
#: logged key must differ from them.
RESERVED_ENV_RUNNER_KEYS = frozenset(
    {
        "episode_return_mean",
        "episode_return_max",
        "episode_return_min",
        "episode_len_mean",
        "agent_episode_returns_mean",
        "module_episode_returns_mean",
        "num_episodes_lifetime",
        "runners",
        "policy_lag_by_runner",
    }
)

#: Keys of a vector env's batched ``infos`` that the vector env or dlearner's episode statistics
#: add, not the sub-env: left out of an episode's ``last_info``.
_VECTOR_INFO_KEYS = frozenset({"final_obs", "final_info", "episode"})

_EPISODE_METHODS = ("on_episode_start", "on_episode_step", "on_episode_end")


class Callbacks:
    """Does nothing: subclass it and override the methods you need (see the module docs).

    Every method is called with keyword arguments only. Episode methods get ``episode`` (a
    :class:`SingleAgentEpisode`, or for a multi-agent env the runner's
    :class:`~dlearner.multi_agent.trajectories.Episode` with per-agent returns and infos),
    ``env_runner``, ``metrics_logger`` (:class:`MetricsLogger`) and ``env_index`` (the sub-env).
    """

    def on_algorithm_init(self, *, algorithm: Any, **kwargs: Any) -> None:
        """At the end of ``Algorithm.__init__``: learners and env runners are up, weights synced."""

    def on_episode_start(
        self, *, episode: Any, env_runner: Any, metrics_logger: "MetricsLogger", env_index: int, **kwargs: Any
    ) -> None:
        """A sub-env was reset and its episode begins (``episode.length == 0``, ``episode.last_info``
        is the reset info). The first episodes start at the runner's first ``sample()``."""

    def on_episode_step(
        self, *, episode: Any, env_runner: Any, metrics_logger: "MetricsLogger", env_index: int, **kwargs: Any
    ) -> None:
        """After every env step of the episode, the last one included (``episode.last_info`` is that step's info)."""

    def on_episode_end(
        self, *, episode: Any, env_runner: Any, metrics_logger: "MetricsLogger", env_index: int, **kwargs: Any
    ) -> None:
        """The episode terminated or was truncated (after its last ``on_episode_step``)."""

    def on_sample_end(self, *, env_runner: Any, metrics_logger: "MetricsLogger", samples: Any, **kwargs: Any) -> None:
        """After each ``env_runner.sample()``: ``samples`` is what it returns (single-agent: time-major
        arrays; multi-agent: ``{module_id: [segment, ...]}``). Changing it changes what is trained on."""

    def on_train_result(self, *, algorithm: Any, result: Dict[str, Any], **kwargs: Any) -> None:
        """After each ``algo.train()`` built its result, before it is returned (and published to the
        dashboard): keys added to ``result`` are reported too. A curriculum changes the env runners'
        environments here with ``algorithm.env_runner_group.foreach_env(fn)``."""

    def on_checkpoint_loaded(self, *, algorithm: Any, **kwargs: Any) -> None:
        """After ``algo.restore_from_path(path)`` restored the algorithm (``kwargs["path"]`` names it)."""


def overrides(callbacks: Callbacks, method: str) -> bool:
    """Whether ``callbacks``' class overrides ``method`` of :class:`Callbacks` (else calling it does nothing)."""
    return getattr(type(callbacks), method, None) is not getattr(Callbacks, method)


def check_callbacks_class(value: Any) -> type:
    """``value`` if it is a :class:`Callbacks` subclass (the class, not an instance), else ``ValueError``."""
    if not (isinstance(value, type) and issubclass(value, Callbacks)):
        hint = " (pass the class, not an instance)" if isinstance(value, Callbacks) else ""
        raise ValueError(f"callbacks must be a dlearner.Callbacks subclass{hint}, got {value!r}.")
    return value


def callbacks_from_path(path: str) -> type:
    """The :class:`Callbacks` subclass that ``path`` names: ``"package.module:ClassName"`` or
    ``"package.module.ClassName"`` (as a command line gives it). Importing the module runs its code:
    use it for paths the user gave, never for paths read from a checkpoint."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"A callbacks class path must be 'package.module:ClassName', got {path!r}.")
    return check_callbacks_class(import_class(path.replace(":", ".", 1) if ":" in path else path))


def make_callbacks(callbacks_class: type) -> Callbacks:
    """An instance of the configured class, built with no arguments."""
    try:
        return check_callbacks_class(callbacks_class)()
    except TypeError as err:
        raise ValueError(
            f"Cannot build the callbacks {callbacks_class.__qualname__}() with no arguments ({err}); dlearner builds one "
            "per env runner and one in the driver, so its __init__ must take no required arguments."
        ) from err


def call_callback(callbacks: Callbacks, method: str, *, where: str, **kwargs: Any) -> None:
    """``callbacks.method(**kwargs)``; an exception it raises becomes a :class:`~dlearner.errors.CallbackError`
    saying ``where`` it ran."""
    try:
        getattr(callbacks, method)(**kwargs)
    except Exception as err:
        raise callback_error(err, callbacks=callbacks, method=method, where=where) from err


# ---------------------------------------------------------------------------------- metrics
class MetricsLogger:
    """Collects the values callbacks log in one env runner, until the runner reports them.

    ``log_value(key, value, reduce=...)`` with ``reduce``:

    * ``"mean"`` (default): ``result["env_runners"][key]`` is the mean of the last
      ``metrics_num_episodes_for_smoothing`` values logged (over all runners), as
      ``episode_return_mean`` is of episode returns;
    * ``"sum"``: the sum of the values logged during the iteration;
    * ``"min"`` / ``"max"``: their minimum / maximum during the iteration.

    A key keeps the reduction it was first logged with. Keys must be non-empty strings that differ
    from dlearner's own (:data:`RESERVED_ENV_RUNNER_KEYS`); values real numbers.
    """

    def __init__(self, window: int = 20):
        self.window = int(window)
        # key -> reduction, for the runner's whole life (a key keeps its reduction)
        self._reductions: Dict[str, str] = {}
        # since the last report: "mean" keys their last `window` values, the others one reduced value
        self._values: Dict[str, Any] = {}

    def log_value(self, key: str, value: Any, reduce: str = "mean") -> None:
        """Log ``value`` under ``key`` (see the class docs for ``reduce``)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"A metric key must be a non-empty string, got {key!r}.")
        if key in RESERVED_ENV_RUNNER_KEYS:
            raise ValueError(
                f"The metric key {key!r} is one dlearner reports itself in result['env_runners']; log it under another name."
            )
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {reduce!r} (metric {key!r}).")
        if not is_real(value):
            raise ValueError(f"The value of metric {key!r} must be a real number, got {value!r}.")
        known = self._reductions.setdefault(key, reduce)
        if known != reduce:
            raise ValueError(f"The metric {key!r} was logged with reduce={known!r}; it cannot be logged with reduce={reduce!r}.")
        value = float(value)
        if reduce == "mean":
            values = self._values.get(key)
            if values is None:
                values = self._values[key] = collections.deque(maxlen=self.window)
            values.append(value)
        elif key not in self._values:
            self._values[key] = value
        elif reduce == "sum":
            self._values[key] += value
        elif reduce == "min":
            self._values[key] = min(self._values[key], value)
        else:
            self._values[key] = max(self._values[key], value)

    def peek(self, key: str) -> Any:
        """What ``key`` holds since the last report (a list for ``"mean"``, else the reduced value; ``None`` if nothing)."""
        value = self._values.get(key)
        return list(value) if isinstance(value, collections.deque) else value

    def reduce(self) -> Dict[str, Dict[str, Any]]:
        """``{key: {"reduce": r, "values": [...]}}`` logged since the last call, then forgets them."""
        out = {
            key: {"reduce": self._reductions[key], "values": list(v) if isinstance(v, collections.deque) else [v]}
            for key, v in self._values.items()
        }
        self._values = {}
        return out


class CustomMetrics:
    """The Algorithm's side: reduces what the env runners' :class:`MetricsLogger` reported (see
    there) into ``result["env_runners"]``, and keeps the ``"mean"`` windows for checkpoints."""

    def __init__(self, window: int = 20):
        self.window = int(window)
        self._reductions: Dict[str, str] = {}
        self._windows: Dict[str, Deque[float]] = {}
        self._this_iteration: Dict[str, float] = {}

    def add(self, reported: Optional[Mapping[str, Any]]) -> None:
        """One runner report's ``metrics["custom"]``."""
        for key, entry in (reported or {}).items():
            reduce, values = entry["reduce"], [float(v) for v in entry["values"]]
            known = self._reductions.setdefault(key, reduce)
            if known != reduce:
                raise ValueError(
                    f"The metric {key!r} was logged with reduce={known!r} and, by another env runner, reduce={reduce!r}; "
                    "log each key with one reduction."
                )
            if reduce == "mean":
                self._windows.setdefault(key, collections.deque(maxlen=self.window)).extend(values)
            elif values:
                before = self._this_iteration.get(key)
                if reduce == "sum":
                    self._this_iteration[key] = (before or 0.0) + sum(values)
                else:
                    pick = min if reduce == "min" else max
                    self._this_iteration[key] = pick(values) if before is None else pick(before, *values)

    def summary(self) -> Dict[str, float]:
        """This iteration's values (``nan`` for a ``"min"``/``"max"`` key nothing was logged for this
        iteration; ``0.0`` for such a ``"sum"`` key), then starts the next iteration."""
        out: Dict[str, float] = {}
        for key, reduce in sorted(self._reductions.items()):
            if reduce == "mean":
                window = self._windows.get(key)
                out[key] = float(sum(window) / len(window)) if window else math.nan
            else:
                out[key] = self._this_iteration.get(key, 0.0 if reduce == "sum" else math.nan)
        self._this_iteration = {}
        return out

    def get_state(self) -> Dict[str, Any]:
        """The ``"mean"`` windows (so a resumed run's smoothed figures go on), as plain JSON."""
        return {key: {"reduce": r, "values": list(self._windows.get(key, ()))} for key, r in self._reductions.items()}

    def set_state(self, state: Optional[Mapping[str, Any]]) -> None:
        self._reductions, self._windows, self._this_iteration = {}, {}, {}
        if not isinstance(state, Mapping):
            if state is not None:
                raise ValueError(f"The stored custom metrics must be a dict, got {type(state).__name__}.")
            return
        for key, entry in state.items():
            if not (isinstance(entry, Mapping) and entry.get("reduce") in REDUCTIONS and isinstance(entry.get("values"), list)):
                raise ValueError(f"The stored custom metric {key!r} is malformed: {entry!r}.")
            self._reductions[str(key)] = entry["reduce"]
            if entry["reduce"] == "mean":
                self._windows[str(key)] = collections.deque((float(v) for v in entry["values"]), maxlen=self.window)


# ---------------------------------------------------------------------------------- episodes
class SingleAgentEpisode:
    """One sub-env's running episode, as a single-agent env runner's episode callbacks see it.

    ``id_`` (unique), ``env_index`` (the sub-env), ``worker_index`` (the env runner), ``length``
    (env steps so far), :meth:`get_return` / ``total_return`` (rewards summed), ``last_info`` (the
    sub-env's latest ``info``: the reset info at the start, the last step's at the end),
    ``is_done`` (after its last step) and ``custom_data``, a dict for your own per-episode data.
    """

    __slots__ = ("id_", "env_index", "worker_index", "length", "total_return", "is_done", "custom_data", "last_info")

    def __init__(self, env_index: int, worker_index: int, info: Optional[Dict[str, Any]] = None):
        self.id_ = uuid.uuid4().hex
        self.env_index = env_index
        self.worker_index = worker_index
        self.length = 0
        self.total_return = 0.0
        self.is_done = False
        self.custom_data: Dict[str, Any] = {}
        self.last_info: Dict[str, Any] = info if info is not None else {}

    def get_return(self) -> float:
        """The sum of the episode's rewards so far (RLlib's name)."""
        return self.total_return

    def __repr__(self) -> str:
        return f"SingleAgentEpisode(id_={self.id_!r}, env_index={self.env_index}, length={self.length}, return={self.total_return:g})"


def sub_env_info(infos: Mapping[str, Any], index: int) -> Dict[str, Any]:
    """Sub-env ``index``'s ``info`` from a gymnasium vector env's batched ``infos``.

    Vector infos hold each key's values of all sub-envs in an array, and under ``"_key"`` a mask of
    the sub-envs that gave it (nested dicts alike). Keys the vector env or dlearner's episode
    statistics add (``final_obs``, ``final_info``, ``episode``) are left out; numpy scalars become
    Python numbers.
    """
    out: Dict[str, Any] = {}
    for key, value in infos.items():
        if key in _VECTOR_INFO_KEYS or (key.startswith("_") and key[1:] in infos):
            continue
        mask = infos.get("_" + key)
        if mask is not None and not mask[index]:
            continue
        if isinstance(value, Mapping):
            out[key] = sub_env_info(value, index)
            continue
        item = value[index]
        out[key] = item.item() if hasattr(item, "item") and getattr(item, "ndim", 1) == 0 else item
    return out


# ------------------------------------------------------------------------- in an env runner
class RunnerCallbacks:
    """An env runner's callbacks: the user's instance, its :class:`MetricsLogger`, and which of the
    runner's hooks it overrides (checked once, so that a runner without them does no per-step work)."""

    def __init__(self, callbacks_class: Optional[type], *, worker_index: int, window: int):
        self.callbacks = make_callbacks(callbacks_class or Callbacks)
        self.worker_index = worker_index
        self.metrics_logger = MetricsLogger(window)
        #: Whether episodes must be followed at all (some episode method is overridden).
        self.episodes = any(overrides(self.callbacks, m) for m in _EPISODE_METHODS)
        self._overridden = {m for m in (*_EPISODE_METHODS, "on_sample_end") if overrides(self.callbacks, m)}

    @classmethod
    def for_config(cls, config: Any, worker_index: int) -> "RunnerCallbacks":
        """The callbacks ``config.callbacks(...)`` names (the base class without it), for env runner ``worker_index``."""
        return cls(
            getattr(config, "callbacks_class", None),
            worker_index=worker_index,
            window=getattr(config, "metrics_num_episodes_for_smoothing", 20),
        )

    def episode(self, method: str, episode: Any, env_runner: Any) -> None:
        """``method`` (an episode method) for ``episode``, if the class overrides it."""
        if method not in self._overridden:
            return
        try:
            getattr(self.callbacks, method)(
                episode=episode, env_runner=env_runner, metrics_logger=self.metrics_logger, env_index=episode.env_index
            )
        except Exception as err:
            raise callback_error(
                err,
                callbacks=self.callbacks,
                method=method,
                where=f"in episode {episode.id_} (env index {episode.env_index}) of {_runner_name(self.worker_index)}",
                episode_id=episode.id_,
                env_index=episode.env_index,
                env_runner_index=self.worker_index,
            ) from err

    def sample_end(self, env_runner: Any, samples: Any) -> None:
        if "on_sample_end" not in self._overridden:
            return
        try:
            self.callbacks.on_sample_end(env_runner=env_runner, metrics_logger=self.metrics_logger, samples=samples)
        except Exception as err:
            raise callback_error(
                err,
                callbacks=self.callbacks,
                method="on_sample_end",
                where=f"after a sample() of {_runner_name(self.worker_index)}",
                env_runner_index=self.worker_index,
            ) from err

    def report(self) -> Dict[str, Dict[str, Any]]:
        """What was logged since the last report (``metrics["custom"]`` of ``get_metrics()``)."""
        return self.metrics_logger.reduce()


def _runner_name(worker_index: int) -> str:
    return f"env runner {worker_index}" if worker_index else "the driver's env runner (num_env_runners=0)"
