"""Tests of keras_moe.models.attention against NumPy transcriptions of the formulas."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose

from keras_moe.models.attention import (
    AdditiveAttention,
    MultiplicativeTanhAttention,
    make_attention,
)

B, S, T, DQ, DM, N = 2, 5, 3, 4, 6, 7
RNG = np.random.default_rng(0)
QUERY = RNG.normal(size=(B, T, DQ)).astype(np.float32)
MEMORY = RNG.normal(size=(B, S, DM)).astype(np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)


def numpy_attention(kind, layer, query, memory, mask):
    """The formulas written out position by position, with plain loops."""
    u, w, v = (np.asarray(x) for x in (layer.memory_kernel, layer.query_kernel,
                                        layer.score_vector))
    b, t, _ = query.shape
    s = memory.shape[1]
    probs = np.zeros((b, t, s))
    context = np.zeros((b, t, memory.shape[2]))
    for bi in range(b):
        for j in range(t):
            scores = np.full(s, -np.inf)
            for i in range(s):
                if not mask[bi, i]:
                    continue
                xu, yw = memory[bi, i] @ u, query[bi, j] @ w
                if kind == "additive":  # GNMT: sum_d V_d tanh((xU)_d + (yW)_d)
                    scores[i] = np.sum(v * np.tanh(xu + yw))
                else:  # App. G: sum_d V_d tanh((xU)_d) tanh((yW)_d)
                    scores[i] = np.sum(v * np.tanh(xu) * np.tanh(yw))
            e = np.exp(scores - scores.max())
            probs[bi, j] = e / e.sum()
            context[bi, j] = probs[bi, j] @ memory[bi]
    return context, probs


@pytest.mark.parametrize("kind", ["additive", "multiplicative_tanh"])
def test_matches_numpy_for_all_target_steps_and_one_step(kind):
    layer = make_attention(kind, N, seed=3)
    context, probs = layer(QUERY, MEMORY, memory_mask=MASK)
    expected_context, expected_probs = numpy_attention(kind, layer, QUERY, MEMORY, MASK)
    assert tuple(context.shape) == (B, T, DM) and probs.dtype == tf.float32
    assert_allclose(np.asarray(probs), expected_probs, atol=1e-6)
    assert_allclose(np.asarray(context), expected_context, atol=1e-5)
    # One step at a time (the decoder's path) with precomputed keys.
    keys = layer.project_memory(MEMORY)
    for j in range(T):
        step_context, step_probs = layer.attend(QUERY[:, j], MEMORY, keys, MASK)
        assert tuple(step_probs.shape) == (B, S)
        assert_allclose(np.asarray(step_probs), expected_probs[:, j], atol=1e-6)
        assert_allclose(np.asarray(step_context), expected_context[:, j], atol=1e-5)


@pytest.mark.parametrize("kind", ["additive", "multiplicative_tanh"])
def test_padding_gets_exactly_zero_and_real_positions_sum_to_one(kind):
    layer = make_attention(kind, N, seed=1)
    _, probs = layer(QUERY, MEMORY, memory_mask=MASK)
    probs = np.asarray(probs)
    assert (probs[1, :, 3:] == 0.0).all()
    assert (probs[:, :, :3] > 0).all()
    assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    # Changing the padded memory rows changes nothing.
    noisy = MEMORY.copy()
    noisy[1, 3:] = 100.0
    context_a, _ = layer(QUERY, MEMORY, memory_mask=MASK)
    context_b, _ = layer(QUERY, noisy, memory_mask=MASK)
    assert_allclose(np.asarray(context_a)[1], np.asarray(context_b)[1], atol=1e-6)


def test_all_padding_row_gives_zeros_not_nan():
    layer = AdditiveAttention(N, seed=1)
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    context, probs = layer(QUERY[:, 0], MEMORY, memory_mask=mask)
    assert np.isfinite(np.asarray(context)).all()
    assert (np.asarray(probs)[1] == 0).all() and (np.asarray(context)[1] == 0).all()


def test_app_g_scores_are_a_product_of_a_source_and_a_target_factor():
    # The source side tanh(xU) is computed once: scores are one batched
    # matmul, so they are bilinear in (tanh(xU), V*tanh(yW)).
    layer = MultiplicativeTanhAttention(N, seed=2)
    layer.build(QUERY.shape, MEMORY.shape)
    keys = np.asarray(layer.project_memory(MEMORY))
    assert_allclose(keys, np.tanh(MEMORY @ np.asarray(layer.memory_kernel)), atol=1e-6)
    target = np.tanh(QUERY @ np.asarray(layer.query_kernel)) * np.asarray(layer.score_vector)
    assert_allclose(np.asarray(layer.score(QUERY, keys)), target @ keys.transpose(0, 2, 1),
                    atol=1e-5)


def test_weights_config_and_serialization(tmp_path):
    layer = AdditiveAttention(N, seed=5, name="att")
    layer(QUERY, MEMORY)
    assert [tuple(w.shape) for w in layer.weights] == [(DM, N), (DQ, N), (N,)]
    assert layer.count_params() == DM * N + DQ * N + N
    clone = AdditiveAttention.from_config(layer.get_config())
    assert (clone.units, clone.seed, clone.name) == (N, 5, "att")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is AdditiveAttention
    restored(QUERY, MEMORY)
    restored.set_weights(layer.get_weights())
    assert_allclose(np.asarray(restored(QUERY, MEMORY)[1]), np.asarray(layer(QUERY, MEMORY)[1]))


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"`units` must be an integer >= 1\. Received: units=0"):
        AdditiveAttention(0)
    with pytest.raises(ValueError, match="Received: seed='x'"):
        MultiplicativeTanhAttention(4, seed="x")
    with pytest.raises(ValueError, match="Received: attention='dot'"):
        make_attention("dot", 4)
