"""Tests of `keras_moe.MoE` against a dense NumPy reference (tests/keras_moe/reference.py)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from tests.keras_moe import reference as ref

D = 5


def randomize(layer, rng, gate_scale=1.5, expert_scale=0.6):
    """Random non-zero gating and expert weights, so routing is non-trivial."""
    gating = layer.gating
    gating.w_gate.assign(rng.normal(size=gating.w_gate.shape) * gate_scale)
    ex = layer.experts
    for v in (ex.w_in, ex.b_in, ex.w_out, ex.b_out):
        v.assign(rng.normal(size=v.shape) * expert_scale)


def make_moe(d=D, num_experts=5, hidden=4, k=2, rng=None, gate_scale=1.5, **kwargs):
    layer = keras_moe.MoE(num_experts, hidden, k=k, **kwargs)
    layer.build((None, d))
    randomize(layer, rng if rng is not None else np.random.default_rng(0), gate_scale=gate_scale)
    return layer


def reference_for(layer, x, keep=None):
    return ref.moe_reference(
        x, ref.as_np(layer.gating.w_gate), *ref.expert_weights(layer), layer.k, keep=keep
    )


def normal(rng, *shape):
    return rng.normal(size=shape).astype("float32")


def counts_from(indices, num_experts):
    idx = np.asarray(indices).reshape(-1)
    return np.bincount(idx[idx >= 0], minlength=num_experts).astype(np.float64)


# ----------------------------------------------------------- forward pass ---


@pytest.mark.parametrize("lead", [(7,), (2, 3), (2, 2, 3)], ids=["rank2", "rank3", "rank4"])
@pytest.mark.parametrize("output_dim", [None, 3])
def test_output_equals_dense_reference(lead, output_dim):
    rng = np.random.default_rng(1)
    layer = make_moe(num_experts=6, hidden=4, k=2, output_dim=output_dim, rng=rng)
    x = normal(rng, *lead, D)
    y = layer(x, training=False)
    expected = reference_for(layer, x)["y"]
    assert tuple(y.shape) == lead + (output_dim or D,)
    assert tuple(layer.compute_output_shape((None,) * len(lead) + (D,)))[-1] == (output_dim or D)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    # Routing is non-trivial: more than k experts are used over the batch.
    assert len(np.unique(reference_for(layer, x)["indices"])) > layer.k


@pytest.mark.parametrize("k", [1, 3, 6])
def test_output_equals_reference_for_each_k(k):
    rng = np.random.default_rng(2)
    layer = make_moe(num_experts=6, hidden=3, k=k, rng=rng)
    x = normal(rng, 9, D)
    np.testing.assert_allclose(
        layer(x, training=False).numpy(), reference_for(layer, x)["y"], rtol=1e-5, atol=1e-5
    )


def test_top_k_gating_in_training_has_no_noise():
    # gating="top_k" is deterministic, so even training=True follows the reference.
    rng = np.random.default_rng(3)
    layer = make_moe(num_experts=5, k=2, gating="top_k", rng=rng)
    x = normal(rng, 2, 4, D)
    y, routing = layer(x, training=True, return_routing=True)
    np.testing.assert_allclose(y.numpy(), reference_for(layer, x)["y"], rtol=1e-5, atol=1e-5)
    assert routing.noise_std is None


def test_noisy_training_output_is_a_gate_mixture_of_expert_outputs():
    # With noise the routing is random, but whatever it chose, the output must
    # be the gate-weighted sum of the chosen experts' outputs.
    rng = np.random.default_rng(4)
    layer = make_moe(num_experts=5, k=2, rng=rng)
    layer.gating.w_noise.assign(normal(rng, D, 5))
    x = normal(rng, 8, D)
    y, routing = layer(x, training=True, return_routing=True)
    dense = ref.dense_gates(routing.expert_indices.numpy(), routing.gates.numpy(), 5)
    expert_out, _ = ref.all_experts(x, *ref.expert_weights(layer))
    np.testing.assert_allclose(
        y.numpy(), np.einsum("ne,neo->no", dense, expert_out), rtol=1e-5, atol=1e-5
    )
    noise_std = routing.noise_std.numpy()
    np.testing.assert_allclose(
        noise_std,
        np.log1p(np.exp(x @ ref.as_np(layer.gating.w_noise))) + layer.noise_epsilon,
        rtol=1e-5,
    )


def test_softmax_gating_is_the_dense_softmax_mixture():
    rng = np.random.default_rng(5)
    e = 4
    layer = make_moe(num_experts=e, hidden=3, k=e, gating="softmax", rng=rng)
    x = normal(rng, 2, 3, D)
    flat = x.reshape(-1, D)
    probs = ref.softmax(flat @ ref.as_np(layer.gating.w_gate))
    expert_out, _ = ref.all_experts(flat, *ref.expert_weights(layer))
    expected = np.einsum("ne,neo->no", probs, expert_out).reshape(2, 3, D)
    y, routing = layer(x, training=False, return_routing=True)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(routing.importance.numpy(), probs.sum(0), rtol=1e-5)


# -------------------------------------------------------------- gradients ---


@pytest.mark.parametrize("output_dim", [None, 3])
def test_gradients_equal_dense_reference(output_dim):
    rng = np.random.default_rng(6)
    e, k = 5, 2
    layer = make_moe(num_experts=e, hidden=4, k=k, output_dim=output_dim, rng=rng)
    x = tf.constant(normal(rng, 2, 4, D))
    out = output_dim or D
    r = normal(rng, 2, 4, out)
    ex = layer.experts
    variables = {
        "w_in": ex.w_in, "b_in": ex.b_in, "w_out": ex.w_out, "b_out": ex.b_out,
        "w_gate": layer.gating.w_gate,
    }
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=False)
        loss = tf.reduce_sum(y * r)
    grads = tape.gradient(loss, {"x": x, **variables})
    expected = ref.moe_reference_gradients(
        x.numpy().reshape(-1, D), ref.as_np(layer.gating.w_gate), *ref.expert_weights(layer),
        k, r.reshape(-1, out),
    )
    expected["x"] = expected["x"].reshape(2, 4, D)
    for name, g in grads.items():
        g = tf.convert_to_tensor(g).numpy()
        np.testing.assert_allclose(g, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # The gate path is exercised: W_gate (and x through it) get a real gradient.
    assert np.abs(expected["w_gate"]).max() > 1e-2


# ---------------------------------------------------------------- routing ---


def test_routing_matches_numpy_top_k():
    rng = np.random.default_rng(7)
    e, k = 6, 3
    layer = make_moe(num_experts=e, k=k, rng=rng)
    x = normal(rng, 2, 3, D)
    y, routing = layer(x, training=False, return_routing=True)
    expected = reference_for(layer, x)
    assert routing.expert_indices.dtype == tf.int32
    assert tuple(routing.expert_indices.shape) == (2, 3, k)
    assert tuple(routing.gates.shape) == (2, 3, k)
    np.testing.assert_array_equal(
        routing.expert_indices.numpy().reshape(-1, k), expected["indices"]
    )
    gates = routing.gates.numpy()
    assert (gates >= 0).all()
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(gates.reshape(-1, k), expected["gates"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.importance.numpy(), expected["dense"].sum(0), rtol=1e-5)
    counts = counts_from(expected["indices"], e)
    np.testing.assert_array_equal(routing.counts.numpy(), counts)
    np.testing.assert_array_equal(routing.load.numpy(), counts)
    assert float(routing.dropped_fraction) == 0.0
    np.testing.assert_allclose(
        routing.clean_logits.numpy().reshape(-1, e), expected["logits"], rtol=1e-5, atol=1e-5
    )
    assert routing.noise_std is None


# --------------------------------------------------------------- capacity ---


def test_large_capacity_factor_equals_dropless():
    rng = np.random.default_rng(8)
    dropless = make_moe(num_experts=4, k=2, rng=rng)
    capped = keras_moe.MoE(4, 4, k=2, capacity_factor=100.0)
    capped.build((None, D))
    capped.set_weights(dropless.get_weights())
    x = normal(rng, 3, 4, D)
    y0, r0 = dropless(x, training=False, return_routing=True)
    y1, r1 = capped(x, training=False, return_routing=True)
    np.testing.assert_allclose(y1.numpy(), y0.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y1.numpy(), reference_for(capped, x)["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r1.expert_indices.numpy(), r0.expert_indices.numpy())
    assert float(r1.dropped_fraction) == 0.0


def test_capacity_drops_second_choices_before_first_choices():
    # Hand-built routing. W_gate = I, so the logits are x itself:
    #   token 0 [3, 2, 0] -> experts (0, 1)
    #   token 1 [2, 3, 0] -> experts (1, 0)
    #   token 2 [3, 0, 2] -> experts (0, 2)
    #   token 3 [0, 2, 3] -> experts (2, 1)
    # P = 8 pairs, E = 3, capacity_factor 0.7: C = ceil(0.7 * 8 / 3) = ceil(1.87) = 2.
    # Expert 0 queue: first choices t0, t2, then second choice t1 -> t1's pair dropped
    #   (in plain token order t1 would come before t2 and t2 would be dropped instead).
    # Expert 1 queue: first choice t1, then second choices t0, t3 -> t3's pair dropped.
    # Expert 2 queue: first choice t3, then second choice t2 -> both kept.
    # dropped_fraction = 2 / 8.
    layer = keras_moe.MoE(3, 4, k=2, capacity_factor=0.7)
    layer.build((None, 3))
    randomize(layer, np.random.default_rng(9))
    layer.gating.w_gate.assign(np.eye(3))
    x = np.array([[3, 2, 0], [2, 3, 0], [3, 0, 2], [0, 2, 3]], np.float32)
    keep = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    expected_indices = np.array([[0, 1], [1, 0], [0, 2], [2, 1]])

    assert ref.capacity(0.7, 8, 3) == 2
    np.testing.assert_array_equal(ref.capacity_keep(expected_indices, 3, 2), keep)

    y, routing = layer(x, training=False, return_routing=True)
    np.testing.assert_array_equal(routing.expert_indices.numpy(), expected_indices)
    np.testing.assert_allclose(float(routing.dropped_fraction), 0.25, rtol=1e-6)
    expected = reference_for(layer, x, keep=keep)
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-5)
    # Not renormalised: token 1 keeps only its first gate, < 1.
    assert expected["dense"][1].sum() < 0.99
    full = reference_for(layer, x)["y"]
    assert np.abs(full[1] - expected["y"][1]).max() > 1e-3
    np.testing.assert_allclose(y.numpy()[[0, 2]], full[[0, 2]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.5, 0.8])
def test_capacity_random_case_matches_numpy_queue(capacity_factor):
    rng = np.random.default_rng(10)
    e, k = 4, 2
    layer = make_moe(num_experts=e, k=k, capacity_factor=capacity_factor, rng=rng, gate_scale=3.0)
    x = normal(rng, 3, 4, D)
    y, routing = layer(x, training=False, return_routing=True)
    expected_all = reference_for(layer, x)
    cap = ref.capacity(capacity_factor, 12 * k, e)
    keep = ref.capacity_keep(expected_all["indices"], e, cap)
    assert (~keep).sum() > 0
    expected = reference_for(layer, x, keep=keep)
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(routing.dropped_fraction), (~keep).mean(), rtol=1e-6)


# ---------------------------------------------------------------- masking ---


class RoutingSpy(keras_moe.MoE):
    """An MoE that keeps the routing of its last call (to observe Keras masks)."""

    def call(self, inputs, training=None, mask=None, return_routing=False):
        y, routing = super().call(inputs, training=training, mask=mask, return_routing=True)
        self.last_routing = routing
        self.last_mask = mask
        return (y, routing) if return_routing else y


def check_masked_call(layer, x, mask, y, routing):
    """Masked positions: output 0, indices -1, gates 0; the rest as on unmasked tokens only."""
    mask = np.asarray(mask, bool)
    k, e = layer.k, layer.num_experts
    y = np.asarray(y)
    assert (y[~mask] == 0).all()
    idx, gates = routing.expert_indices.numpy(), routing.gates.numpy()
    assert (idx[~mask] == -1).all()
    assert (gates[~mask] == 0).all()

    kept = x[mask]
    expected = reference_for(layer, kept)
    np.testing.assert_allclose(y[mask], expected["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idx[mask].reshape(-1, k), expected["indices"])
    np.testing.assert_allclose(gates[mask].reshape(-1, k), expected["gates"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.importance.numpy(), expected["dense"].sum(0), rtol=1e-5)
    np.testing.assert_array_equal(routing.counts.numpy(), counts_from(expected["indices"], e))
    np.testing.assert_array_equal(routing.load.numpy(), routing.counts.numpy())

    # ... and the same as a call on the unmasked positions alone.
    _, alone = layer(kept, training=False, return_routing=True)
    np.testing.assert_allclose(routing.importance.numpy(), alone.importance.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(routing.counts.numpy(), alone.counts.numpy())
    assert float(routing.dropped_fraction) == 0.0


MODES = pytest.mark.parametrize("capacity_factor", [None, 100.0], ids=["dropless", "capacity"])


@MODES
def test_explicit_mask(capacity_factor):
    rng = np.random.default_rng(11)
    layer = make_moe(num_experts=5, k=2, capacity_factor=capacity_factor, rng=rng)
    x = normal(rng, 2, 4, D)
    mask = np.array([[True, False, True, True], [False, False, True, False]])
    # Garbage at masked positions must not leak anywhere. Dropless removes
    # masked positions before routing (they are never computed), so even NaN
    # there is harmless; capacity mode gates them, so use finite garbage.
    garbage = np.nan if capacity_factor is None else 1e6
    clean = x.copy()
    x[~mask] = garbage
    y, routing = layer(x, training=False, mask=tf.constant(mask), return_routing=True)
    assert np.isfinite(routing.importance.numpy()).all()
    assert np.isfinite(float(routing.aux_loss))
    x = clean
    check_masked_call(layer, x, mask, y, routing)
    # Without the mask, masked positions would not be zero (biases are non-zero).
    assert np.abs(layer(x, training=False).numpy()[~mask]).min() > 0


def test_masked_tokens_take_no_capacity():
    # E = 2, k = 1, W_gate = I. Tokens 0-4 prefer expert 0, token 5 expert 1;
    # token 0 is masked. P = 6 (or 5 valid): C = ceil(1.0 * 6 / 2) = ceil(2.5) = 3.
    # Valid queue of expert 0: t1, t2, t3 kept, t4 dropped. Had the masked t0 taken
    # a place, t3 would have been dropped too. dropped_fraction = 1 / 5 valid pairs.
    layer = keras_moe.MoE(2, 3, k=1, capacity_factor=1.0)
    layer.build((None, 2))
    randomize(layer, np.random.default_rng(12))
    layer.gating.w_gate.assign(np.eye(2))
    x = np.array([[2, 1], [3, 1], [2, 0], [1, 0], [4, 3], [0, 1]], np.float32)
    mask = np.array([False, True, True, True, True, True])
    y, routing = layer(x, training=False, mask=mask, return_routing=True)
    np.testing.assert_allclose(float(routing.dropped_fraction), 0.2, rtol=1e-6)
    keep = np.array([[False], [True], [True], [True], [False], [True]])
    expected = reference_for(layer, x, keep=keep)["y"]
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (y.numpy()[[0, 4]] == 0).all()
    np.testing.assert_array_equal(routing.expert_indices.numpy()[:, 0], [-1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(routing.counts.numpy(), [4.0, 1.0])


@MODES
def test_mask_from_masking_layer_in_functional_model(capacity_factor):
    rng = np.random.default_rng(13)
    inputs = keras.Input((4, D))
    spy = RoutingSpy(5, 4, k=2, capacity_factor=capacity_factor)
    model = keras.Model(inputs, spy(keras.layers.Masking(mask_value=0.0)(inputs)))
    randomize(spy, rng)
    x = normal(rng, 3, 4, D)
    mask = np.array([[True, True, False, True], [False, True, True, True], [True] * 4])
    x[~mask] = 0.0
    y = model(x, training=False)
    assert spy.last_mask is not None
    check_masked_call(spy, x, mask, y, spy.last_routing)


def test_mask_from_embedding_mask_zero():
    rng = np.random.default_rng(14)
    inputs = keras.Input((5,), dtype="int32")
    embedding = keras.layers.Embedding(7, D, mask_zero=True)
    spy = RoutingSpy(4, 3, k=2)
    model = keras.Model(inputs, spy(embedding(inputs)))
    randomize(spy, rng)
    ids = np.array([[3, 1, 0, 0, 0], [0, 6, 2, 5, 0]], np.int32)
    mask = ids != 0
    y = model(ids, training=False)
    vectors = ref.as_np(embedding.embeddings)[ids].astype(np.float32)
    check_masked_call(spy, vectors, mask, y, spy.last_routing)


# ---------------------------------------------------------- balancing loss ---


def test_balancing_loss_in_training_only():
    rng = np.random.default_rng(15)
    layer = make_moe(num_experts=5, k=2, importance_weight=0.3, load_weight=0.7, rng=rng)
    layer.gating.w_noise.assign(normal(rng, D, 5) * 0.3)
    x = normal(rng, 3, 4, D)
    _, routing = layer(x, training=True, return_routing=True)
    assert len(layer.losses) == 1
    # Importance is the sum of the returned gates; load the smooth estimate.
    dense = ref.dense_gates(routing.expert_indices.numpy(), routing.gates.numpy(), 5)
    importance = routing.importance.numpy()
    np.testing.assert_allclose(importance, dense.sum(0), rtol=1e-5)
    load = ref.as_np(routing.load)
    assert not np.allclose(load, routing.counts.numpy())  # smooth, not counts
    assert (load >= 0).all() and (load <= 12).all()
    expected = 0.3 * ref.cv_squared(importance) + 0.7 * ref.cv_squared(load)
    assert expected > 1e-3
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(routing.aux_loss), expected, rtol=1e-5)

    layer(x, training=False)
    assert layer.losses == []


def test_balancing_loss_without_noise_from_reference():
    # gating="top_k": load = counts, everything computable from the numpy reference.
    rng = np.random.default_rng(16)
    layer = make_moe(
        num_experts=5, k=2, gating="top_k", importance_weight=0.25, load_weight=2.0, rng=rng
    )
    x = normal(rng, 10, D)
    layer(x, training=True)
    expected = reference_for(layer, x)
    importance = expected["dense"].sum(0)
    counts = counts_from(expected["indices"], 5)
    value = 0.25 * ref.cv_squared(importance) + 2.0 * ref.cv_squared(counts)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), value, rtol=1e-5)


# ------------------------------------------------ layer test, fit, metrics ---


def test_run_layer_test_and_metrics_in_fit_logs():
    _, history = ref.run_layer_test(
        keras_moe.MoE,
        dict(num_experts=4, expert_hidden_dim=5, k=2, output_dim=3, seed=3, name="moe"),
        input_shape=(4, 3, 6),
        expected_output_shape=(4, 3, 3),
        expected_num_trainable_weights=6,
    )
    for stat in (
        "cv_importance", "cv_load", "max_mean_load", "zero_expert_fraction", "dropped_fraction",
    ):
        values = history.history[f"moe_{stat}"]
        assert len(values) == 1 and np.isfinite(values[0]), stat
    logs = history.history
    assert logs["moe_dropped_fraction"][0] == 0.0
    assert 0.0 <= logs["moe_zero_expert_fraction"][0] <= 1.0
    assert logs["moe_max_mean_load"][0] >= 1.0


# -------------------------------------------------------- mixed precision ---


def test_mixed_bfloat16():
    rng = np.random.default_rng(17)
    f32 = make_moe(num_experts=4, k=2, output_dim=3, rng=rng)
    mixed = keras_moe.MoE(4, 4, k=2, output_dim=3, dtype=keras.DTypePolicy("mixed_bfloat16"))
    mixed.build((None, D))
    mixed.set_weights(f32.get_weights())
    # Inputs representable in bfloat16, so both layers route the same tokens.
    x = tf.cast(tf.cast(normal(rng, 2, 4, D), tf.bfloat16), tf.float32)

    y, routing = mixed(x, training=False, return_routing=True)
    y32, routing32 = f32(x, training=False, return_routing=True)
    assert y.dtype == tf.bfloat16
    assert routing.gates.dtype == tf.float32
    assert mixed.gating.w_gate.dtype == "float32" and mixed.gating.w_noise.dtype == "float32"
    assert mixed.experts.w_in.dtype == "float32"
    assert mixed.experts.compute_dtype == "bfloat16"
    np.testing.assert_array_equal(routing.expert_indices.numpy(), routing32.expert_indices.numpy())
    np.testing.assert_allclose(routing.gates.numpy(), routing32.gates.numpy(), rtol=1e-5)
    scale = np.abs(y32.numpy()).max()
    np.testing.assert_allclose(
        tf.cast(y, tf.float32).numpy(), y32.numpy(), atol=0.03 * scale, rtol=0.03
    )

    inputs = keras.Input((4, D))
    model = keras.Model(
        inputs,
        keras_moe.MoE(4, 4, k=2, output_dim=3, dtype=keras.DTypePolicy("mixed_bfloat16"))(inputs),
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = model.fit(x, normal(rng, 2, 4, 3), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# ------------------------------------------------------- invalid arguments ---


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(k=0), ["k", "0"]),
        (dict(k=5), ["k", "5"]),
        (dict(num_experts=0, k=1), ["num_experts", "0"]),
        (dict(gating="bogus"), ["gating", "bogus"]),
        (dict(capacity_factor=0), ["capacity_factor", "0"]),
        (dict(capacity_factor=-1.5), ["capacity_factor", "-1.5"]),
        (dict(importance_weight=-0.1), ["importance_weight", "-0.1"]),
        (dict(load_weight=-2), ["load_weight", "-2"]),
        (dict(expert_hidden_dim=0), ["expert_hidden_dim", "0"]),
    ],
)
def test_invalid_arguments(kwargs, fragments):
    args = dict(num_experts=4, expert_hidden_dim=3, k=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        keras_moe.MoE(**args)
    message = str(info.value)
    name, value = fragments
    assert f"{name}={value}" in message or f"{name}='{value}'" in message, message


# ---------------------------------------------------------- serialization ---


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=4, expert_hidden_dim=3, k=2),
        dict(
            num_experts=6, expert_hidden_dim=2, k=1, output_dim=3, gating="switch",
            importance_weight=0.2, load_weight=0.05, capacity_factor=1.25, use_bias=False,
            expert_activation="gelu", seed=7, name="my_moe",
        ),
        dict(num_experts=5, expert_hidden_dim=2, k=2, gating="batchwise", threshold_weight=0.5),
    ],
    ids=["default", "custom", "batchwise"],
)
def test_get_config_round_trip(kwargs):
    layer = keras_moe.MoE(**kwargs)
    config = layer.get_config()
    for key, value in kwargs.items():
        if key != "gating":
            assert config[key] == value, key
    assert config["gating"] == kwargs.get("gating", "noisy_top_k")
    clone = keras_moe.MoE.from_config(config)
    assert clone.get_config() == config
    assert json.loads(json.dumps(config)) == config


def _model_with(layer, input_shape, rng):
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, layer(keras.layers.Dense(input_shape[-1])(inputs)))
    gating = layer.gating
    if isinstance(layer, keras_moe.HierarchicalMoE):
        gating.primary.w_gate.assign(rng.normal(size=gating.primary.w_gate.shape))
    gating.w_gate.assign(rng.normal(size=gating.w_gate.shape))
    for v in layer.experts.weights:
        v.assign(rng.normal(size=v.shape) * 0.5)
    return model


def test_saved_model_reloads_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(18)
    models = {
        "moe": _model_with(
            keras_moe.MoE(5, 4, k=2, output_dim=3, capacity_factor=2.0, name="moe"), (3, D), rng
        ),
        "hierarchical": _model_with(
            keras_moe.HierarchicalMoE(3, 2, 4, k_primary=2, k_secondary=1, name="hmoe"),
            (3, D), rng,
        ),
        "batchwise": _model_with(
            keras_moe.MoE(4, 3, k=2, gating="batchwise", name="bmoe"), (3, D), rng
        ),
    }
    x = normal(rng, 4, 3, D)
    np.save(tmp_path / "x.npy", x)
    for name, model in models.items():
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}_expected.npy", model(x, training=False).numpy())

    script = textwrap.dedent(
        """
        import sys, pathlib
        import numpy as np
        import keras_moe  # registers the layers; nothing else is passed to load_model
        import keras

        root = pathlib.Path(sys.argv[1])
        x = np.load(root / "x.npy")
        for name in ("moe", "hierarchical", "batchwise"):
            model = keras.saving.load_model(root / f"{name}.keras")
            np.save(root / f"{name}_reloaded.npy", model(x, training=False).numpy())
            print(name, type(model.layers[-1]).__name__, model.layers[-1].gating_type)
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert "moe MoE noisy_top_k" in lines
    assert "hierarchical HierarchicalMoE noisy_top_k" in lines
    assert "batchwise MoE batchwise" in lines
    for name in models:
        expected = np.load(tmp_path / f"{name}_expected.npy")
        reloaded = np.load(tmp_path / f"{name}_reloaded.npy")
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(reloaded, expected, rtol=1e-6, atol=1e-6, err_msg=name)


