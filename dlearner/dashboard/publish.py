"""Driver side of the dlearner page: register it on a scheduler, send metrics and run status.

Everything here runs in the training process. Messages travel as scheduler events on the topic
:data:`EVENT_TOPIC` (``Client.log_event``'s RPC), sent from the client's event loop so that the
training loop never waits for the dashboard.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from typing import Any, Dict, Iterable, Mapping, Optional, Union

from dlearner.dashboard.plugin import DashboardPlugin
from dlearner.dashboard.protocol import (
    KIND_LEARNER,
    KIND_STATUS,
    KIND_TRAIN,
    MAX_STRING,
    MESSAGE_VERSION,
    PAGE_PATH,
    PLUGIN_NAME,
    STATUSES,
    sanitize,
)
from dlearner.events import EVENT_TOPIC, LEARNER_TOPIC_PREFIX
from dlearner.validation import is_int

logger = logging.getLogger(__name__)


def register_dashboard(client: Any) -> str:
    """Install the dlearner page on ``client``'s scheduler and return its URL.

    Idempotent: a scheduler keeps one :class:`~dlearner.dashboard.DashboardPlugin` however many
    clients or runs register it. Returns ``""`` when the scheduler reports no dashboard address.

    Raises:
        RuntimeError: the scheduler cannot import ``dlearner`` (install it in the scheduler's
            environment, or start the scheduler with ``--preload dlearner.dashboard``).
    """
    try:
        client.register_plugin(DashboardPlugin(), name=PLUGIN_NAME)
    except ImportError as err:  # raised on the scheduler while unpickling the plugin, re-raised here
        raise RuntimeError(
            f"The scheduler at {client.scheduler.address} cannot import dlearner ({err}); install dlearner in the "
            "scheduler's Python environment, or start the scheduler with `--preload dlearner.dashboard`."
        ) from err
    return dashboard_url(client)


def dashboard_url(client: Any) -> str:
    """The URL of the dlearner page for ``client``'s scheduler (``""`` if it has no dashboard).

    Built from ``client.dashboard_link`` (``distributed.dashboard.link`` config): its trailing
    ``status`` is replaced by ``dlearner``, so a URL prefix or proxy in the link carries over.
    """
    link = client.dashboard_link or ""
    if not link:
        return ""
    parts = urllib.parse.urlsplit(link)
    path = parts.path
    if path.endswith("/status"):
        path = path[: -len("status")] + PAGE_PATH
    else:
        path = path.rstrip("/") + "/" + PAGE_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def publish_metrics(client: Any, run_id: str, result: Mapping[str, Any], *, wait: bool = False) -> None:
    """Send one ``algo.train()`` result of run ``run_id`` to the dashboard page.

    ``result`` is the nested result dict (``result["learners"][module_id][metric]``,
    ``result["env_runners"]["episode_return_mean"]``, ``result["num_env_steps_sampled_lifetime"]``,
    ``result["training_iteration"]``, ...). Numbers follow :func:`dlearner.jsonsafe.json_safe` (NaN and
    infinities arrive as ``None``); lists and arrays are left out; a value that is not a number,
    string or ``None`` raises ``TypeError`` naming its key.

    By default this returns at once and the message is sent from the client's event loop; a failed
    send is logged, never raised, so the dashboard cannot slow down or break training. With
    ``wait=True`` it blocks until the scheduler has the message (use it for the last result before
    closing the client) and raises on failure. Results of the same run and ``training_iteration``
    replace each other, so publishing a result twice is harmless.
    """
    _check_run_id(run_id)
    if not isinstance(result, Mapping):
        raise TypeError(f"result must be the dict algo.train() returns, got {type(result).__name__}.")
    _send(client, {"run_id": run_id, "kind": KIND_TRAIN, "result": sanitize(result)}, wait=wait)


def publish_learner_results(
    client: Any,
    run_id: str,
    results: Mapping[str, Any],
    *,
    step: Optional[int] = None,
    wait: bool = False,
) -> None:
    """Send the result of a bare ``LearnerGroup.update`` (``{module_id: {...}, "__all_modules__": {...}}``).

    ``step`` numbers the update (the x axis of the page's loss curve); by default the page counts the
    updates it has received for ``run_id``. Sending is asynchronous as in :func:`publish_metrics`.
    """
    _check_run_id(run_id)
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be the dict LearnerGroup.update returns, got {type(results).__name__}.")
    if step is not None and (not is_int(step) or step < 0):
        raise ValueError(f"step must be an int >= 0 or None, got {step!r}.")
    message: Dict[str, Any] = {"run_id": run_id, "kind": KIND_LEARNER, "result": sanitize(results)}
    if step is not None:
        message["step"] = int(step)
    _send(client, message, wait=wait)


def publish_status(
    client: Any,
    run_id: str,
    status: str,
    error: Union[BaseException, str, None] = None,
    *,
    algorithm: Any = None,
    learner_groups: Iterable[str] = (),
    wait: bool = False,
    timeout_s: float = 10.0,
) -> None:
    """Tell the page that run ``run_id`` is ``"running"``, ``"finished"``, ``"failed"`` or ``"stopped"``.

    ``error``: for ``failed``, the exception (or its text; the page shows its first line); for
    ``stopped``, what stopped it (``"SIGTERM received after iteration 3"``). ``algorithm``: the
    :class:`~dlearner.algorithm.Algorithm` of the run, so that the page shows its learner group and
    env runners inside this run's section instead of as a run of their own (``learner_groups``
    names further groups by their ``metrics_topic`` or group id).

    Sending is asynchronous and never raises like :func:`publish_metrics`; ``wait=True`` blocks up
    to ``timeout_s`` until the scheduler has it (use it for the final status before closing the
    client) and raises on failure.

    Example::

        publish_status(client, "my-run", "running", algorithm=algo)
        try:
            for _ in range(100):
                publish_metrics(client, "my-run", algo.train())
        except Exception as err:
            publish_status(client, "my-run", "failed", err, wait=True)
            raise
        publish_status(client, "my-run", "finished", wait=True)
    """
    _check_run_id(run_id)
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {status!r}.")
    groups = [str(g) for g in learner_groups if g]
    message: Dict[str, Any] = {"run_id": run_id, "kind": KIND_STATUS, "status": status}
    if error is not None:
        message["error"] = error_line(error)
    if algorithm is not None:
        learner_group = getattr(algorithm, "learner_group", None)
        topic = getattr(learner_group, "metrics_topic", None)
        if topic:
            groups.append(topic)
        env_runner_group = getattr(algorithm, "env_runner_group", None)
        keys = getattr(env_runner_group, "keys", None)
        if isinstance(keys, list):  # Dask env runners: the page looks their actors up on the scheduler
            message["env_runner_keys"] = [str(k) for k in keys]
        message["algorithm"] = type(algorithm).__name__
        env = getattr(getattr(algorithm, "config", None), "env", None)
        if isinstance(env, str):
            message["env"] = env[:MAX_STRING]
    message["learner_groups"] = sorted(
        {g[len(LEARNER_TOPIC_PREFIX) :] if g.startswith(LEARNER_TOPIC_PREFIX) else g for g in groups}
    )
    _send(client, message, wait=wait, timeout_s=timeout_s)


def error_line(error: Union[BaseException, str]) -> str:
    """The first non-empty line of an error, with its type (``ValueError: bad thing``), cut short."""
    if isinstance(error, BaseException):
        text = str(error).strip()
        line = text.splitlines()[0] if text else ""
        line = f"{type(error).__name__}: {line}" if line else type(error).__name__
    else:
        lines = [part for part in str(error).strip().splitlines() if part.strip()]
        line = lines[0] if lines else ""
    return line[:MAX_STRING]


def _check_run_id(run_id: Any) -> None:
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}.")


def _send(client: Any, message: Dict[str, Any], *, wait: bool, timeout_s: Optional[float] = None) -> None:
    if client.status not in ("running", "connecting", "newly-created"):
        raise ValueError(f"Cannot publish dlearner metrics: the client is {client.status}.")
    # The client id lets the page see a driver that went away without saying so (killed, lost).
    message = {"version": MESSAGE_VERSION, "time": time.time(), "client": client.id, **message}
    if wait:
        client.sync(client.scheduler.log_event, topic=EVENT_TOPIC, msg=message, callback_timeout=timeout_s)
    else:
        # add_callback is thread-safe and returns at once: the RPC runs on the client's event loop thread.
        client.loop.add_callback(_send_in_background, client, message)


async def _send_in_background(client: Any, message: Dict[str, Any]) -> None:
    try:
        await client.scheduler.log_event(topic=EVENT_TOPIC, msg=message)
    except OSError as err:  # CommClosedError is an OSError: the scheduler went away or the client closed
        logger.warning("Could not send dlearner metrics of run %r to the scheduler: %s", message["run_id"], err)
