"""Tests of keras_moe.statistics against numbers worked out by hand."""

import types

import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import statistics


def test_summary_by_hand():
    # counts [6, 2, 0, 0]: mean 2, deviations [4, 0, -2, -2], variance 24 / 4 = 6.
    # importance [3, 1, 0, 0]: mean 1, deviations [2, 0, -1, -1], variance 6 / 4 = 1.5.
    s = statistics.summary(importance=[3.0, 1.0, 0.0, 0.0], counts=[6, 2, 0, 0])
    assert s["cv_load"] == pytest.approx(6**0.5 / 2)
    assert s["cv_importance"] == pytest.approx(1.5**0.5 / 1)
    assert s["max_mean_load"] == 3.0
    assert s["zero_experts"] == 2.0 and s["zero_expert_fraction"] == 0.5
    # ceil(0.1 * 4) = 1 busiest expert: 6 of 8 pairs.
    assert s["top_share"] == 0.75
    # shares [3/4, 1/4]: entropy (3/4 ln 4/3 + 1/4 ln 4) / ln 4.
    entropy = 0.75 * np.log(4 / 3) + 0.25 * np.log(4)
    assert s["router_entropy"] == pytest.approx(entropy / np.log(4))
    # Nothing routed: every figure is 0 and every expert is without tokens.
    s = statistics.summary([0.0, 0.0], [0, 0])
    assert s["cv_load"] == s["max_mean_load"] == s["top_share"] == 0.0
    assert s["zero_experts"] == 2.0
    # A single expert is an even spread.
    assert statistics.summary([1.0], [3])["router_entropy"] == 1.0


def test_functions_accept_tensors_and_arrays_alike():
    counts = [5.0, 3.0, 0.0, 0.0, 2.0]
    # mean 2, variance (9 + 1 + 4 + 4 + 0) / 5 = 3.6
    for value in (np.array(counts), tf.constant(counts)):
        assert float(statistics.coefficient_of_variation(value)) == pytest.approx(3.6**0.5 / 2)
        assert float(statistics.max_mean_load(value)) == pytest.approx(2.5)
        assert float(statistics.zero_experts(value)) == 2.0
        assert float(statistics.zero_expert_fraction(value)) == pytest.approx(0.4)
        np.testing.assert_allclose(statistics.load_share(value), [0.5, 0.3, 0, 0, 0.2])
    assert statistics.top_count(30, 0.1) == 3 and statistics.top_count(8, 0.1) == 1


def test_batch_statistics_is_what_the_layer_logs():
    values = statistics.batch_statistics(
        tf.constant([3.0, 1.0, 0.0, 0.0]), tf.constant([6.0, 2.0, 0.0, 0.0]), 0.25
    )
    assert list(values) == list(statistics.STATISTIC_NAMES)
    expected = [1.5**0.5, 6**0.5 / 2, 3.0, 0.5, 0.25]
    np.testing.assert_allclose([float(v) for v in values.values()], expected, rtol=1e-6)


def test_routing_statistics_per_batch_and_whole_set():
    stats = statistics.RoutingStatistics()
    batch = types.SimpleNamespace
    # Batch 1: counts [4, 0, 0] (CV sqrt(2), max/mean 3), importance [2, 1, 1] (CV sqrt(2) / 4 * 2).
    stats.add({"moe": batch(importance=[2.0, 1.0, 1.0], counts=[4, 0, 0])})
    # Batch 2: counts [0, 2, 2] (CV sqrt(2) / 2, max/mean 1.5), importance [1, 1, 1] (CV 0).
    stats.add({"moe": batch(importance=[1.0, 1.0, 1.0], counts=[0, 2, 2])})
    stats.add({})  # a batch without MoE routing adds nothing
    r = stats.result()["moe"]
    cv_importance_1 = np.std([2.0, 1.0, 1.0]) / (4 / 3)
    assert r["batch_cv_importance"] == pytest.approx(cv_importance_1 / 2)
    assert r["batch_cv_load"] == pytest.approx((2**0.5 + 2**0.5 / 2) / 2)
    assert r["batch_max_mean_load"] == pytest.approx((3 + 1.5) / 2)
    # The set: counts [4, 2, 2] (mean 8/3), importance [3, 2, 2].
    assert r["set_cv_load"] == pytest.approx(np.std([4, 2, 2]) / (8 / 3))
    assert r["set_cv_importance"] == pytest.approx(np.std([3, 2, 2]) / (7 / 3))
    assert r["set_max_mean_load"] == pytest.approx(4 / (8 / 3))
    assert r["set_load_share"] == pytest.approx([0.5, 0.25, 0.25])
    assert r["zero_experts"] == 0 and r["batches"] == 2


def test_the_layer_metrics_window_and_report_agree():
    """The metric logged for a call equals the summary of that call's Routing."""
    layer = keras_moe.MoE(num_experts=6, expert_hidden_dim=4, k=2, gating="top_k", name="m")
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype("float32")
    layer.build(x.shape)
    layer.gating.w_gate.assign(np.random.default_rng(1).standard_normal((3, 6)) * 2)
    _, routing = layer(x, return_routing=True)
    metrics = {m.name: float(m.result()) for m in layer.routing_metrics}
    counts = np.bincount(routing.expert_indices.numpy().ravel(), minlength=6)
    by_hand = statistics.summary(routing.importance, counts)
    assert metrics["m_cv_load"] == pytest.approx(by_hand["cv_load"], rel=1e-5)
    assert metrics["m_cv_importance"] == pytest.approx(by_hand["cv_importance"], rel=1e-5)
    assert metrics["m_max_mean_load"] == pytest.approx(by_hand["max_mean_load"], rel=1e-5)
    assert metrics["m_zero_expert_fraction"] == pytest.approx(
        np.mean(counts == 0), rel=1e-6
    )
    report = statistics.RoutingStatistics()
    report.add({"m": routing})
    assert report.result()["m"]["zero_experts"] == int(np.sum(counts == 0))
