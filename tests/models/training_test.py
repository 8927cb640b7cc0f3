"""Tests of keras_moe.models.training: the warm-up schedule and the perplexity metric.

Schedule values are worked out by hand; perplexities against a NumPy
log-softmax written here.
"""

import math

import keras
import numpy as np
import pytest
from numpy.testing import assert_allclose

from keras_moe.models.training import TokenPerplexity, WarmupInverseSqrt

# ---------------------------------------------------------------------------
# WarmupInverseSqrt


def lr(schedule, step):
    return float(schedule(step))


def test_warmup_then_inverse_sqrt_by_hand():
    schedule = WarmupInverseSqrt(0.01, warmup_steps=4)
    # Steps 0..3 are s = 1..4: 0.01 * s / 4.
    assert_allclose([lr(schedule, s) for s in range(4)], [0.0025, 0.005, 0.0075, 0.01], rtol=1e-6)
    # Then 0.01 * sqrt(4 / s): s = 8 -> 0.01 / sqrt(2), s = 16 -> 0.005, s = 100 -> 0.002.
    assert_allclose(lr(schedule, 7), 0.01 / math.sqrt(2), rtol=1e-6)
    assert_allclose(lr(schedule, 15), 0.005, rtol=1e-6)
    assert_allclose(lr(schedule, 99), 0.002, rtol=1e-6)


def test_docstring_example_values():
    schedule = WarmupInverseSqrt(1e-3, warmup_steps=100)
    assert_allclose([lr(schedule, s) for s in (0, 99, 399)], [1e-5, 1e-3, 5e-4], rtol=1e-6)


def test_peak_is_reached_at_step_warmup_minus_one_only():
    base, warmup = 0.3, 37
    schedule = WarmupInverseSqrt(base, warmup_steps=warmup)
    steps = np.arange(400)
    values = schedule(steps).numpy()
    # Independent piecewise form over s = step + 1.
    s = steps + 1.0
    expected = np.where(s <= warmup, base * s / warmup, base * np.sqrt(warmup / s))
    assert_allclose(values, expected, rtol=1e-6)
    assert int(np.argmax(values)) == warmup - 1
    assert_allclose(values.max(), base, rtol=1e-6)
    assert np.all(np.diff(values[:warmup]) > 0) and np.all(np.diff(values[warmup - 1:]) < 0)


def test_constant_decay_holds_the_peak():
    schedule = WarmupInverseSqrt(0.01, warmup_steps=4, decay="constant")
    assert_allclose([lr(schedule, s) for s in range(4)], [0.0025, 0.005, 0.0075, 0.01], rtol=1e-6)
    assert_allclose([lr(schedule, s) for s in (4, 15, 10_000)], [0.01] * 3, rtol=1e-6)


def test_no_warmup_starts_at_the_peak():
    schedule = WarmupInverseSqrt(0.02, warmup_steps=0)
    # s = 1 -> 0.02, s = 4 -> 0.02 / 2, s = 100 -> 0.02 / 10.
    assert_allclose([lr(schedule, s) for s in (0, 3, 99)], [0.02, 0.01, 0.002], rtol=1e-6)
    constant = WarmupInverseSqrt(0.02, warmup_steps=0, decay="constant")
    assert_allclose([lr(constant, s) for s in (0, 3, 99)], [0.02] * 3, rtol=1e-6)


def test_step_may_be_an_int64_variable():
    schedule = WarmupInverseSqrt(0.01, warmup_steps=4)
    step = keras.Variable(2, dtype="int64", trainable=False)
    assert_allclose(float(schedule(step)), 0.0075, rtol=1e-6)


