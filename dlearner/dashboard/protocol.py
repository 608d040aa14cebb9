"""What drivers and the scheduler plugin agree on: message kinds, statuses, limits and the page's path.

Both sides of the page import this module and nothing else of the dashboard: :mod:`.publish` (the
driver) writes messages, :mod:`.store` (the scheduler) reads them, :mod:`.plugin` and :mod:`.html`
serve them under :data:`PAGE_PATH`. The event topics themselves are :mod:`dlearner.events`'.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from dlearner.jsonsafe import json_safe

#: Name of the scheduler plugin (one per scheduler; registering again is a no-op).
PLUGIN_NAME = "dlearner-dashboard"
#: Path of the page under the dashboard's URL prefix.
PAGE_PATH = "dlearner"

#: What a run can be doing, as :func:`~dlearner.dashboard.publish_status` reports it. The page adds
#: ``ended`` for a run that stopped sending without a final status (its learners are gone).
STATUSES = ("running", "finished", "failed", "stopped")

#: Version of the message layout below, sent with every message.
MESSAGE_VERSION = 1
#: ``kind`` of a message: an ``algo.train()`` result, a bare ``LearnerGroup.update`` result, a run's status.
KIND_TRAIN = "train"
KIND_LEARNER = "learner_update"
KIND_STATUS = "status"
#: Longest string the page keeps (run names, errors, labels in results).
MAX_STRING = 200


def sanitize(result: Mapping[str, Any]) -> Dict[str, Any]:
    """A result as the page keeps it: JSON-safe numbers by :func:`dlearner.jsonsafe.json_safe` (the policy
    the metrics file follows: NaN/inf become None, numpy/torch scalars plain numbers, a value that is
    not a metric ``TypeError``), then without lists (curves, not metrics) and with strings cut short."""
    return _drop_lists(json_safe(result, name="result"))


def _drop_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_lists(v) for k, v in value.items() if not isinstance(v, list)}
    if isinstance(value, str):
        return value[:MAX_STRING]  # strings in results are labels; anything longer is not a metric
    return value
