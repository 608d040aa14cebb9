"""The metrics logger (weighted means, sums, last values, the key-agreement probe), the one
policy that turns metrics into JSON for the metrics file and the dashboard, and the throughputs a
result reports: the work done over the time it took, in the result, the file and the progress line."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL

from dlearner import APPOConfig
from dlearner.dashboard.protocol import sanitize as dashboard_sanitize
from dlearner.jsonsafe import json_safe
from dlearner.metrics import MetricsLogger
from dlearner.reporting import ProgressDisplay, flatten_result

#: No CartPole-v1 run on one CPU process samples or trains a million env steps per second.
PHYSICAL_BOUND_STEPS_PER_S = 1e6


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


def test_folded_sums_keep_float64_precision_and_refuse_what_float32_cannot_hold():
    collective = object()  # only its identity matters to the fold
    pair = [MetricsLogger() for _ in range(2)]
    for metrics, value in zip(pair, (1.0 + 1e-12, 3.0)):
        metrics._fold_keys, metrics._fold_collective = [(("m", "loss"), "mean"), (("m", "gone"), "mean")], collective
        metrics.log_value(("m", "loss"), torch.tensor(value, dtype=torch.float64), weight=2)
    summed = sum(m.fold_values(collective) for m in pair)
    for metrics in pair:
        metrics.accept_fold(summed)
        # (2 * (1 + 1e-12) + 2 * 3) / 4, with the 1e-12 kept; a key nobody logged is left out.
        assert metrics._folded == {("m", "loss"): (pytest.approx(8.0 + 2e-12, abs=1e-13), 4.0)}
        assert ("m", "loss") not in metrics._entries

    huge = [MetricsLogger() for _ in range(2)]
    for metrics in huge:
        metrics._fold_keys, metrics._fold_collective = [(("m", "loss"), "mean")], collective
        metrics.log_value(("m", "loss"), 1e300)
    summed = sum(m.fold_values(collective) for m in huge)
    for metrics in huge:
        metrics.accept_fold(summed)
        assert metrics._fold_rejected and not metrics._folded
        assert metrics._entries[("m", "loss")][1] == [1e300]  # left for the float64 collective


def test_bad_keys_and_reductions_are_refused():
    metrics = MetricsLogger()
    with pytest.raises(ValueError, match="reduce"):
        metrics.log_value("x", 1.0, reduce="median")
    with pytest.raises(ValueError, match="tuple"):
        metrics.log_value(("a", "b", "c"), 1.0)
    with pytest.raises(KeyError):
        metrics.peek("never")


def test_pop_takes_a_reduced_ingredient_out_of_the_results():
    metrics = MetricsLogger()
    metrics.log_value(("m", "_hits"), 3, reduce="sum")
    metrics.log_value(("m", "_tries"), 4, reduce="sum")
    metrics.all_reduce()
    rate = metrics.pop(("m", "_hits")) / metrics.pop(("m", "_tries"))
    metrics.log_value(("m", "hit_rate"), rate, reduce="last")
    assert metrics.reduce() == {"m": {"hit_rate": 0.75}}
    with pytest.raises(KeyError):
        metrics.pop(("m", "_hits"))


# ------------------------------------------------------------------------------ JSON-safe values
def test_json_safe_gives_plain_numbers_and_none_for_non_finite_ones():
    value = {
        "np_float": np.float32(1.5),
        "np_int": np.int64(3),
        "np_bool": np.bool_(True),
        "torch": torch.tensor(0.25),
        "nan": float("nan"),
        "inf": np.float64("-inf"),
        "array": np.array([[1.0, np.inf]]),
        "tensor": torch.tensor([1, 2]),
        "tuple": (1, None, "a"),
        7: {"nested": [np.float16(0.5)]},
    }
    safe = json_safe(value)
    assert safe == {
        "np_float": 1.5,
        "np_int": 3,
        "np_bool": True,
        "torch": 0.25,
        "nan": None,
        "inf": None,
        "array": [[1.0, None]],
        "tensor": [1, 2],
        "tuple": [1, None, "a"],
        "7": {"nested": [0.5]},
    }
    assert type(safe["np_float"]) is float and type(safe["np_int"]) is int and type(safe["np_bool"]) is bool
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe


def test_json_safe_names_what_is_not_a_metric_and_bounds_the_depth():
    with pytest.raises(TypeError, match="result/learners/bad"):
        json_safe({"learners": {"bad": object()}}, name="result")
    deep = {}
    level = deep
    for _ in range(10):
        level["k"] = level = {}
    with pytest.raises(ValueError, match="deeper"):
        json_safe(deep, max_depth=8)
    assert json_safe(deep, max_depth=11) == deep  # eleven dicts deep


def test_the_metrics_file_and_the_dashboard_turn_numbers_into_json_alike():
    result = {
        "learners": {"default_policy": {"total_loss": np.float32(0.5), "vf_explained_var": float("nan")}},
        "training_iteration": np.int64(2),
        "env_runners": {"episode_returns": [1.0, float("inf")]},
    }
    flat = flatten_result(result)
    page = dashboard_sanitize(result)
    assert flat["learners/default_policy/total_loss"] == page["learners"]["default_policy"]["total_loss"] == 0.5
    assert flat["learners/default_policy/vf_explained_var"] is page["learners"]["default_policy"]["vf_explained_var"] is None
    assert flat["training_iteration"] == page["training_iteration"] == 2
    assert flat["env_runners/episode_returns"] == [1.0, None]  # the file keeps lists ...
    assert page["env_runners"] == {}  # ... the page shows metrics, not curves
    for bad in ({"x": object()}, {"x": {1, 2}}):
        with pytest.raises(TypeError, match="x"):
            flatten_result(bad)
        with pytest.raises(TypeError, match="x"):
            dashboard_sanitize(bad)


# -------------------------------------------------------------------------------- throughputs
def test_an_appo_iteration_right_after_a_checkpoint_reports_the_throughput_it_had(tmp_path):
    # save_to_path waits for the updates in flight; APPO keeps sampling and updating between train()
    # calls, so the next iteration's work was done during the save, and its time must include it.
    config = (
        APPOConfig()
        .environment("CartPole-v1")
        .rl_module(model_config=SMALL_MODEL)
        .training(rollout_fragment_length=10, train_batch_size=40, min_time_s_per_iteration=None)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .debugging(seed=1)
    )
    progress = io.StringIO()
    display = ProgressDisplay(progress)
    with config.build_algo() as algo:
        results = []
        for checkpoint in range(3):
            for _ in range(2):
                results.append(algo.train())
                display.update(results[-1])
            saving = time.perf_counter()
            algo.save_to_path(tmp_path / f"checkpoint-{checkpoint}")
            save_s = time.perf_counter() - saving
            before = results[-1]
            after = algo.train()
            display.update(after)
            results.append(after)
            trained = after["num_env_steps_trained_lifetime"] - before["num_env_steps_trained_lifetime"]
            sampled = after["num_env_steps_sampled_lifetime"] - before["num_env_steps_sampled_lifetime"]
            assert trained > 0 and sampled > 0  # an iteration does new work, even right after a save
            assert after["time_this_iter_s"] >= save_s  # the save is part of the iteration's time
            assert after["num_env_steps_trained_throughput"] == pytest.approx(trained / after["time_this_iter_s"])
            assert after["num_env_steps_trained_throughput"] <= trained / save_s
            assert after["env_steps_per_s"] == pytest.approx(sampled / after["time_this_iter_s"])
    for result in results:
        for key in ("env_steps_per_s", "num_env_steps_trained_throughput"):
            assert 0 < result[key] < PHYSICAL_BOUND_STEPS_PER_S, (key, result[key])
    # Each iteration's time is its share of the run: they add up to the total, without gaps or overlaps.
    assert results[-1]["time_total_s"] == pytest.approx(sum(r["time_this_iter_s"] for r in results))
    lines = progress.getvalue().splitlines()
    assert len(lines) == len(results)
    for line, result in zip(lines, results):
        assert f"{result['env_steps_per_s']:,.0f} steps/s" in line  # the file's figure, and never 0
        assert " 0 steps/s" not in line