def test_integer_learning_rate_is_accepted():
    schedule = WarmupInverseSqrt(1, warmup_steps=2)
    assert schedule.learning_rate == 1.0 and type(schedule.learning_rate) is float
    assert_allclose(lr(schedule, 0), 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": True}, "learning_rate"),
        ({"learning_rate": "0.1"}, "learning_rate"),
        ({"learning_rate": None}, "learning_rate"),
        ({"learning_rate": 0.1, "warmup_steps": -1}, "warmup_steps"),
        ({"learning_rate": 0.1, "warmup_steps": 2.0}, "warmup_steps"),
        ({"learning_rate": 0.1, "warmup_steps": True}, "warmup_steps"),
        ({"learning_rate": 0.1, "warmup_steps": None}, "warmup_steps"),
        ({"learning_rate": 0.1, "decay": "linear"}, "decay"),
        ({"learning_rate": 0.1, "decay": "INVERSE_SQRT"}, "decay"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"`{name}`.*Received: {name}="):
        WarmupInverseSqrt(**kwargs)


def test_get_config_round_trip():
    schedule = WarmupInverseSqrt(0.004, warmup_steps=7, decay="constant")
    config = schedule.get_config()
    assert config == {"learning_rate": 0.004, "warmup_steps": 7, "decay": "constant",
                      "hold_steps": 0}
    clone = WarmupInverseSqrt.from_config(config)
    assert clone.get_config() == config
    # Through Keras serialization, by its registered name.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, WarmupInverseSqrt) and restored.get_config() == config
    assert_allclose([lr(restored, s) for s in (0, 6, 50)], [0.004 / 7, 0.004, 0.004], rtol=1e-6)


# ---------------------------------------------------------------------------
# TokenPerplexity


def numpy_nll(labels, logits):
    """-log softmax(logits)[label], in float64."""
    logits = np.asarray(logits, np.float64)
    shift = logits - logits.max(-1, keepdims=True)
    log_probs = shift - np.log(np.exp(shift).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, np.asarray(labels)[..., None], -1)[..., 0]


def numpy_perplexity(labels, logits, weights=None):
    nll = numpy_nll(labels, logits)
    weights = np.ones_like(nll) if weights is None else np.asarray(weights, np.float64)
    return math.exp((nll * weights).sum() / weights.sum())


def random_batch(rng, batch, length, vocab=6, scale=2.0):
    labels = rng.integers(0, vocab, (batch, length))
    logits = (rng.normal(size=(batch, length, vocab)) * scale).astype(np.float32)
    return labels, logits


def test_docstring_example_uniform_two_classes():
    metric = TokenPerplexity()
    metric.update_state([[1, 0]], [[[0.0, 0.0], [0.0, 0.0]]])
    assert_allclose(float(metric.result()), 2.0, rtol=1e-6)
    assert metric.name == "perplexity"


def test_hand_example_with_padding():
    # Logits [ln 3, 0]: p = [3/4, 1/4]. Targets 0 and 1 scored, the third is padding.
    logits = np.array([[[math.log(3), 0.0]] * 3], np.float32)
    metric = TokenPerplexity()
    metric.update_state([[0, 1, 1]], logits, sample_weight=[[1.0, 1.0, 0.0]])
    # exp((ln(4/3) + ln 4) / 2) = sqrt(16/3).
    assert_allclose(float(metric.result()), math.sqrt(16 / 3), rtol=1e-6)


def test_matches_numpy_with_zero_and_fractional_weights():
    rng = np.random.default_rng(0)
    labels, logits = random_batch(rng, 3, 5)
    weights = np.array(
        [[1, 1, 1, 0, 0], [1, 0.5, 0, 0, 0], [1, 1, 1, 1, 2]], np.float32
    )
    metric = TokenPerplexity()
    metric.update_state(labels, logits, sample_weight=weights)
    expected = numpy_perplexity(labels, logits, weights)
    assert_allclose(float(metric.result()), expected, rtol=1e-5)
    # The zero weights matter in this example.
    assert abs(numpy_perplexity(labels, logits) - expected) > 0.1 * expected


def test_no_sample_weight_counts_every_token():
    rng = np.random.default_rng(1)
    labels, logits = random_batch(rng, 2, 4)
    metric = TokenPerplexity()
    metric.update_state(labels, logits)
    assert_allclose(float(metric.result()), numpy_perplexity(labels, logits), rtol=1e-5)


def test_accumulates_token_sums_not_batch_perplexities():
    rng = np.random.default_rng(2)
    labels_a, logits_a = random_batch(rng, 2, 4, scale=3.0)
    labels_b, logits_b = random_batch(rng, 1, 4, scale=0.5)
    weights_a = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # 1 token
    weights_b = np.ones((1, 4), np.float32)  # 4 tokens
    two_calls = TokenPerplexity()
    two_calls.update_state(labels_a, logits_a, sample_weight=weights_a)
    two_calls.update_state(labels_b, logits_b, sample_weight=weights_b)
    one_call = TokenPerplexity()
    one_call.update_state(
        np.concatenate([labels_a, labels_b]), np.concatenate([logits_a, logits_b]),
        sample_weight=np.concatenate([weights_a, weights_b]),
    )
    expected = numpy_perplexity(
        np.concatenate([labels_a, labels_b]), np.concatenate([logits_a, logits_b]),
        np.concatenate([weights_a, weights_b]),
    )
    assert_allclose(float(two_calls.result()), float(one_call.result()), rtol=1e-6)
    assert_allclose(float(two_calls.result()), expected, rtol=1e-5)
    # The example discriminates: the mean of the two batch perplexities is far off.
    batch_mean = (
        numpy_perplexity(labels_a, logits_a, weights_a)
        + numpy_perplexity(labels_b, logits_b, weights_b)
    ) / 2
    assert abs(batch_mean - expected) > 0.1 * expected


def test_reset_state_forgets_what_was_seen():
    rng = np.random.default_rng(3)
    labels_a, logits_a = random_batch(rng, 2, 3, scale=4.0)
    labels_b, logits_b = random_batch(rng, 2, 3)
    metric = TokenPerplexity()
    metric.update_state(labels_a, logits_a)
    metric.reset_state()
    metric.update_state(labels_b, logits_b)
    assert_allclose(float(metric.result()), numpy_perplexity(labels_b, logits_b), rtol=1e-5)


def test_nothing_seen_is_not_nan():
    # A fresh metric, or one that saw only padding, reports a finite value.
    metric = TokenPerplexity()
    assert np.isfinite(float(metric.result()))
    metric.update_state([[1, 0]], np.zeros((1, 2, 3), np.float32), sample_weight=[[0.0, 0.0]])
    assert np.isfinite(float(metric.result()))


def test_half_precision_logits():
    rng = np.random.default_rng(4)
    labels, logits = random_batch(rng, 2, 3)
    logits16 = logits.astype(np.float16)
    metric = TokenPerplexity()
    metric.update_state(labels, logits16, sample_weight=[[1, 1, 0], [1, 0, 0]])
    expected = numpy_perplexity(labels, logits16.astype(np.float32), [[1, 1, 0], [1, 0, 0]])
    assert_allclose(float(metric.result()), expected, rtol=1e-5)


# Regression: a per-example weight of shape [batch] (the Keras `sample_weight`
# contract) was once aligned with the last axis instead of the rows.
def test_per_example_weights_weight_whole_rows():
    # Row 0 has logits [ln 3, 0] (targets 0, 1); row 1 is uniform over 2 classes.
    logits = np.zeros((2, 2, 2), np.float32)
    logits[0, :, 0] = math.log(3)
    metric = TokenPerplexity()
    metric.update_state([[0, 1], [1, 1]], logits, sample_weight=[1.0, 0.0])
    # Only row 0 counts: exp((ln(4/3) + ln 4) / 2) = sqrt(16/3).
    assert_allclose(float(metric.result()), math.sqrt(16 / 3), rtol=1e-6)
    other = TokenPerplexity()
    other.update_state(np.zeros((2, 3), np.int32), np.zeros((2, 3, 4), np.float32),
                       sample_weight=[1.0, 0.0])
    assert_allclose(float(other.result()), 4.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# Both inside a compiled model saved to .keras


def test_compiled_model_saves_and_reloads_schedule_and_metric(tmp_path):
    vocab, length = 5, 3
    model = keras.Sequential(
        [keras.Input((length,), dtype="int32"), keras.layers.Embedding(vocab, vocab)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(WarmupInverseSqrt(0.01, warmup_steps=8)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[TokenPerplexity()],
    )
    rng = np.random.default_rng(5)
    x = rng.integers(0, vocab, (4, length)).astype(np.int32)
    y = rng.integers(0, vocab, (4, length)).astype(np.int32)
    w = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    model.fit(x, y, sample_weight=w, batch_size=4, epochs=3, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)

    loaded = keras.saving.load_model(path)
    assert int(loaded.optimizer.iterations.numpy()) == 3
    # Three steps done: s = 4, lr = 0.01 * 4 / 8.
    assert_allclose(float(loaded.optimizer.learning_rate), 0.005, rtol=1e-6)
    saved_schedule = loaded.optimizer.get_config()["learning_rate"]
    assert saved_schedule["class_name"] == "WarmupInverseSqrt"
    assert saved_schedule["config"] == {
        "learning_rate": 0.01, "warmup_steps": 8, "decay": "inverse_sqrt", "hold_steps": 0
    }
    result = loaded.evaluate(x, y, sample_weight=w, batch_size=2, verbose=0, return_dict=True)
    logits = loaded.predict(x, verbose=0)
    assert_allclose(result["perplexity"], numpy_perplexity(y, logits, w), rtol=1e-5)


def test_hold_keeps_the_peak_then_decays_from_the_end_of_the_hold_by_hand():
    # App. E's shape, scaled down: warm-up 2 steps, hold 6, then 1/sqrt.
    schedule = WarmupInverseSqrt(0.01, warmup_steps=2, hold_steps=6)
    # s = 1, 2 rise; s = 2..8 at the peak; s = 32 -> 0.01 * sqrt(8 / 32) = 0.005.
    assert_allclose([lr(schedule, s) for s in range(8)],
                    [0.005] + [0.01] * 7, rtol=1e-6)
    assert_allclose(lr(schedule, 31), 0.005, rtol=1e-6)
    assert lr(schedule, 8) < 0.01
    restored = WarmupInverseSqrt.from_config(schedule.get_config())
    assert_allclose(lr(restored, 31), 0.005, rtol=1e-6)


def test_hold_steps_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="hold_steps=-1"):
        WarmupInverseSqrt(0.01, hold_steps=-1)
