"""The metrics logger: weighted means, sums, last values, and the key-agreement probe."""

from __future__ import annotations

import pytest
import torch

from dlearner.metrics import MetricsLogger


def test_means_are_weighted_by_rows_sums_add_and_last_keeps_the_latest():
    metrics = MetricsLogger()
    metrics.log_value(("m", "loss"), torch.tensor(1.0), weight=3)
    metrics.log_value(("m", "loss"), torch.tensor(5.0), weight=1)
    metrics.log_value(("m", "rows"), 10, reduce="sum")
    metrics.log_value(("m", "rows"), 6, reduce="sum")
    metrics.log_value("coeff", 0.1, reduce="last")
    metrics.log_value("coeff", 0.2, reduce="last")
    assert metrics.peek(("m", "loss")) == pytest.approx(2.0)
    result = metrics.reduce()
    assert result == {"m": {"loss": pytest.approx(2.0), "rows": 16.0}, "__all_modules__": {"coeff": 0.2}}
    assert metrics.reduce() == {}  # each update starts afresh


def test_key_probe_agrees_only_when_every_learner_logged_the_same_keys():
    same = [MetricsLogger() for _ in range(3)]
    for metrics in same:
        metrics.log_value(("m", "loss"), 1.0)
    summed = sum(m.key_probe() for m in same)
    for metrics in same:
        metrics.accept_key_probe(summed, world_size=3)
        assert metrics._keys_agreed

    different = [MetricsLogger() for _ in range(2)]
    different[0].log_value(("m", "loss"), 1.0)
    different[1].log_value(("m", "other"), 1.0)
    summed = sum(m.key_probe() for m in different)
    for metrics in different:
        metrics.accept_key_probe(summed, world_size=2)
        assert not metrics._keys_agreed


def test_bad_keys_and_reductions_are_refused():
    metrics = MetricsLogger()
    with pytest.raises(ValueError, match="reduce"):
        metrics.log_value("x", 1.0, reduce="median")
    with pytest.raises(ValueError, match="tuple"):
        metrics.log_value(("a", "b", "c"), 1.0)
    with pytest.raises(KeyError):
        metrics.peek("never")
