"""Names of the Dask event topics dlearner logs to, in one place.

Learners log on their workers (``Worker.log_event``), drivers through the client; the dashboard
plugin on the scheduler subscribes to the same names. This module imports nothing, so the
scheduler can use it without torch.
"""

from __future__ import annotations

__all__ = ["EVENT_TOPIC", "LEARNER_TOPIC_PREFIX", "TIMING_TOPIC", "learner_metrics_topic"]

#: Scheduler event topic that carries dlearner metrics and run status from drivers to the plugin.
EVENT_TOPIC = "dlearner-metrics"

#: Prefix of the event topics where a Dask learner group's rank-0 learner logs each update's results.
LEARNER_TOPIC_PREFIX = "learner-metrics-"

#: Event topic where every learner rank logs how long each collective request waited and ran.
TIMING_TOPIC = "dlearner-learner-timings"


def learner_metrics_topic(group_id: str) -> str:
    """The topic of one learner group's update results (``learner-metrics-<group id>``)."""
    return f"{LEARNER_TOPIC_PREFIX}{group_id}"
