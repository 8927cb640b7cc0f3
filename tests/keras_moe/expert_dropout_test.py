"""Expert dropout (`FeedForwardExperts(dropout=...)`, `MoE(expert_dropout=...)`).

Two kinds of check:
- exact, with identity experts on positive inputs: a hidden unit is either
  dropped (the output element is 0) or kept and scaled by `1 / (1 - p)`,
  so every output element is `0` or `x / (1 - p)` (`x / (1 - p)^L` for `L`
  hidden layers), and the kept fraction is `(1 - p)^L` within a binomial
  bound;
- Monte Carlo, on a random MoE: inverted dropout leaves the expectation
  alone, and the output is linear in each expert's hidden units, so the
  mean of many training calls (no gating noise) is the dense NumPy
  reference of the layer without dropout.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import dispatch
from tests.keras_moe.hierarchical_test import make_hmoe
from tests.keras_moe.hierarchical_test import reference_for as hierarchical_reference_for
from tests.keras_moe.moe_test import make_moe, reference_for

E, W = 3, 4


def identity_experts(rate, layers=1):
    experts = keras_moe.FeedForwardExperts(
        E, W, dropout=rate, num_hidden_layers=layers, seed=3
    )
    experts.build((None, W))
    eye = np.broadcast_to(np.eye(W, dtype=np.float32), (E, W, W))
    experts.w_in.assign(eye)
    experts.w_out.assign(eye)
    if layers > 1:
        experts.w_hidden.assign(np.broadcast_to(eye[:, None], (E, layers - 1, W, W)))
    return experts


def check_dropped_or_scaled(y, x, keep):
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    dropped = y == 0.0
    np.testing.assert_allclose(y[~dropped], x[~dropped] / keep, rtol=1e-5)
    n = x.size
    kept = 1.0 - dropped.mean()
    # Four binomial standard deviations.
    assert abs(kept - keep) < 4 * np.sqrt(keep * (1 - keep) / n), (kept, keep)


@pytest.mark.parametrize("layers", [1, 2])
def test_batched_call_drops_or_scales_each_hidden_unit(layers):
    rate = 0.3
    experts = identity_experts(rate, layers)
    x = np.random.default_rng(0).uniform(0.5, 1.5, size=(E, 2000, W)).astype(np.float32)
    check_dropped_or_scaled(experts(x, training=True), x, (1 - rate) ** layers)
    np.testing.assert_allclose(experts(x, training=False), x, rtol=1e-6)
    np.testing.assert_allclose(experts(x), x, rtol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_partitioned_call_drops_or_scales_each_hidden_unit(layers):
    rate = 0.4
    experts = identity_experts(rate, layers)
    rng = np.random.default_rng(1)
    parts = [rng.uniform(0.5, 1.5, size=(n, W)).astype(np.float32) for n in (3000, 1, 2500)]
    out = experts.apply_partitioned(parts, training=True)
    check_dropped_or_scaled(
        np.concatenate(out), np.concatenate(parts), (1 - rate) ** layers
    )
    for y, x in zip(experts.apply_partitioned(parts), parts, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 4.0])
def test_dispatch_functions_pass_training_to_the_experts(capacity_factor):
    # Called directly (outside a layer's call, so no Keras call context
    # supplies `training`): every token to expert `t % E` with gate 1.
    rate = 0.3
    experts = identity_experts(rate)
    n = 3000
    x = np.random.default_rng(5).uniform(0.5, 1.5, size=(n, W)).astype(np.float32)
    tokens = tf.range(n, dtype=tf.int32)
    args = (x, tokens, tokens % E, tf.ones([n]), experts, n)

    def run(training):
        if capacity_factor is None:
            return dispatch.dropless_dispatch(*args, training=training)
        y, dropped = dispatch.capacity_dispatch(*args, capacity_factor, training=training)
        assert float(dropped) == 0.0
        return y

    np.testing.assert_allclose(run(False), x, rtol=1e-6)
    check_dropped_or_scaled(run(True), x, 1 - rate)


def test_no_dropout_adds_no_state():
    # A layer without dropout keeps the variables (and files) it had before.
    plain = keras_moe.FeedForwardExperts(E, W)
    assert plain.seed_generator is None
    assert keras_moe.FeedForwardExperts(E, W, dropout=0.1).seed_generator is not None


def check_unbiased(layer, x, expected, draws=400):
    """Inference is the reference; the mean of `draws` training calls is too.

    The largest z-score of the mean over the output elements stays under 5,
    and the draws do differ (dropout is on).
    """
    np.testing.assert_allclose(layer(x, training=False), expected, rtol=1e-5, atol=1e-5)
    fn = tf.function(lambda v: layer(v, training=True))
    samples = np.stack([fn(x).numpy() for _ in range(draws)]).astype(np.float64)
    std = samples.std(0, ddof=1)
    assert std.max() > 0.1
    z = np.abs(samples.mean(0) - expected) / (std / np.sqrt(draws))
    assert z.max() < 5.0, z.max()


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(capacity_factor=8.0)],
    ids=["dropless", "capacity"],
)
def test_moe_training_mean_is_the_reference_without_dropout(kwargs):
    rng = np.random.default_rng(2)
    layer = make_moe(rng=rng, gating="top_k", expert_dropout=0.5, seed=5, **kwargs)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    check_unbiased(layer, x, reference_for(layer, x)["y"])


def test_hierarchical_moe_training_mean_is_the_reference_without_dropout():
    rng = np.random.default_rng(3)
    layer = make_hmoe(rng=rng, gating="top_k", expert_dropout=0.3, seed=7)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    check_unbiased(layer, x, hierarchical_reference_for(layer, x)["y"])


def test_expert_dropout_round_trips_and_bad_values_are_named():
    layer = keras_moe.MoE(4, 8, k=2, expert_dropout=0.25)
    clone = keras_moe.MoE.from_config(layer.get_config())
    assert clone.expert_dropout == 0.25 and clone.experts.dropout == 0.25
    experts = keras_moe.FeedForwardExperts(2, 3, dropout=0.5)
    assert keras_moe.FeedForwardExperts.from_config(experts.get_config()).dropout == 0.5
    for bad in (-0.1, 1.0, 1.5, float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match=f"expert_dropout.*Received: expert_dropout={bad!r}"):
            keras_moe.MoE(4, 8, k=2, expert_dropout=bad)
        with pytest.raises(ValueError, match=f"`dropout`.*Received: dropout={bad!r}"):
            keras_moe.FeedForwardExperts(2, 3, dropout=bad)


def test_saved_layer_reloads_with_its_expert_dropout(tmp_path):
    inputs = keras.Input((3, 5))
    outputs = keras_moe.MoE(4, 8, k=2, expert_dropout=0.2, name="moe")(inputs)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("moe").expert_dropout == 0.2
    x = np.random.default_rng(4).normal(size=(2, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)
