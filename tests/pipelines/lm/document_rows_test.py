"""Tests of `data.document_rows`: stream windows that stay inside one document.

Windows are checked against ones written by hand and against a reference cut
independently from each document's token stream (plain slicing), never
against the code under test.
"""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
import yaml
from numpy.testing import assert_array_equal

from keras_moe.pipelines.config import load_config
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import DataConfig, LMConfig
from keras_moe.pipelines.lm.inputs import (
    CHUNK_LINES,
    document_windows,
    evaluation_batches,
    training_dataset,
)
from tests.pipelines.lm.inputs_test import ABC, BIG, EOS_ID, WORDS, TinyVocab
from tests.pipelines.lm.train_test import TINY, run_cli

IDS = {w: i + 3 for i, w in enumerate(WORDS)}


def test_windows_by_hand_never_cross_a_document():
    # Documents "a b / c", "d" and "a b c d a"; two blank lines make an empty document.
    lines = ["a b", "c", "", "d", "", "", "a b c d a"]
    got = list(document_windows(lines, ABC, 3))
    expected = [
        ([2, 3, 4], [3, 4, 2], [1, 1, 1]),  # <eos> a b <eos> c <eos>
        ([2, 5, 0], [5, 2, 0], [1, 1, 0]),
        ([2, 6, 0], [6, 2, 0], [1, 1, 0]),  # <eos> d <eos>
        ([2, 3, 4], [3, 4, 5], [1, 1, 1]),  # <eos> a b c d a <eos>
        ([5, 6, 3], [6, 3, 2], [1, 1, 1]),
    ]
    assert len(got) == len(expected)
    for (inputs, targets, weights), (x, y, w) in zip(got, expected, strict=True):
        assert_array_equal(inputs, x)
        assert_array_equal(targets, y)
        assert_array_equal(weights, w)
    # Each token predicted once: words + one <eos> per non-blank line (9 + 4).
    assert sum(float(w.sum()) for _, _, w in got) == 13


def random_documents(n, seed):
    """Lines of `n` documents separated by runs of 1-3 blank lines (some "  ")."""
    rng = np.random.default_rng(seed)
    lines, documents = [], []
    for d in range(n):
        doc = [" ".join(rng.choice(WORDS + ["oov"], rng.integers(1, 9)))
               for _ in range(rng.integers(1, 40))]
        documents.append(doc)
        lines += doc
        if d < n - 1:
            lines += [rng.choice(["", "  "]) for _ in range(rng.integers(1, 4))]
    return lines, documents


def reference_windows(documents, seq_len):
    """Each document's `<eos> ids... ` stream cut at 0, L, 2L, ..., padded (plain slicing)."""
    out = []
    for doc in documents:
        stream = [EOS_ID]
        for line in doc:
            stream += [IDS.get(w, 1) for w in line.split()] + [EOS_ID]
        for start in range(0, len(stream) - 1, seq_len):
            x = stream[start:start + seq_len]
            y = stream[start + 1:start + seq_len + 1]
            n = len(y)
            pad = [0] * (seq_len - n)
            out.append((x[:n] + pad, y + pad, [1.0] * n + [0.0] * (seq_len - n)))
    return out


@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_windows_equal_an_independent_per_document_reference(seq_len):
    # More lines than CHUNK_LINES, so documents straddle encoding chunks.
    lines, documents = random_documents(60, seed=seq_len)
    assert len(lines) > 2 * CHUNK_LINES
    got = list(document_windows(lines, BIG, seq_len))
    expected = reference_windows(documents, seq_len)
    assert len(got) == len(expected)
    for (inputs, targets, weights), (x, y, w) in zip(got, expected, strict=True):
        assert_array_equal(inputs, x)
        assert_array_equal(targets, y)
        assert_array_equal(weights, w)
    words = sum(len(line.split()) + 1 for line in lines if line.strip())
    assert sum(float(w.sum()) for _, _, w in got) == words


