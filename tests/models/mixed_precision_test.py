"""Mixed precision through `fit` for the language and translation models.

Under `mixed_bfloat16` and `mixed_float16` (with `compile`'s automatic loss
scaling) the models built from presets train: losses are finite and fall
over a few steps, the experts compute in the low precision, and the routing
(router logits, gates, balancing losses) stays in float32, the precision the
paper's noisy top-k gate and its CV^2 losses need.
"""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.models import presets, translation_presets

V, T, B = 12, 6, 8
POLICIES = ["mixed_bfloat16", "mixed_float16"]
NARROW_LM = dict(model_dim=16, expert_hidden_dim=16, dropout=0.0, seed=3, num_experts=8)
NARROW_MT = dict(model_dim=16, lstm_units=16, lstm_projection=16, expert_hidden_dim=16,
                 dropout=0.0, seed=3, num_experts=8, num_groups=2, k=2,
                 bidirectional_encoder=False, upper_context=False)


@pytest.fixture(params=POLICIES)
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    keras.utils.set_random_seed(0)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy(previous)


def _lm_data():
    rng = np.random.default_rng(0)
    # A learnable sequence: each token is the previous one plus one.
    start = rng.integers(1, V - T, size=(4 * B, 1))
    x = (start + np.arange(T)).astype("int32")[: 2 * B]
    return x, np.roll(x, -1, axis=1) * (np.arange(T) < T - 1)


def _compile(model, **kwargs):
    model.compile(optimizer=keras.optimizers.Adam(0.02), **kwargs)
    return model


def _routings(tree):
    if isinstance(tree, keras_moe.Routing):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree
    return [routing for item in items for routing in _routings(item)]


def _check_routing(model, inputs, policy):
    moes = [layer for layer in model.layers
            if isinstance(layer, (keras_moe.MoE, keras_moe.HierarchicalMoE))]
    assert moes
    _, routings = model(inputs, training=True, return_routing=True)
    routings = _routings(routings)
    assert routings
    for routing in routings:
        for name in ("gates", "importance", "load", "aux_loss", "clean_logits"):
            assert getattr(routing, name).dtype == "float32", name
    for layer in moes:
        assert layer.gating.compute_dtype == "float32"
        assert layer.experts.compute_dtype == policy.split("_")[1]
        assert layer.experts.variable_dtype == "float32"
    assert all(loss.dtype == "float32" for loss in model.losses)


def _check_fit(model, x, y, policy, epochs=3):
    losses = model.fit(x, y, batch_size=B, epochs=epochs, verbose=0, shuffle=False)
    losses = losses.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    wrapped = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert wrapped == (policy == "mixed_float16")
    return losses


def test_language_model_fits(policy):
    x, y = _lm_data()
    model = presets.build_language_model("cpu-moe-32-h", V, **{**NARROW_LM, "num_groups": 2})
    _compile(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _check_routing(model, x[:2], policy)
    logits = model(x[:2])
    assert logits.dtype == "float32"  # the softmax stays float32
    _check_fit(model, x, y, policy)


def test_language_model_with_sampled_softmax_fits():
    # The custom sampled step scales its loss itself (`optimizer.scale_loss`):
    # the float16 policy, where the loss-scale optimizer is in use, checks it.
    policy = "mixed_float16"
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        _sampled_softmax_fits(policy)
    finally:
        keras.config.set_dtype_policy(previous)


def _sampled_softmax_fits(policy):
    keras.utils.set_random_seed(0)
    x, y = _lm_data()
    model = presets.build_language_model("cpu-moe-32", V, num_sampled=4, **NARROW_LM)
    _compile(model)
    _check_fit(model, x, y, policy)


# Slow (about 22 s for both policies): the LM cases above run in `make test`.
@pytest.mark.slow
def test_translation_model_fits(policy):
    rng = np.random.default_rng(1)
    source = rng.integers(1, V, size=(2 * B, T)).astype("int32")
    # The target copies the source: target_in is it shifted right behind <s>=1.
    target = source.copy()
    target_in = np.concatenate([np.ones((2 * B, 1), "int32"), source[:, :-1]], axis=1)
    model = translation_presets.build_translation_model("cpu-gnmt-moe-16", V, **NARROW_MT)
    _compile(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs = {"source": source, "target_in": target_in}
    _check_routing(model, {k: v[:2] for k, v in inputs.items()}, policy)
    _check_fit(model, inputs, target, policy)
