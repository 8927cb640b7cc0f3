"""Tests of the array helpers of keras_moe.pipelines.lm.inputs: `stream_arrays`, `array_perplexity`.

(The `keras-moe lm demo` path; moved from the vocabulary tests.) Expected
values are worked out by hand or with NumPy (an independent log-softmax);
the code under test never produces an expected value.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose, assert_array_equal

from keras_moe.pipelines.data.vocabulary import WordVocabulary
from keras_moe.pipelines.lm.inputs import array_perplexity, stream_arrays

SPECIALS = ["<pad>", "<unk>", "<eos>"]


# ---------------------------------------------------------------------------
# stream_arrays


def test_stream_arrays_hand_example():
    # Stream 5 6 2 | 7 2: inputs are 5 6 2 7, targets 6 2 7 2.
    inputs, targets, weights = stream_arrays([[5, 6, 2], [7, 2]], 3)
    assert_array_equal(inputs, [[5, 6, 2], [7, 0, 0]])
    assert_array_equal(targets, [[6, 2, 7], [2, 0, 0]])
    assert_array_equal(weights, [[1, 1, 1], [1, 0, 0]])
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    assert weights.dtype == np.float32


def test_stream_arrays_exact_multiple_has_no_padding():
    inputs, targets, weights = stream_arrays([[4, 2], [9, 8, 2]], 2)
    assert_array_equal(inputs, [[4, 2], [9, 8]])
    assert_array_equal(targets, [[2, 9], [8, 2]])
    assert_array_equal(weights, np.ones((2, 2)))


def test_stream_arrays_length_longer_than_stream():
    inputs, targets, weights = stream_arrays([[3, 2]], 4)
    assert_array_equal(inputs, [[3, 0, 0, 0]])
    assert_array_equal(targets, [[2, 0, 0, 0]])
    assert_array_equal(weights, [[1, 0, 0, 0]])


@pytest.mark.parametrize("length", [1, 4, 7])
def test_stream_arrays_predicts_every_following_token_once(length):
    rng = np.random.default_rng(length)
    lines = [list(rng.integers(3, 50, size=rng.integers(0, 6))) + [2] for _ in range(13)]
    stream = [t for line in lines for t in line]
    inputs, targets, weights = stream_arrays(lines, length)
    assert inputs.shape == targets.shape == weights.shape
    assert inputs.shape == (math.ceil((len(stream) - 1) / length), length)
    on = weights.reshape(-1) == 1
    assert on.sum() == len(stream) - 1
    # Weighted positions come first, padding after.
    assert on[: on.sum()].all() and not on[on.sum():].any()
    assert_array_equal(inputs.reshape(-1)[on], stream[:-1])
    assert_array_equal(targets.reshape(-1)[on], stream[1:])
    assert not inputs.reshape(-1)[~on].any() and not targets.reshape(-1)[~on].any()


@pytest.mark.parametrize("lines", [[], [[2]], [[], [2]]])
def test_stream_arrays_needs_two_tokens(lines):
    with pytest.raises(ValueError, match="two tokens"):
        stream_arrays(lines, 3)


@pytest.mark.parametrize("length", [0, -2])
def test_stream_arrays_rejects_a_bad_length(length):
    with pytest.raises(ValueError, match="length"):
        stream_arrays([[5, 6, 2], [7, 2]], length)


# ---------------------------------------------------------------------------
# array_perplexity

# A fake "model": logits of the next token depend only on the current id.
TABLE = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],
        [1.0, -1.0, 0.5, 2.0],
        [-0.5, 3.0, 0.0, 1.0],
        [2.0, 0.0, -2.0, 0.5],
    ],
    dtype=np.float32,
)


class FakeModel:
    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, training=None):
        assert training is False
        self.batch_sizes.append(len(x))
        return tf.constant(TABLE[np.asarray(x)])


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits)
    return np.log(exp / exp.sum(axis=-1, keepdims=True))


# 5 windows of length 3; the last has one padded position, another window
# has a zero weight in the middle.
INPUTS = np.array([[1, 2, 3], [3, 3, 1], [2, 1, 2], [1, 1, 3], [3, 3, 0]], np.int32)
TARGETS = np.array([[2, 3, 3], [3, 1, 1], [1, 2, 1], [3, 2, 2], [2, 2, 0]], np.int32)
WEIGHTS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], np.float32)


def np_nll():
    logp = np_log_softmax(TABLE[INPUTS])
    return -np.take_along_axis(logp, TARGETS[..., None], axis=-1)[..., 0]


def test_reference_nll_by_hand():
    # One value by hand: input 1, target 2: logits (1, -1, 0.5, 2);
    # -log p = log(e + e^-1 + e^0.5 + e^2) - 0.5.
    by_hand = math.log(math.e + math.exp(-1) + math.exp(0.5) + math.exp(2)) - 0.5
    assert np_nll()[0, 0] == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 64])
def test_perplexity_is_whole_set_value_for_any_batching(batch_size):
    nll = np_nll()
    total = float((nll * WEIGHTS).sum())
    count = float(WEIGHTS.sum())  # 13 predicted tokens
    assert count == 13
    model = FakeModel()
    result = array_perplexity(model, INPUTS, TARGETS, WEIGHTS, batch_size=batch_size)
    expected_sizes = [min(batch_size, 5 - s) for s in range(0, 5, batch_size)]
    assert model.batch_sizes == expected_sizes
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["tokens"] == 13
    assert result["words"] == 13


def test_perplexity_differs_from_mean_of_batch_perplexities():
    nll = np_nll()
    whole = math.exp(float((nll * WEIGHTS).sum()) / float(WEIGHTS.sum()))
    # Batches of 2, 2 and 1 windows (5 and 6 and 2 tokens).
    per_batch = []
    for s in range(0, 5, 2):
        w = WEIGHTS[s : s + 2]
        per_batch.append(math.exp(float((nll[s : s + 2] * w).sum()) / float(w.sum())))
    naive = float(np.mean(per_batch))
    assert abs(naive - whole) / whole > 0.05  # the example does separate them
    result = array_perplexity(FakeModel(), INPUTS, TARGETS, WEIGHTS, batch_size=2)
    assert result["perplexity"] == pytest.approx(whole, rel=1e-5)
    assert result["perplexity"] != pytest.approx(naive, rel=0.01)


def test_perplexity_ignores_targets_of_zero_weight():
    changed = TARGETS.copy()
    changed[WEIGHTS == 0] = 3
    a = array_perplexity(FakeModel(), INPUTS, TARGETS, WEIGHTS, batch_size=2)
    b = array_perplexity(FakeModel(), INPUTS, changed, WEIGHTS, batch_size=2)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-7)


def test_perplexity_normalised_by_words():
    total = float((np_nll() * WEIGHTS).sum())
    result = array_perplexity(FakeModel(), INPUTS, TARGETS, WEIGHTS, batch_size=3, words=7)
    assert result["perplexity"] == pytest.approx(math.exp(total / 7), rel=1e-5)
    assert result["loss"] == pytest.approx(total / 7, rel=1e-5)
    assert result["tokens"] == 13
    assert result["words"] == 7


def test_perplexity_of_uniform_model_is_vocabulary_size():
    def uniform(x, training=None):
        return tf.zeros(np.shape(x) + (4,))

    result = array_perplexity(uniform, INPUTS, TARGETS, WEIGHTS, batch_size=2)
    assert result["perplexity"] == pytest.approx(4.0, rel=1e-6)
    assert result["loss"] == pytest.approx(math.log(4.0), rel=1e-6)


def test_perplexity_on_stream_arrays_end_to_end():
    vocab = WordVocabulary(SPECIALS + ["x"])
    ids = [vocab.encode(["x", "x"]), vocab.encode(["x"])]  # 3 3 2 3 2
    inputs, targets, weights = stream_arrays(ids, 2)
    # Predictions: 3->3, 3->2, 2->3, 3->2.
    logp = np_log_softmax(TABLE)
    total = -(logp[3, 3] + logp[3, 2] + logp[2, 3] + logp[3, 2])
    result = array_perplexity(FakeModel(), inputs, targets, weights, batch_size=1)
    assert result["tokens"] == 4
    assert_allclose(result["loss"], total / 4, rtol=1e-5)
