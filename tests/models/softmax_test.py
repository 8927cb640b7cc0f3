"""Tests of keras_moe.models.softmax.SoftmaxOutput (full logits, sampled softmax loss)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.models.softmax import SoftmaxOutput
from tests.keras_moe import reference as ref

V, D = 50, 6


def make_layer(vocab=V, d=D, num_sampled=0, seed=0, scale=1.0, **kwargs):
    layer = SoftmaxOutput(vocab, num_sampled=num_sampled, seed=seed, **kwargs)
    layer.build((None, d))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.normal(size=(vocab, d)) * scale)
    layer.bias.assign(rng.normal(size=(vocab,)))
    return layer


def numpy_cross_entropy(hidden, labels, kernel, bias):
    """Full softmax cross-entropy per position, float64: `[N]`."""
    logits = np.asarray(hidden, np.float64).reshape(-1, kernel.shape[1]) @ kernel.T + bias
    log_probs = np.log(ref.softmax(logits))
    return -log_probs[np.arange(logits.shape[0]), np.asarray(labels).reshape(-1)]


def every_class_once(num_positions, vocab=V):
    """`sampled_values` naming each class once with expected counts 1 (no log-Q shift)."""
    return (
        tf.range(vocab, dtype=tf.int64),
        tf.ones([num_positions, 1], tf.float32),
        tf.ones([vocab], tf.float32),
    )


def data(seed=1, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=shape + (D,)).astype("float32")
    labels = rng.integers(0, V, size=shape).astype("int32")
    return hidden, labels


@pytest.mark.parametrize("shape", [(7,), (3, 4)], ids=["rank2", "rank3"])
def test_full_logits_equal_numpy(shape):
    layer = make_layer()
    hidden, _ = data(shape=shape)
    logits = layer(hidden)
    assert tuple(logits.shape) == shape + (V,)
    assert tuple(layer.compute_output_shape((None,) * len(shape) + (D,))) == (None,) * len(shape) + (V,)
    expected = ref.as_np(hidden) @ ref.as_np(layer.kernel).T + ref.as_np(layer.bias)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert tuple(layer.kernel.shape) == (V, D)  # the [V, d] layout sampled_softmax_loss takes


def test_sampled_loss_over_every_class_is_the_full_cross_entropy():
    # Every class sampled once with expected count 1: log Q = 0, the target's
    # own sampled copy is removed as an accidental hit, and what is left is
    # exactly the full softmax over V classes.
    layer = make_layer(num_sampled=10)
    hidden, labels = data()
    loss = layer.sampled_loss(hidden, labels, sampled_values=every_class_once(labels.size))
    expected = numpy_cross_entropy(hidden, labels, ref.as_np(layer.kernel), ref.as_np(layer.bias))
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)


def test_num_sampled_zero_is_the_exact_full_loss():
    layer = make_layer(num_sampled=0)
    hidden, labels = data(2)
    expected = numpy_cross_entropy(hidden, labels, ref.as_np(layer.kernel), ref.as_np(layer.bias))
    np.testing.assert_allclose(float(layer.sampled_loss(hidden, labels)), expected.mean(), rtol=1e-5)


def test_weighted_mean_and_zero_weight_positions_are_ignored():
    layer = make_layer(num_sampled=10)
    hidden, labels = data(3)
    weight = np.array([[1, 1, 0, 0], [0.5, 1, 1, 0], [0, 0, 0, 0]], np.float32)
    # Garbage at weight-0 positions must change nothing.
    hidden = np.where(weight[..., None] > 0, hidden, 1e30).astype("float32")
    w = weight.reshape(-1).astype(np.float64)
    kept = w > 0
    per_position = numpy_cross_entropy(
        hidden.reshape(-1, D)[kept], labels.reshape(-1)[kept], ref.as_np(layer.kernel),
        ref.as_np(layer.bias),
    )
    expected = (w[kept] * per_position).sum() / max(w.sum(), 1.0)
    loss = layer.sampled_loss(
        hidden, labels, sample_weight=weight, sampled_values=every_class_once(labels.size)
    )
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # All weights 0: the denominator max(sum w, 1) keeps the loss at 0.
    zero = layer.sampled_loss(hidden, labels, sample_weight=np.zeros_like(weight))
    assert float(zero) == 0.0


def test_sampled_gradient_points_like_the_full_gradient_on_average():
    # The real log-uniform sampler: the mean over many draws of the sampled
    # loss's gradient w.r.t. the hidden states must point (nearly) where the
    # full softmax gradient points. The sampled softmax is biased, so the
    # bound is loose; the same estimate for the wrong targets (labels rolled
    # by one position) must fail it, so the check has teeth.
    vocab, num_positions = 200, 6
    layer = make_layer(vocab=vocab, num_sampled=150, seed=4)
    rng = np.random.default_rng(5)
    hidden = tf.constant(rng.normal(size=(num_positions, D)).astype("float32"))
    labels = tf.constant(rng.integers(0, 40, size=(num_positions,)), tf.int32)

    with tf.GradientTape() as tape:
        tape.watch(hidden)
        full_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, layer(hidden))
        full_loss = tf.reduce_mean(full_loss)
    full = tape.gradient(full_loss, hidden).numpy().reshape(-1)

    @tf.function
    def sampled_gradient(targets):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = layer.sampled_loss(hidden, targets)
        return tape.gradient(loss, hidden)

    def mean_cosine(targets, draws=200):
        grads = np.stack([sampled_gradient(targets).numpy().reshape(-1) for _ in range(draws)])
        assert not np.allclose(grads[0], grads[1])  # each call draws new negatives
        mean = grads.mean(0)
        return mean @ full / (np.linalg.norm(mean) * np.linalg.norm(full))

    cosine = mean_cosine(labels)
    assert cosine > 0.9, cosine
    wrong = mean_cosine(tf.roll(labels, 1, axis=0))
    assert wrong < 0.9, wrong


def test_mixed_precision_keeps_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = SoftmaxOutput(V)
        logits = layer(tf.ones([2, 3, D], tf.float16))
        loss = layer.sampled_loss(tf.ones([2, 3, D], tf.float16), tf.ones([2, 3], tf.int32))
    finally:
        keras.config.set_dtype_policy(previous)
    assert logits.dtype == tf.float32 and loss.dtype == tf.float32
    assert layer.kernel.dtype == "float32"


def test_config_round_trip_and_save(tmp_path):
    layer = SoftmaxOutput(V, num_sampled=7, seed=3, name="softmax")
    config = layer.get_config()
    assert (config["vocab_size"], config["num_sampled"], config["seed"]) == (V, 7, 3)
    clone = SoftmaxOutput.from_config(config)
    assert clone.get_config() == config
    inputs = keras.Input(shape=(None, D))
    model = keras.Model(inputs, SoftmaxOutput(V, num_sampled=7, name="softmax")(inputs))
    path = str(tmp_path / "softmax.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    hidden, _ = data()
    assert loaded.get_layer("softmax").num_sampled == 7
    np.testing.assert_array_equal(loaded(hidden).numpy(), model(hidden).numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=1), "`vocab_size` must be an integer >= 2. Received: vocab_size=1"),
        (dict(vocab_size=10.0), "`vocab_size` must be an integer >= 2"),
        (dict(vocab_size=10, num_sampled=-1), "`num_sampled` must be an integer >= 0"),
        (dict(vocab_size=10, num_sampled=2.5), "`num_sampled` must be an integer >= 0"),
        (dict(vocab_size=10, num_sampled=10), r"`num_sampled` must be < vocab_size=10\. Received"),
        (dict(vocab_size=10, seed="1"), "`seed` must be None or an integer"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftmaxOutput(**kwargs)
