"""Tests of keras_moe.pipelines.lm.inputs: streamed windows, sentence rows, batches, perplexity.

A tiny vocabulary written here (word ids from a dict, unknown words 1, every
line followed by `<eos>` = 2) makes every expected window writable by hand.
Larger checks compare against a NumPy reference built from the plain token
stream, never against the code under test.
"""

import itertools
import math

import keras
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from keras_moe.pipelines.lm.config import DataConfig
from keras_moe.pipelines.lm.inputs import (
    CHUNK_LINES,
    encoded_lines,
    evaluation_batches,
    perplexity_from_batches,
    sentence_rows,
    stream_windows,
    training_dataset,
)

EOS_ID = 2


class TinyVocab:
    """`encode_lines` only: word ids by a dict, unknown -> 1, `<eos>` (2) after every line."""

    def __init__(self, ids):
        self.ids = dict(ids)
        self.chunks = []  # sizes of the lists given to encode_lines

    def encode_lines(self, lines):
        lines = list(lines)
        self.chunks.append(len(lines))
        return [[self.ids.get(w, 1) for w in line.split()] + [EOS_ID] for line in lines]


ABC = TinyVocab({"a": 3, "b": 4, "c": 5, "d": 6})
WORDS = [f"w{i}" for i in range(12)]
BIG = TinyVocab({w: i + 3 for i, w in enumerate(WORDS)})


def random_lines(n, seed, max_words=9):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS + ["oov"], rng.integers(0, max_words + 1))) for _ in range(n)]


def token_stream(lines):
    """`<eos>` then each line's ids and `<eos>`, built without the code under test."""
    ids = {w: i + 3 for i, w in enumerate(WORDS)} | ABC.ids
    out = [EOS_ID]
    for line in lines:
        out += [ids.get(w, 1) for w in line.split()] + [EOS_ID]
    return out


def reference_windows(stream, seq_len):
    """NumPy windows of `stream`: inputs stream[:-1], targets stream[1:], zero-padded."""
    n = len(stream) - 1
    rows = max(0, math.ceil(n / seq_len))
    x = np.zeros(rows * seq_len, np.int32)
    y = np.zeros(rows * seq_len, np.int32)
    w = np.zeros(rows * seq_len, np.float32)
    x[:n], y[:n], w[:n] = stream[:-1], stream[1:], 1.0
    return x.reshape(rows, seq_len), y.reshape(rows, seq_len), w.reshape(rows, seq_len)


def stack(rows):
    """Rows stacked into arrays; inputs at weight-0 positions set to 0 (see below)."""
    rows = list(rows)
    inputs, targets, weights = (np.stack([r[i] for r in rows]) for i in range(3))
    return unpad(inputs, weights), targets, weights


def unpad(inputs, weights):
    # The module's last stream window carries the stream's final token as the
    # input of its first weight-0 position (fixed, see the regression test
    # below); the other tests look only at the scored inputs either way.
    return np.where(weights > 0, inputs, 0).astype(inputs.dtype)


# ---------------------------------------------------------------------------
# encoded_lines


def test_encoded_lines_reads_in_chunks():
    vocab = TinyVocab({"a": 3})
    n = 2 * CHUNK_LINES + 7
    out = list(encoded_lines(("a" for _ in range(n)), vocab))
    assert out == [[3, 2]] * n
    assert vocab.chunks == [CHUNK_LINES, CHUNK_LINES, 7]


def test_encoded_lines_is_lazy_on_an_endless_source():
    vocab = TinyVocab({"a": 3})
    endless = ("a " * (i % 3) for i in itertools.count())
    first = list(itertools.islice(encoded_lines(endless, vocab), 4))
    assert first == [[2], [3, 2], [3, 3, 2], [2]]


# ---------------------------------------------------------------------------
# stream_windows


def test_stream_windows_hand_example():
    # Stream: <eos> a b <eos> c <eos> = 2 3 4 2 5 2.
    inputs, targets, weights = stack(stream_windows(["a b", "c"], ABC, 2))
    assert_array_equal(inputs, [[2, 3], [4, 2], [5, 0]])
    assert_array_equal(targets, [[3, 4], [2, 5], [2, 0]])
    assert_array_equal(weights, [[1, 1], [1, 1], [1, 0]])
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    assert weights.dtype == np.float32


