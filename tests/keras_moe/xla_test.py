"""Capacity mode compiles with XLA (static shapes); dropless mode declines it."""

import keras
import numpy as np
import pytest
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


# The MoE layers of the reproduce configs (pipelines/configs/reproduce/*.yaml,
# through the presets of keras_moe.models), scaled down: the same gating, k,
# groups and balancing weights, with E and the widths cut (E / 8 for the
# flat layers; fewer experts per group for the hierarchical ones). The
# gates are noise-free (`top_k`) so that the XLA and graph runs can be
# compared number for number: XLA draws the gating noise from another
# random stream (`test_fit_with_jit_compile_in_capacity_mode` fits the
# noisy gate under XLA).
REPRODUCE_LAYERS = {
    # lm1b-moe-4 / -32 / -256: flat noisy top-4, w_importance = w_load = 0.1.
    "lm1b-moe-256": lambda cf: keras_moe.MoE(
        32, 16, k=4, importance_weight=0.1, load_weight=0.1, capacity_factor=cf, seed=1,
        gating="top_k", name="moe"),
    # lm1b-moe-256-h / -1024-h / -4096-h: 16 groups, 2 groups x 2 experts.
    "lm1b-moe-4096-h": lambda cf: keras_moe.HierarchicalMoE(
        16, 4, 16, k_primary=2, k_secondary=2, capacity_factor=cf, seed=1, gating="top_k",
        name="moe"),
    # wmt14-*-moe-2048-h: 32 groups, 2 x 2, w_importance = w_load = 0.01.
    "wmt14-moe-2048-h": lambda cf: keras_moe.HierarchicalMoE(
        32, 2, 16, k_primary=2, k_secondary=2, importance_weight=0.01, load_weight=0.01,
        capacity_factor=cf, seed=1, gating="top_k", name="moe"),
}


def _reproduce_model(name, capacity_factor, jit_compile):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 12))
    moe = REPRODUCE_LAYERS[name](capacity_factor)
    model = keras.Model(inputs, keras.layers.Dense(12)(moe(inputs)))
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    return model


def _fit(model):
    rng = np.random.RandomState(0)
    x, y = rng.normal(size=(32, 6, 12)), rng.normal(size=(32, 6, 12))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    return history.history


@pytest.mark.parametrize("name, capacity_factor", [("lm1b-moe-256", 1.25)])
def test_reproduce_layers_fit_under_xla_as_without(name, capacity_factor):
    xla = _reproduce_model(name, capacity_factor, jit_compile=True)
    plain = _reproduce_model(name, capacity_factor, jit_compile=False)
    xla_history, plain_history = _fit(xla), _fit(plain)
    assert xla.jit_compile is True and plain.jit_compile is False
    for key, values in plain_history.items():
        np.testing.assert_allclose(xla_history[key], values, rtol=2e-4, atol=1e-5, err_msg=key)
    for a, b in zip(plain.weights, xla.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-4, err_msg=a.path)
    # XLA really compiled this step: its HLO exists, with the dispatch in it.
    x, y = np.zeros((16, 6, 12), "float32"), np.zeros((16, 6, 12), "float32")
    step = tf.function(xla.train_step, jit_compile=True)
    hlo = step.experimental_get_compiler_ir((x, y))(stage="hlo")
    assert "HloModule" in hlo and "scatter" in hlo


@pytest.mark.parametrize("name, capacity_factor", [
    ("lm1b-moe-4096-h", 2.0), ("wmt14-moe-2048-h", 1.0),
])
def test_hierarchical_reproduce_layers_train_without_xla_when_asked_for_it(
        name, capacity_factor):
    # HierarchicalGating's second level runs each group's gate on its own rows
    # (data-dependent shapes that XLA rejects): the layer says so
    # (`supports_jit=False`), and `jit_compile=True` trains it without XLA,
    # exactly as `jit_compile=False` does, instead of failing to compile.
    with pytest.warns(UserWarning, match="jit_compile"):
        asked = _reproduce_model(name, capacity_factor, jit_compile=True)
    plain = _reproduce_model(name, capacity_factor, jit_compile=False)
    assert asked.jit_compile is False
    asked_history, plain_history = _fit(asked), _fit(plain)
    for key, values in plain_history.items():
        np.testing.assert_allclose(asked_history[key], values, rtol=1e-6, err_msg=key)


def test_layers_xla_cannot_compile_turn_jit_compile_off():
    # Keras keeps `jit_compile=True` only when every layer `supports_jit`
    # (so `xla.jit_compile is True` above means the fit ran under XLA).
    # Dropless dispatch and App. F's batchwise mask have data-dependent
    # shapes (a batchwise gate yields a data-dependent number of pairs, even
    # with a capacity): their models train without XLA instead of failing.
    inputs = keras.Input((6, 12))
    for layer in (keras_moe.MoE(4, 8, k=2),
                  keras_moe.MoE(4, 8, k=2, gating="batchwise", capacity_factor=2.0)):
        assert not layer.supports_jit
        model = keras.Model(inputs, layer(inputs))
        model.compile("adam", "mse", jit_compile=True)
        assert model.jit_compile is False
        history = _fit(model)
        assert np.all(np.isfinite(history["loss"]))


def test_recomputed_experts_fit_under_xla_as_the_plain_graph():
    # `recompute_hidden=True` (tf.recompute_grad) compiles with XLA too.
    def trained(recompute, jit_compile):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 12))
        moe = keras_moe.MoE(8, 16, k=2, capacity_factor=1.25, gating="top_k", seed=1,
                            recompute_hidden=recompute, name="moe")
        model = keras.Model(inputs, keras.layers.Dense(12)(moe(inputs)))
        model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
        return model, _fit(model)

    plain, plain_history = trained(False, False)
    xla, xla_history = trained(True, True)
    assert xla.jit_compile is True
    np.testing.assert_allclose(xla_history["loss"], plain_history["loss"], rtol=2e-4)
    for a, b in zip(plain.weights, xla.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-4, err_msg=a.path)