def test_evaluation_batches_and_one_training_pass_hold_every_window_once():
    lines, documents = random_documents(25, seed=3)
    config = DataConfig(seq_len=7, batch_size=3, eval_batch_size=4, document_rows=True,
                        shuffle_buffer=50)
    expected = reference_windows(documents, 7)
    rows = []
    for inputs, targets, weights in evaluation_batches(iter(lines), BIG, config):
        assert inputs.shape == (4, 7)
        rows += [(list(x), list(y), list(w)) for x, y, w in zip(inputs, targets, weights,
                                                                   strict=True)]
    real = [row for row in rows if sum(row[2])]
    assert real == [(x, y, w) for x, y, w in expected]  # in order, weight-0 rows padding only
    ds = training_dataset(lambda: iter(lines), BIG, config, seed=1, repeat=False)
    seen = [(tuple(x), tuple(y), tuple(w)) for batch in ds.as_numpy_iterator()
            for x, y, w in zip(*batch, strict=True)]
    assert sorted(seen) == sorted((tuple(x), tuple(y), tuple(w)) for x, y, w in expected)
    assert seen != [(tuple(x), tuple(y), tuple(w)) for x, y, w in expected]  # shuffled


def uniform_model(vocab_size):
    return lambda inputs, training=False: tf.zeros((*inputs.shape, vocab_size))


def test_perplexity_counts_words_and_one_end_of_line_per_non_blank_line(tmp_path):
    # Uniform logits over V ids: the per-token perplexity is exactly V, and the
    # per-word perplexity is V only when words (the normaliser) == predicted tokens.
    path = tmp_path / "valid.txt"
    path.write_text("a b\nc\n\n\nd\n\na b c d a\n")
    config = load_config(LMConfig, None, [f"data.train={path}", f"data.valid={path}",
                                          "data.document_rows=true", "data.seq_len=3"])
    factory = lm_train.lines_factory(config.data, "valid")
    assert "" in list(factory())  # the blank lines reach the windows
    result = lm_train.evaluate_lines(uniform_model(7), factory, ABC, config.data)
    assert result["tokens"] == result["words"] == 9 + 4
    assert result["perplexity"] == pytest.approx(7.0)
    # Without the key blank lines are dropped when read: the same count, one stream.
    plain = load_config(LMConfig, None, [f"data.train={path}", f"data.valid={path}"])
    factory = lm_train.lines_factory(plain.data, "valid")
    assert "" not in list(factory())
    assert lm_train.evaluate_lines(uniform_model(7), factory, ABC, plain.data)["words"] == 13


def test_a_blank_line_given_directly_counts_a_word_only_without_the_key():
    lines = ["a b", "", "c"]
    vocab = TinyVocab(ABC.ids)
    with_key = lm_train.evaluate_lines(uniform_model(7), lambda: iter(lines), vocab,
                                       DataConfig(document_rows=True, seq_len=4))
    assert with_key["words"] == with_key["tokens"] == 5
    without = lm_train.evaluate_lines(uniform_model(7), lambda: iter(lines), vocab,
                                      DataConfig(seq_len=4))
    assert without["words"] == without["tokens"] == 6  # the blank line is an <eos> there
    assert without["perplexity"] == pytest.approx(7.0)


@pytest.mark.parametrize("override, message", [
    (["data.mode=sentences"], "mode: stream"),
    (["data.interleave_block_lines=8"], "interleave_block_lines"),
    (["train.max_tokens=64", "train.steps=100"], "padded"),
])
def test_the_key_refuses_what_it_cannot_honour(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(LMConfig, None, ["data.document_rows=true", *override])


def test_cli_trains_and_evaluates_with_document_rows(tmp_path):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran to the big red barn".split()

    def write(path, documents):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join("\n".join(" ".join(rng.choice(words, rng.integers(2, 9)))
                                          for _ in range(rng.integers(1, 6)))
                                for _ in range(documents)) + "\n")
        return str(path)

    train, valid = write(tmp_path / "train.txt", 60), write(tmp_path / "valid.txt", 8)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"data": {"train": train, "valid": valid,
                                                    "document_rows": True}}))
    run_dir = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    done = run_cli("lm", "train", "--config", str(config_file), *sets, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2
    text = open(valid).read().split("\n")
    expected_words = sum(len(line.split()) + 1 for line in text if line.strip())
    assert results["valid"]["words"] == results["valid"]["tokens"] == expected_words
    assert 5 < results["valid"]["perplexity"] < 60
    assert math.isfinite(results["valid"]["loss"])