# Regression: the last window's inputs once carried the stream's final token
# into its first weight-0 position ([5, 2] instead of [5, 0]).
def test_stream_windows_last_window_inputs_are_padded_with_zero():
    windows = list(stream_windows(["a b", "c"], ABC, 2))
    assert_array_equal(windows[-1][0], [5, 0])
    assert_array_equal(windows[-1][1], [2, 0])
    assert_array_equal(windows[-1][2], [1, 0])


def test_stream_windows_window_crossing_lines():
    inputs, targets, weights = stack(stream_windows(["a b", "c"], ABC, 3))
    assert_array_equal(inputs, [[2, 3, 4], [2, 5, 0]])
    assert_array_equal(targets, [[3, 4, 2], [5, 2, 0]])
    assert_array_equal(weights, [[1, 1, 1], [1, 1, 0]])


def test_stream_windows_exact_fit_has_no_padding_window():
    # 6 tokens, 5 predictions: one full window of 5, no empty padded window after it.
    inputs, targets, weights = stack(stream_windows(["a b", "c"], ABC, 5))
    assert_array_equal(inputs, [[2, 3, 4, 2, 5]])
    assert_array_equal(targets, [[3, 4, 2, 5, 2]])
    assert_array_equal(weights, [[1, 1, 1, 1, 1]])


def test_stream_windows_unknown_and_empty_lines():
    inputs, targets, weights = stack(stream_windows(["zz", "", "a"], ABC, 4))
    # Stream: 2 1 2 2 3 2.
    assert_array_equal(inputs, [[2, 1, 2, 2], [3, 0, 0, 0]])
    assert_array_equal(targets, [[1, 2, 2, 3], [2, 0, 0, 0]])
    assert_array_equal(weights, [[1, 1, 1, 1], [1, 0, 0, 0]])


def test_stream_windows_of_nothing():
    assert list(stream_windows([], ABC, 3)) == []


@pytest.mark.parametrize(
    "offset, inputs, targets, weights",
    [
        (1, [[3, 4], [2, 5]], [[4, 2], [5, 2]], [[1, 1], [1, 1]]),  # 3 4 2 5 2
        (3, [[2, 5]], [[5, 2]], [[1, 1]]),  # 2 5 2
        (4, [[5, 0]], [[2, 0]], [[1, 0]]),  # 5 2
    ],
)
def test_stream_windows_offset_by_hand(offset, inputs, targets, weights):
    got = stack(stream_windows(["a b", "c"], ABC, 2, offset=offset))
    for array, expected in zip(got, (inputs, targets, weights), strict=True):
        assert_array_equal(array, expected)


@pytest.mark.parametrize("offset", [5, 6, 50])
def test_stream_windows_offset_past_the_end(offset):
    assert list(stream_windows(["a b", "c"], ABC, 2, offset=offset)) == []


def test_stream_windows_offset_skips_over_several_lines():
    # Stream 2 3 2 4 2 5 6 2; skipping 4 leaves 2 5 6 2.
    inputs, targets, weights = stack(stream_windows(["a", "b", "c d"], ABC, 3, offset=4))
    assert_array_equal(inputs, [[2, 5, 6]])
    assert_array_equal(targets, [[5, 6, 2]])
    assert_array_equal(weights, [[1, 1, 1]])


@pytest.mark.parametrize("seq_len, offset", [(1, 0), (3, 0), (7, 0), (4, 3), (10, 9), (35, 17)])
def test_stream_windows_predicts_every_token_once(seq_len, offset):
    lines = random_lines(1100, seed=seq_len)  # more than two chunks of lines
    stream = token_stream(lines)
    inputs, targets, weights = stack(stream_windows(lines, BIG, seq_len, offset=offset))
    if offset == 0:
        # Every token of the text, each line's <eos> included, is a target once.
        n_tokens = sum(len(line.split()) + 1 for line in lines)
        assert weights.sum() == n_tokens
    for got, expected in zip(
        (inputs, targets, weights), reference_windows(stream[offset:], seq_len), strict=True
    ):
        assert_array_equal(got, expected)


# ---------------------------------------------------------------------------
# sentence_rows


def test_sentence_rows_by_hand():
    rows = list(sentence_rows(["a b", "c", "", "zz a"], ABC))
    expected = [
        ([2, 3, 4], [3, 4, 2]),
        ([2, 5], [5, 2]),
        ([2], [2]),
        ([2, 1, 3], [1, 3, 2]),
    ]
    assert len(rows) == len(expected)
    for (x, y, w), (ex, ey) in zip(rows, expected, strict=True):
        assert_array_equal(x, ex)
        assert_array_equal(y, ey)
        assert_array_equal(w, np.ones(len(ex)))
        assert x.dtype == np.int32 and y.dtype == np.int32 and w.dtype == np.float32