# ------------------------------------------- symbolic inputs and observers ---


def test_return_routing_on_a_symbolic_input_raises_naming_it():
    inputs = keras.Input((5, 6))
    layer = keras_moe.MoE(4, 8, k=2, name="moe")
    with pytest.raises(ValueError, match="return_routing"):
        layer(inputs, return_routing=True)
    with pytest.raises(ValueError, match="return_routing"):
        keras_moe.HierarchicalMoE(2, 2, 8, k_primary=1, k_secondary=1)(
            inputs, return_routing=True
        )
    # Without it the symbolic call builds a functional model as before.
    model = keras.Model(inputs, layer(inputs))
    assert model.output.shape == (None, 5, 6)
    _, routing = layer(np.ones((2, 5, 6), "float32"), return_routing=True)
    assert routing.expert_indices.shape == (2, 5, 2)


def test_routing_observers_see_every_call_and_can_be_removed():
    layer = keras_moe.MoE(4, 8, k=2, gating="top_k", name="moe")
    x = np.random.default_rng(0).standard_normal((3, 6)).astype("float32")
    seen = []

    def observer(inputs, routing, training):
        seen.append((inputs, routing, training))

    layer.add_routing_observer(observer)
    assert layer.routing_observers == (observer,)
    _, returned = layer(x, training=True, return_routing=True)
    (inputs, observed, training), = seen
    assert training is True
    np.testing.assert_array_equal(np.asarray(inputs), x)
    # The observer gets the very Routing that return_routing=True returns.
    assert observed is returned
    # In a traced function it sees symbolic tensors and can return them.
    seen.clear()
    traced = tf.function(lambda t: (layer(t), seen[-1][1].counts))
    _, counts = traced(tf.constant(x))
    np.testing.assert_array_equal(counts.numpy(), returned.counts.numpy())
    layer.remove_routing_observer(observer)
    assert layer.routing_observers == ()
    with pytest.raises(ValueError, match="observer"):
        layer.remove_routing_observer(observer)
    with pytest.raises(ValueError, match="observer"):
        layer.add_routing_observer("not callable")


