"""`keras_moe.alarms`: the one collapse test, used by `RoutingMonitor` and the pipelines."""

import types

import numpy as np
import pytest

import keras_moe
from keras_moe import alarms, statistics


def test_each_criterion_against_hand_worked_numbers():
    # 8 experts, loads [10, 6, 0, ...]: mean 2, max/mean 5, 6 of 8 empty,
    # the busiest 10% (one expert) took 10/16.
    s = statistics.summary([1.0, 1.0] + [0.0] * 6, [10, 6] + [0] * 6)
    reasons = alarms.collapse_reasons(s)
    assert reasons == [
        "6 experts got no token (fraction 0.750 > zero_expert_fraction_threshold=0.25)",
        "max/mean load 5.000 > max_mean_threshold=3.0",
        "the busiest 10% of experts took 0.625 of the load > top_share_threshold=0.5",
    ]
    # Thresholds at the values themselves do not fire (strictly above).
    at = alarms.CollapseThresholds(0.75, 5.0, 0.625)
    assert alarms.collapse_reasons(s, at) == []
    off = alarms.CollapseThresholds(None, None, None)
    assert alarms.collapse_reasons(s, off) == []


@pytest.mark.parametrize("kwargs, name", [
    ({"zero_expert_fraction_threshold": 1.0}, "zero_expert_fraction_threshold"),
    ({"max_mean_threshold": 0.5}, "max_mean_threshold"),
    ({"top_share_threshold": True}, "top_share_threshold"),
    ({"top_fraction": 0.0}, "top_fraction"),
])
def test_invalid_thresholds_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        alarms.CollapseThresholds(**kwargs)


def test_routing_monitor_uses_the_same_test():
    monitor = keras_moe.RoutingMonitor("logs", max_mean_threshold=2.0, top_fraction=0.25)
    assert monitor.thresholds == alarms.CollapseThresholds(0.25, 2.0, 0.5, 0.25)
    s = statistics.summary([1.0, 1.0, 1.0, 0.0], [9, 2, 1, 0], top_fraction=0.25)
    assert monitor._collapse_reasons(s) == alarms.collapse_reasons(s, monitor.thresholds)
    assert len(monitor._collapse_reasons(s)) == 2  # max/mean 3 > 2, top share 0.75 > 0.5


def test_check_routing_of_summed_batches_matches_numpy():
    rng = np.random.default_rng(0)
    stats = statistics.RoutingStatistics()
    total_counts, total_importance = np.zeros(6), np.zeros(6)
    for _ in range(3):
        counts = rng.integers(0, 20, 6).astype(float)
        counts[5] = 0.0  # one expert never used
        importance = counts * rng.uniform(0.2, 0.8, 6)
        total_counts += counts
        total_importance += importance
        stats.add({"moe": types.SimpleNamespace(importance=importance, counts=counts)})
    checked = alarms.check_routing(stats.result())["moe"]["statistics"]
    mean = total_counts.mean()
    assert checked["cv_load"] == pytest.approx(total_counts.std() / mean)
    assert checked["max_mean_load"] == pytest.approx(total_counts.max() / mean)
    assert checked["zero_expert_fraction"] == pytest.approx(1 / 6)
    assert checked["top_share"] == pytest.approx(total_counts.max() / total_counts.sum())
    assert checked["cv_importance"] == pytest.approx(
        total_importance.std() / total_importance.mean())
    # A layer that routed nothing is left out; warnings name only collapsed layers.
    assert alarms.check_routing({"idle": {"set_load_share": [0.0, 0.0],
                                          "set_cv_importance": 0.0}}) == {}
    lines = alarms.warning_lines({"a": {"reasons": ["x"]}, "b": {"reasons": []}}, "here")
    assert lines == ["routing collapse in MoE layer 'a' (here): x"]