def test_sentence_rows_max_len_keeps_the_first_targets():
    rows = list(sentence_rows(["a b c d", "a b", "c"], ABC, max_len=2))
    assert [r[0].tolist() for r in rows] == [[2, 3], [2, 3], [2, 5]]
    assert [r[1].tolist() for r in rows] == [[3, 4], [3, 4], [5, 2]]
    assert [r[2].tolist() for r in rows] == [[1, 1], [1, 1], [1, 1]]


# ---------------------------------------------------------------------------
# training_dataset


def expected_offset(seed, pass_index, seq_len):
    # The offset rule documented in training_dataset: pass `p` starts
    # `np.random.default_rng([seed, p]).integers(seq_len)` tokens into the
    # stream. Computed here the same way, independently of the module.
    return int(np.random.default_rng([seed, pass_index]).integers(seq_len))


def collect(dataset):
    batches = [tuple(t.numpy() for t in batch) for batch in dataset]
    return [(unpad(x, w), y, w) for x, y, w in batches]


def test_training_stream_one_pass_covers_every_window_once_in_order():
    lines = random_lines(60, seed=1)
    seed, seq_len = 2, 4
    config = DataConfig(mode="stream", seq_len=seq_len, batch_size=3, shuffle_buffer=1)
    batches = collect(training_dataset(lambda: iter(lines), BIG, config, seed=seed, repeat=False))
    offset = expected_offset(seed, 0, seq_len)
    assert offset == 3  # a non-zero offset, so the test sees the boundaries move
    x, y, w = reference_windows(token_stream(lines)[offset:], seq_len)
    # Full batches, and a last partial one (no drop_remainder without repeat).
    assert [b[0].shape for b in batches] == [(3, 4)] * (len(x) // 3) + (
        [(len(x) % 3, 4)] if len(x) % 3 else []
    )
    for b in batches:
        assert (b[0].dtype, b[1].dtype, b[2].dtype) == (np.int32, np.int32, np.float32)
    assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    assert_array_equal(np.concatenate([b[2] for b in batches]), w)


def test_training_stream_passes_start_at_new_offsets():
    lines = random_lines(25, seed=3)
    seed, seq_len, batch_size = 2, 4, 5
    config = DataConfig(mode="stream", seq_len=seq_len, batch_size=batch_size, shuffle_buffer=1)
    offsets = [expected_offset(seed, p, seq_len) for p in range(3)]
    assert offsets == [3, 1, 2]
    stream = token_stream(lines)
    expected = [reference_windows(stream[o:], seq_len) for o in offsets]
    expected = tuple(np.concatenate([e[i] for e in expected]) for i in range(3))
    n_batches = len(expected[0]) // batch_size
    ds = training_dataset(lambda: iter(lines), BIG, config, seed=seed, repeat=True)
    batches = collect(ds.take(n_batches))
    assert all(b[0].shape == (batch_size, seq_len) for b in batches)  # remainder dropped
    for i in range(3):
        assert_array_equal(
            np.concatenate([b[i] for b in batches]), expected[i][: n_batches * batch_size]
        )


def test_training_stream_shuffled_still_covers_every_window_once():
    lines = random_lines(80, seed=4)
    seed, seq_len = 7, 5
    config = DataConfig(mode="stream", seq_len=seq_len, batch_size=4, shuffle_buffer=1000)
    batches = collect(training_dataset(lambda: iter(lines), BIG, config, seed=seed, repeat=False))
    x, y, w = reference_windows(token_stream(lines)[expected_offset(seed, 0, seq_len):], seq_len)
    got = np.concatenate([np.concatenate([b[0], b[1], b[2]], axis=1) for b in batches])
    want = np.concatenate([x, y, w], axis=1)
    assert not np.array_equal(got, want)  # the order did change
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def test_training_sentences_batches_by_tokens_and_keeps_every_sentence():
    lines = random_lines(150, seed=5, max_words=30)
    max_len, batch_tokens = 20, 48
    config = DataConfig(mode="sentences", max_sentence_len=max_len, batch_tokens=batch_tokens,
                        shuffle_buffer=64)
    batches = collect(training_dataset(lambda: iter(lines), BIG, config, seed=0, repeat=False))
    got = []
    for x, y, w in batches:
        assert x.shape == y.shape == w.shape
        assert x.shape[0] * x.shape[1] <= batch_tokens
        assert x.shape[1] <= max_len
        for xi, yi, wi in zip(x, y, w, strict=True):
            n = int(wi.sum())
            assert_array_equal(wi, [1.0] * n + [0.0] * (len(wi) - n))  # padding at the end
            assert not xi[n:].any() and not yi[n:].any()
            got.append((tuple(xi[:n]), tuple(yi[:n])))
    # Sentences are grouped, not one per batch.
    assert len(batches) < len(lines) / 2
    want = []
    for line in lines:
        ids = (token_stream([line])[1:])[:max_len]
        want.append((tuple([EOS_ID] + ids[:-1]), tuple(ids)))
    assert sorted(got) == sorted(want)