# ------------------------------------ .keras files of the previous layout ---

LEGACY = os.path.join(os.path.dirname(__file__), "legacy")


@pytest.mark.parametrize("name", ["switch", "softmax", "noisy", "hierarchical"])
def test_keras_files_saved_before_the_gating_classes_load_and_agree(name):
    """Files written by keras_moe before SwitchGating / SoftmaxGating existed.

    `legacy/<name>.keras` and `<name>.npz` were saved by the previous
    implementation (gating rules inside NoisyTopKGating, `_init_base`), with
    the outputs it gave on `legacy/x.npy`.
    """
    model = keras.saving.load_model(os.path.join(LEGACY, f"{name}.keras"))
    layer = model.get_layer("moe")
    expected = np.load(os.path.join(LEGACY, f"{name}.npz"))
    x = np.load(os.path.join(LEGACY, "x.npy"))
    gate_class = {
        "switch": keras_moe.SwitchGating, "softmax": keras_moe.SoftmaxGating,
        "noisy": keras_moe.NoisyTopKGating, "hierarchical": keras_moe.HierarchicalGating,
    }[name]
    assert type(layer.gating) is gate_class
    y, routing = layer(x, return_routing=True)
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(routing.expert_indices.numpy(), expected["indices"])
    np.testing.assert_allclose(routing.gates.numpy(), expected["gates"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(routing.importance.numpy(), expected["importance"], rtol=1e-5)
    np.testing.assert_allclose(float(routing.aux_loss), expected["aux"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model(x).numpy(), expected["y"], rtol=1e-5, atol=1e-6)


def test_a_gate_config_of_the_old_switch_and_softmax_rules_still_deserializes():
    old = {"num_experts": 4, "k": 1, "gating": "switch", "importance_weight": 0.2,
           "load_weight": 0.3, "noise_epsilon": 0.01, "seed": 3, "name": "gating"}
    gate = keras_moe.NoisyTopKGating.from_config(old)
    assert type(gate) is keras_moe.SwitchGating
    assert (gate.k, gate.importance_weight, gate.load_weight) == (1, 0.2, 0.3)
    old = {**old, "k": 3, "num_experts": 3, "gating": "softmax"}
    assert type(keras_moe.NoisyTopKGating.from_config(old)) is keras_moe.SoftmaxGating
    # Saved together with the NoisyTopKGating's unused W_noise: it is skipped.
    gate.build((5,))
    w_gate = np.arange(20, dtype="float32").reshape(5, 4)
    gate.load_own_variables({"0": w_gate, "1": np.ones((5, 4), "float32")})
    np.testing.assert_array_equal(gate.w_gate.numpy(), w_gate)
