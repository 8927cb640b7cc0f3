"""Tests of `keras_moe.RoutingMonitor`, read back with TensorBoard's own reader.

The written values are checked against statistics recomputed here in NumPy
from the same batches. To make that possible the model is frozen (SGD with
learning rate 0), gates are deterministic (`gating="top_k"`, no noise) and
batches are not shuffled: the routing seen during `fit` is then the routing
of `layer(x_batch, return_routing=True)`, from which counts, importance and
capacity drops are re-derived with `np.bincount`.

The collapse alarm is tested on the biased-gate task of `learning_test.py`
(32 clusters, a constant input feature with a 4-logit head start towards
two experts): without balancing losses the gate stays collapsed and the
alarm must fire; with the default losses it recovers within ~60 steps and
the alarm, which needs `PATIENCE` collapsed windows in a row, must not.
"""

import glob
import logging
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import plugin_event_accumulator

import keras_moe
from keras_moe import monitoring

# `top_k` gating has no noise, so `W_noise` gets no gradient; Keras says so.
pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")

# --- reading event files ---------------------------------------------------


def _read_events(log_dir):
    """`{tag: [(step, ndarray), ...]}` and `{tag: plugin name}` of `<log_dir>/routing`."""
    acc = plugin_event_accumulator.EventAccumulator(
        os.path.join(log_dir, "routing"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    events, plugins = {}, {}
    for tag in acc.Tags()["tensors"]:
        events[tag] = [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        plugins[tag] = acc.SummaryMetadata(tag).plugin_data.plugin_name
    return events, plugins


# --- exact values on a frozen model ----------------------------------------

INPUT_DIM = 6
BATCH = 16
NUM_BATCHES = 6
EPOCHS = 2  # 12 steps
EVERY = 4  # writes at steps 4, 8, 12
WINDOW = 3  # each write sums steps 2-4, 6-8, 10-12 (the second spans two epochs)
E, G, PER_GROUP = 8, 4, 2
CAPACITY_FACTOR = 0.75
# Low enough that some windows of the frozen run count as collapsed (their
# max/mean loads are 1.42-1.83), so the flag and the alarms are exercised.
MAX_MEAN_THRESHOLD = 1.6
STAT_NAMES = (
    "cv_importance", "cv_load", "max_mean_load", "zero_experts", "top_share", "router_entropy",
)


def _frozen_model():
    inputs = keras.Input((INPUT_DIM,))
    moe = keras_moe.MoE(
        num_experts=E, expert_hidden_dim=4, k=2, gating="top_k", seed=1, name="moe"
    )
    hmoe = keras_moe.HierarchicalMoE(
        num_groups=G, experts_per_group=PER_GROUP, expert_hidden_dim=4, k_primary=2,
        k_secondary=1, gating="top_k", capacity_factor=CAPACITY_FACTOR, seed=2, name="hmoe",
    )
    # The hierarchical layer sits in a nested model: the callback must find it.
    inner = keras.Sequential([keras.Input((INPUT_DIM,)), hmoe], name="inner")
    model = keras.Model(inputs, inner(moe(inputs)))
    # Gates start at zero (every logit ties); random gates spread the load.
    rng = np.random.default_rng(3)
    for w in (moe.gating.w_gate, hmoe.gating.primary.w_gate, hmoe.gating.w_gate):
        w.assign(rng.standard_normal(w.shape).astype("float32"))
    return model, moe, hmoe


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    keras.utils.set_random_seed(1234)
    log_dir = str(tmp_path_factory.mktemp("frozen"))
    model, moe, hmoe = _frozen_model()
    x = np.random.default_rng(4).standard_normal((BATCH * NUM_BATCHES, INPUT_DIM))
    x = x.astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    monitor = keras_moe.RoutingMonitor(
        log_dir, every_n_steps=EVERY, window=WINDOW, max_mean_threshold=MAX_MEAN_THRESHOLD
    )
    model.fit(
        x, np.zeros_like(x), batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
        callbacks=[monitor],
    )
    # The same routing, batch by batch, outside `fit`.
    batches = []
    for b in range(NUM_BATCHES):
        h, r1 = moe(x[b * BATCH : (b + 1) * BATCH], return_routing=True)
        _, r2 = hmoe(h, return_routing=True)
        batches.append(
            {
                "moe": (r1.expert_indices.numpy(), r1.gates.numpy()),
                "hmoe": (r2.expert_indices.numpy(), r2.gates.numpy()),
            }
        )
    events, plugins = _read_events(log_dir)
    return {
        "monitor": monitor, "model": model, "moe": moe, "hmoe": hmoe, "x": x,
        "batches": batches, "events": events, "plugins": plugins, "log_dir": log_dir,
    }


def _expected_sums(batches, layer, steps):
    """Summed counts, importance and dropped pairs of the given (1-based) steps."""
    counts, importance = np.zeros(E), np.zeros(E)
    dropped = 0
    for step in steps:
        idx, gates = batches[(step - 1) % NUM_BATCHES][layer]
        c = np.bincount(idx.ravel(), minlength=E)
        counts += c
        importance += np.bincount(idx.ravel(), weights=gates.ravel(), minlength=E)
        # Each expert keeps ceil(capacity_factor * pairs / E) pairs per batch.
        capacity = math.ceil(CAPACITY_FACTOR * idx.size / E)
        dropped += np.maximum(c - capacity, 0).sum()
    return counts, importance, dropped


def _expected_statistics(importance, counts):
    n = len(counts)
    p = counts / counts.sum()
    p = p[p > 0]
    busiest = max(1, math.ceil(0.1 * n))
    return {
        "cv_importance": importance.std() / importance.mean(),
        "cv_load": counts.std() / counts.mean(),
        "max_mean_load": counts.max() / counts.mean(),
        "zero_experts": float(np.sum(counts == 0)),
        "top_share": np.sort(counts)[-busiest:].sum() / counts.sum(),
        "router_entropy": -np.sum(p * np.log(p)) / np.log(n),
    }


def _values(events, tag):
    return [step for step, _ in events[tag]], [value for _, value in events[tag]]


WRITE_STEPS = [EVERY, 2 * EVERY, 3 * EVERY]


def _window(write_step):
    return range(write_step - WINDOW + 1, write_step + 1)


def test_tags_per_layer_and_level(frozen_run):
    tags = set(frozen_run["events"])
    level = {f"{s}" for s in STAT_NAMES} | {
        "load_per_expert", "importance_per_expert", "load_sorted", "importance_sorted",
    }
    expected = {f"moe/{t}" for t in level} | {"moe/collapsed"}
    expected |= {f"hmoe/{t}" for t in level} | {f"hmoe/primary_{t}" for t in level}
    expected |= {"hmoe/collapsed", "hmoe/dropped_fraction"}
    assert expected <= tags, sorted(expected - tags)
    # Dropless layers write no dropped fraction; nothing else is written.
    assert "moe/dropped_fraction" not in tags
    assert tags - expected <= {"moe/collapse_alarm", "hmoe/collapse_alarm"}
    for tag in expected:
        assert _values(frozen_run["events"], tag)[0] == WRITE_STEPS, tag


@pytest.mark.parametrize("layer", ["moe", "hmoe"])
def test_scalars_match_numpy_recomputation(frozen_run, layer):
    events = frozen_run["events"]
    for i, step in enumerate(WRITE_STEPS):
        counts, importance, dropped = _expected_sums(frozen_run["batches"], layer, _window(step))
        assert counts.sum() == WINDOW * BATCH * 2  # k = 2 (k_primary * k_secondary)
        expected = _expected_statistics(importance, counts)
        if layer == "hmoe":
            expected["dropped_fraction"] = dropped / counts.sum()
            # k_secondary = 1: expert j of group g is flat index g * PER_GROUP + j,
            # and its group's primary gate is the combined gate.
            idx_gates = [frozen_run["batches"][(s - 1) % NUM_BATCHES]["hmoe"] for s in _window(step)]
            groups = np.concatenate([idx.ravel() // PER_GROUP for idx, _ in idx_gates])
            gates = np.concatenate([g.ravel() for _, g in idx_gates])
            primary = _expected_statistics(
                np.bincount(groups, weights=gates, minlength=G), np.bincount(groups, minlength=G)
            )
            expected.update({f"primary_{k}": v for k, v in primary.items()})
        for name, value in expected.items():
            written = float(events[f"{layer}/{name}"][i][1])
            np.testing.assert_allclose(written, value, rtol=1e-5, atol=1e-6, err_msg=name)
    # The capacity limit did drop something, so the figure is not trivially 0.
    assert max(float(v) for _, v in events["hmoe/dropped_fraction"]) > 0


def test_histograms_hold_the_per_expert_vectors(frozen_run):
    events, plugins = frozen_run["events"], frozen_run["plugins"]
    for layer in ("moe", "hmoe"):
        for i, step in enumerate(WRITE_STEPS):
            counts, importance, _ = _expected_sums(frozen_run["batches"], layer, _window(step))
            for name, vector in (("load", counts), ("importance", importance)):
                tag = f"{layer}/{name}_per_expert"
                assert plugins[tag] == "histograms"
                buckets = events[tag][i][1]
                assert buckets.shape == (E, 3)
                # One bucket [e, e + 1) per expert e, holding its value.
                np.testing.assert_array_equal(buckets[:, 0], np.arange(E))
                np.testing.assert_array_equal(buckets[:, 1], np.arange(E) + 1)
                np.testing.assert_allclose(buckets[:, 2], vector, rtol=1e-5)
    assert events["hmoe/primary_load_per_expert"][0][1].shape == (G, 3)


def test_images_are_sorted_bar_charts(frozen_run):
    events, plugins = frozen_run["events"], frozen_run["plugins"]
    for tag, num_bars in (
        ("moe/load_sorted", E), ("moe/importance_sorted", E), ("hmoe/primary_load_sorted", G),
    ):
        assert plugins[tag] == "images"
        for i in range(len(WRITE_STEPS)):
            width, height, png = events[tag][i][1]
            image = tf.io.decode_png(png).numpy()
            bar_width = 256 // num_bars
            assert image.shape == (64, num_bars * bar_width, 3)
            assert (int(width), int(height)) == (num_bars * bar_width, 64)
            # Bars (blue pixels) per column never grow from left to right.
            blue = np.all(image == monitoring.BAR_COLOR, axis=-1).sum(axis=0)
            assert np.all(np.diff(blue) <= 0) and blue[0] > 0
    # The tallest bar of the load chart is the busiest expert, at full height
    # (less the row of the red mean line, which it crosses).
    counts, _, _ = _expected_sums(frozen_run["batches"], "moe", _window(EVERY))
    image = tf.io.decode_png(events["moe/load_sorted"][0][1][2]).numpy()
    assert np.all(image == monitoring.MEAN_COLOR, axis=-1).any(axis=1).sum() == 1
    bar_pixels = np.all(image == monitoring.BAR_COLOR, axis=-1).sum(axis=0)
    assert bar_pixels[0] == 63
    np.testing.assert_allclose(
        bar_pixels[::32][1:] / 64, np.sort(counts)[::-1][1:] / counts.max(), atol=2 / 64
    )


def test_collapsed_flag_and_alarms_follow_the_thresholds(frozen_run):
    monitor, events = frozen_run["monitor"], frozen_run["events"]
    expected_alarms = []
    for layer in ("moe", "hmoe"):
        for i, step in enumerate(WRITE_STEPS):
            counts, importance, _ = _expected_sums(frozen_run["batches"], layer, _window(step))
            s = _expected_statistics(importance, counts)
            collapsed = s["zero_experts"] / E > 0.25 or s["top_share"] > 0.5
            collapsed |= s["max_mean_load"] > MAX_MEAN_THRESHOLD
            if layer == "hmoe":
                idx = np.concatenate(
                    [frozen_run["batches"][(t - 1) % NUM_BATCHES]["hmoe"][0].ravel()
                     for t in _window(step)]
                )
                c = np.bincount(idx // PER_GROUP, minlength=G)
                collapsed |= np.sum(c == 0) / G > 0.25 or c.max() / c.mean() > MAX_MEAN_THRESHOLD
                collapsed |= c.max() / c.sum() > 0.5
            assert float(events[f"{layer}/collapsed"][i][1]) == float(collapsed)
            # patience=1: an alarm on each collapsed window after a healthy one.
            previous = i > 0 and float(events[f"{layer}/collapsed"][i - 1][1]) == 1.0
            if collapsed and not previous:
                expected_alarms.append((step, layer))
    assert sorted((a["step"], a["layer"]) for a in monitor.alarms) == sorted(expected_alarms)
    # Both kinds of window occur, and one collapse lasted two windows (one alarm).
    flags = [float(v) for layer in ("moe", "hmoe") for _, v in events[f"{layer}/collapsed"]]
    assert 0.0 in flags and 1.0 in flags
    assert len(expected_alarms) < sum(flags)


def test_refit_continues_steps_and_unhooks_the_layers(frozen_run, tmp_path):
    model, x = frozen_run["model"], frozen_run["x"]
    # The callback's routing observers are gone once `fit` ends.
    assert frozen_run["moe"].routing_observers == ()
    assert frozen_run["hmoe"].routing_observers == ()
    # A second fit: steps go on from optimizer.iterations (12), so the next
    # write is at step 16, summing steps 14-16 (batches 1-3).
    monitor = keras_moe.RoutingMonitor(str(tmp_path), every_n_steps=EVERY, window=WINDOW)
    fit = dict(batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model.fit(x, np.zeros_like(x), callbacks=[monitor], **fit)
    events, _ = _read_events(str(tmp_path))
    [(step, buckets)] = events["moe/load_per_expert"]
    counts, _, _ = _expected_sums(frozen_run["batches"], "moe", range(14, 17))
    assert step == 16
    np.testing.assert_array_equal(buckets[:, 2], counts)
    # A later fit without the callback runs a train step without the hook.
    sums = [v.numpy().copy() for v in monitor._accumulators["moe"].values()]
    model.fit(x, np.zeros_like(x), **fit)
    for before, v in zip(sums, monitor._accumulators["moe"].values(), strict=True):
        np.testing.assert_array_equal(before, v.numpy())


# --- collapse alarm on the biased-gate task ---------------------------------

NUM_CLUSTERS = 32
CLUSTER_DIM = 16
STEPS_PER_EPOCH = 20
COLLAPSE_EPOCHS = 6  # 120 steps
ALARM_EVERY = 40
PATIENCE = 3  # an alarm needs 120 collapsed steps


def _cluster_data(seed=0, num=STEPS_PER_EPOCH * 64):
    """Clustered inputs with a constant last feature, regression targets."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.standard_normal((NUM_CLUSTERS, CLUSTER_DIM))
    cluster = rng.integers(0, NUM_CLUSTERS, num)
    x = centres[cluster] + rng.standard_normal((num, CLUSTER_DIM))
    w = rng.standard_normal((NUM_CLUSTERS, CLUSTER_DIM, 8)) / 4
    y = np.tanh(np.einsum("nd,ndo->no", x, w[cluster]))
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    x = np.concatenate([x, np.ones((num, 1))], axis=1)
    return x.astype("float32"), y.astype("float32")


def _biased_gate_model(balance_weight):
    inputs = keras.Input((CLUSTER_DIM + 1,))
    moe = keras_moe.MoE(
        num_experts=8, expert_hidden_dim=16, k=2, output_dim=8,
        importance_weight=balance_weight, load_weight=balance_weight, seed=7, name="moe",
    )
    model = keras.Model(inputs, moe(inputs))
    # A 4-logit head start for experts 0 and 1 on every token.
    w_gate = np.zeros(moe.gating.w_gate.shape, "float32")
    w_gate[-1, [0, 1]] = 4.0
    moe.gating.w_gate.assign(w_gate)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _fit_biased(balance_weight, log_dir, epochs=COLLAPSE_EPOCHS, **monitor_kwargs):
    x, y = _cluster_data()
    model = _biased_gate_model(balance_weight)
    monitor_kwargs = {"every_n_steps": ALARM_EVERY, "patience": PATIENCE, **monitor_kwargs}
    monitor = keras_moe.RoutingMonitor(log_dir, **monitor_kwargs)
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=[monitor])
    return model, monitor, history.history


def test_collapse_alarm_fires_without_balancing_losses(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="keras_moe.monitoring"):
        _, monitor, _ = _fit_biased(0.0, str(tmp_path))
    assert len(monitor.alarms) == 1, monitor.alarms
    alarm = monitor.alarms[0]
    assert alarm["layer"] == "moe" and alarm["step"] == PATIENCE * ALARM_EVERY
    assert any("max_mean_threshold" in r for r in alarm["reasons"])
    assert alarm["statistics"]["max_mean_load"] > 3.0
    assert "Routing collapse in MoE layer 'moe'" in caplog.text
    events, plugins = _read_events(str(tmp_path))
    assert plugins["moe/collapse_alarm"] == "text"
    [(step, text)] = events["moe/collapse_alarm"]
    assert step == alarm["step"] and b"max/mean load" in text.item()


def test_no_false_alarm_with_balancing_losses(tmp_path):
    _, monitor, _ = _fit_biased(0.1, str(tmp_path))  # the layer's defaults
    assert monitor.alarms == []
    events, _ = _read_events(str(tmp_path))
    assert "moe/collapse_alarm" not in events
    # It did start collapsed; it recovered before the patience ran out.
    collapsed = [float(v) for _, v in events["moe/collapsed"]]
    assert collapsed[0] == 1.0 and collapsed[-1] == 0.0, collapsed


def test_stop_on_collapse_stops_training_and_keeps_logs(tmp_path):
    model, monitor, history = _fit_biased(
        0.0, str(tmp_path), epochs=10, every_n_steps=10, patience=1, stop_on_collapse=True
    )
    assert len(history["loss"]) == 1  # stopped at step 10, in the first epoch
    assert model.stop_training and monitor.alarms[0]["step"] == 10
    assert glob.glob(os.path.join(str(tmp_path), "routing", "events.out.tfevents.*"))
    events, _ = _read_events(str(tmp_path))
    assert [step for step, _ in events["moe/cv_load"]] == [10]


# --- helpers and validation ------------------------------------------------


def test_moe_layers_are_found_inside_custom_layers():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.moe = keras_moe.MoE(num_experts=4, expert_hidden_dim=4, k=1, name="inner_moe")

        def call(self, x):
            return self.moe(x)

    inputs = keras.Input((3,))
    outer = keras_moe.MoE(num_experts=4, expert_hidden_dim=4, k=1, name="outer_moe")
    model = keras.Model(inputs, Block()(outer(inputs)))
    assert [layer.name for layer in monitoring.find_moe_layers(model)] == [
        "outer_moe", "inner_moe",
    ]


def test_model_without_moe_layer_is_rejected(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="found no MoE layer"):
        model.fit(
            np.zeros((4, 3)), np.zeros((4, 2)), verbose=0,
            callbacks=[keras_moe.RoutingMonitor(str(tmp_path))],
        )


def test_window_statistics_edge_cases():
    s = monitoring.window_statistics([2.0, 2.0, 2.0, 2.0], [5, 5, 5, 5])
    assert s["cv_load"] == 0 and s["max_mean_load"] == 1 and s["router_entropy"] == 1
    assert s["top_share"] == 0.25  # ceil(0.1 * 4) = 1 expert
    s = monitoring.window_statistics([1.0, 0.0, 0.0, 0.0], [7, 0, 0, 0])
    assert s["zero_experts"] == 3 and s["max_mean_load"] == 4 and s["router_entropy"] == 0
    assert monitoring.top_count(30, 0.1) == 3 and monitoring.top_count(8, 0.1) == 1
    # Many experts: bars are averaged into at most max_columns columns.
    assert monitoring.sorted_bar_chart(np.arange(1000.0), max_columns=100).shape == (64, 100, 3)
    assert monitoring.sorted_bar_chart(np.zeros(3)).shape == (64, 255, 3)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"log_dir": ""}, "log_dir"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"every_n_steps": 10, "window": 11}, "window"),
        ({"window": 0}, "window"),
        ({"zero_expert_fraction_threshold": 1.0}, "zero_expert_fraction_threshold"),
        ({"zero_expert_fraction_threshold": -0.1}, "zero_expert_fraction_threshold"),
        # The deprecated name still works, and its errors name it.
        ({"dead_fraction_threshold": 1.0}, "dead_fraction_threshold"),
        ({"dead_fraction_threshold": -0.1}, "dead_fraction_threshold"),
        ({"max_mean_threshold": 0.5}, "max_mean_threshold"),
        ({"max_mean_threshold": "3"}, "max_mean_threshold"),
        ({"top_share_threshold": 1.5}, "top_share_threshold"),
        ({"top_share_threshold": True}, "top_share_threshold"),
        ({"patience": 0}, "patience"),
        ({"top_fraction": 0.0}, "top_fraction"),
        ({"image_height": 2}, "image_height"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    kwargs = {"log_dir": "logs", **kwargs}
    with pytest.raises(ValueError, match=f"{name}="):
        keras_moe.RoutingMonitor(**kwargs)


def test_thresholds_can_be_switched_off():
    monitor = keras_moe.RoutingMonitor(
        "logs", zero_expert_fraction_threshold=None, max_mean_threshold=None,
        top_share_threshold=None,
    )
    assert monitor._collapse_reasons(
        monitoring.window_statistics([1.0, 0.0], [9, 0])
    ) == []