# ---------------------------------------------------------------------------
# evaluation_batches


def test_evaluation_stream_pads_the_last_batch_with_weight_zero_rows():
    config = DataConfig(mode="stream", seq_len=2, eval_batch_size=2)
    batches = list(evaluation_batches(["a b", "c"], ABC, config))
    assert len(batches) == 2
    (x0, y0, w0), (x1, y1, w1) = batches
    assert_array_equal(x0, [[2, 3], [4, 2]])
    assert_array_equal(y0, [[3, 4], [2, 5]])
    assert_array_equal(w0, [[1, 1], [1, 1]])
    assert_array_equal(unpad(x1, w1), [[5, 0], [0, 0]])
    assert_array_equal(y1, [[2, 0], [0, 0]])
    assert_array_equal(w1, [[1, 0], [0, 0]])
    assert (x1.dtype, y1.dtype, w1.dtype) == (np.int32, np.int32, np.float32)


def test_evaluation_stream_uses_eval_seq_len():
    config = DataConfig(mode="stream", seq_len=2, eval_seq_len=3, eval_batch_size=4)
    ((x, y, w),) = list(evaluation_batches(["a b", "c"], ABC, config))
    assert_array_equal(unpad(x, w), [[2, 3, 4], [2, 5, 0], [0, 0, 0], [0, 0, 0]])
    assert_array_equal(y, [[3, 4, 2], [5, 2, 0], [0, 0, 0], [0, 0, 0]])
    assert_array_equal(w, [[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_evaluation_sentences_are_kept_whole_and_in_order():
    # max_sentence_len cuts training rows only.
    config = DataConfig(mode="sentences", max_sentence_len=2, eval_batch_size=2)
    batches = list(evaluation_batches(["a b c", "d", ""], ABC, config))
    assert len(batches) == 2
    (x0, y0, w0), (x1, y1, w1) = batches
    assert_array_equal(x0, [[2, 3, 4, 5], [2, 6, 0, 0]])
    assert_array_equal(y0, [[3, 4, 5, 2], [6, 2, 0, 0]])
    assert_array_equal(w0, [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert_array_equal(x1, [[2], [0]])
    assert_array_equal(y1, [[2], [0]])
    assert_array_equal(w1, [[1], [0]])


def test_evaluation_stream_preserves_order_on_a_longer_text():
    lines = random_lines(300, seed=6)
    config = DataConfig(mode="stream", seq_len=7, eval_batch_size=5)
    batches = list(evaluation_batches(lines, BIG, config))
    assert all(b[0].shape == (5, 7) for b in batches)
    stream = token_stream(lines)
    weights = np.concatenate([b[2] for b in batches]).reshape(-1)
    on = weights == 1
    assert on.sum() == len(stream) - 1
    assert_array_equal(np.concatenate([b[0] for b in batches]).reshape(-1)[on], stream[:-1])
    assert_array_equal(np.concatenate([b[1] for b in batches]).reshape(-1)[on], stream[1:])


# ---------------------------------------------------------------------------
# perplexity_from_batches


def table_model(table):
    """Logits at each position are the row `table[input_id]` (an Embedding with set weights)."""
    table = np.asarray(table, np.float32)
    layer = keras.layers.Embedding(*table.shape)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), layer])
    layer.set_weights([table])
    return model


def test_uniform_logits_give_perplexity_v():
    v = 7
    model = table_model(np.zeros((10, v)))
    rng = np.random.default_rng(0)
    batches = [
        (rng.integers(0, 10, (3, 4)).astype(np.int32), rng.integers(0, v, (3, 4)).astype(np.int32),
         (rng.random((3, 4)) < 0.6).astype(np.float32))
        for _ in range(3)
    ]
    n = sum(b[2].sum() for b in batches)
    result = perplexity_from_batches(model, batches)
    assert_allclose(result["perplexity"], v, rtol=1e-6)
    assert_allclose(result["loss"], math.log(v), rtol=1e-6)
    assert result["tokens"] == n == result["words"]


# Two classes. Input 0 -> logits [0, 0]: NLL ln 2 for either target.
# Input 1 -> logits [ln 3, 0]: p = [3/4, 1/4], NLL ln(4/3) for target 0, ln 4 for target 1.
TWO_CLASS = [[0.0, 0.0], [math.log(3.0), 0.0]]
# Batch A has one real target (input 1 -> 1: ln 4); its padding (0 -> 1, 1 -> 1) would add
# ln 2 + ln 4 if weights were ignored.
BATCH_A = (
    np.array([[1, 0], [1, 0]], np.int32),
    np.array([[1, 1], [1, 0]], np.int32),
    np.array([[1, 0], [0, 0]], np.float32),
)
# Batch B has three: 1 -> 0, 1 -> 0, 0 -> 1: ln(4/3) + ln(4/3) + ln 2.
BATCH_B = (
    np.array([[1, 1], [0, 1]], np.int32),
    np.array([[0, 0], [1, 1]], np.int32),
    np.array([[1, 1], [1, 0]], np.float32),
)
TOTAL_NLL = math.log(4) + 2 * math.log(4 / 3) + math.log(2)  # = ln(128/9)


def test_whole_set_perplexity_of_unequal_batches_by_hand():
    result = perplexity_from_batches(table_model(TWO_CLASS), [BATCH_A, BATCH_B])
    whole = (128 / 9) ** (1 / 4)  # exp(ln(128/9) / 4 tokens), about 1.942
    assert_allclose(result["perplexity"], whole, rtol=1e-6)
    assert_allclose(result["loss"], TOTAL_NLL / 4, rtol=1e-6)
    assert result["tokens"] == 4 and result["words"] == 4
    # The example discriminates: per-batch perplexities are 4 and (32/9)^(1/3);
    # their mean (about 2.763) is far from the whole-set value.
    per_batch_mean = (4 + (32 / 9) ** (1 / 3)) / 2
    assert abs(result["perplexity"] - per_batch_mean) > 0.5
    assert "per token" in result["convention"]


def test_batch_order_does_not_matter():
    forward = perplexity_from_batches(table_model(TWO_CLASS), [BATCH_A, BATCH_B])
    backward = perplexity_from_batches(table_model(TWO_CLASS), iter([BATCH_B, BATCH_A]))
    assert_allclose(forward["perplexity"], backward["perplexity"], rtol=1e-12)


def test_words_normalisation():
    result = perplexity_from_batches(table_model(TWO_CLASS), [BATCH_A, BATCH_B], words=2)
    assert_allclose(result["perplexity"], math.sqrt(128 / 9), rtol=1e-6)  # exp(NLL / 2)
    assert_allclose(result["loss"], TOTAL_NLL / 2, rtol=1e-6)
    assert result["tokens"] == 4 and result["words"] == 2
    assert "per word" in result["convention"]


def test_evaluation_batches_into_perplexity_end_to_end():
    # Uniform model over 9 classes on "a b" / "c": 5 tokens (two <eos>) predicted.
    model = table_model(np.zeros((7, 9)))
    config = DataConfig(mode="stream", seq_len=2, eval_batch_size=2)
    result = perplexity_from_batches(model, evaluation_batches(["a b", "c"], ABC, config))
    assert result["tokens"] == 5
    assert_allclose(result["perplexity"], 9.0, rtol=1e-6)
    per_word = perplexity_from_batches(
        model, evaluation_batches(["a b", "c"], ABC, config), words=3
    )
    assert_allclose(per_word["perplexity"], math.exp(5 * math.log(9) / 3), rtol=1e-6)


@pytest.mark.parametrize("batches", [[], [tuple(np.zeros((2, 3), dt) for dt in "iif")]])
def test_nothing_to_predict_is_an_error(batches):
    with pytest.raises(ValueError, match="no token"):
        perplexity_from_batches(table_model(TWO_CLASS), batches)
