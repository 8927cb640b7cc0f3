"""Capacity mode compiles with XLA (static shapes); dropless mode declines it."""

import keras
import numpy as np
import tensorflow as tf

import keras_moe


def test_capacity_mode_compiles_with_xla_and_matches_graph_mode():
    layer = keras_moe.MoE(8, 16, k=2, gating="top_k", capacity_factor=1.0, seed=3)
    x = tf.random.normal([4, 6, 12], seed=1)
    layer.build(x.shape)
    layer.gating.w_gate.assign(np.random.RandomState(0).normal(size=(12, 8)).astype("float32"))
    eager_y, eager_routing = layer(x, training=False, return_routing=True)
    compiled = tf.function(
        lambda t: layer(t, training=False, return_routing=True), jit_compile=True
    )
    xla_y, xla_routing = compiled(x)
    np.testing.assert_allclose(xla_y.numpy(), eager_y.numpy(), rtol=1e-5, atol=1e-5)
    assert float(xla_routing.dropped_fraction) == float(eager_routing.dropped_fraction)
    assert layer.supports_jit


def test_fit_with_jit_compile_in_capacity_mode():
    inputs = keras.Input((6, 12))
    moe = keras_moe.MoE(8, 16, k=2, capacity_factor=1.25, name="moe")
    model = keras.Model(inputs, keras.layers.Dense(1)(moe(inputs)))
    model.compile("adam", "mse", jit_compile=True)
    rng = np.random.RandomState(0)
    history = model.fit(rng.normal(size=(32, 6, 12)), rng.normal(size=(32, 6, 1)), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert "moe_dropped_fraction" in history.history


def test_dropless_layer_keeps_auto_jit_off():
    # Dropless dispatch has data-dependent shapes; `jit_compile="auto"`
    # must not choose XLA for a model that contains it.
    assert not keras_moe.MoE(4, 8, k=2).supports_jit
    assert keras_moe.MoE(4, 8, k=2, capacity_factor=2.0).supports_jit
