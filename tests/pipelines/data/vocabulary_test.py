"""Tests of keras_moe.pipelines.data.vocabulary: the word-level vocabulary.

Expected values are worked out by hand or with NumPy (an independent
log-softmax); the code under test never produces an expected value.
"""

import json

import pytest

from keras_moe.pipelines.data.vocabulary import (
    EOS,
    PAD,
    UNK,
    WordVocabulary,
)

SPECIALS = ["<pad>", "<unk>", "<eos>"]

# ---------------------------------------------------------------------------
# WordVocabulary

# Counts: a 3, b 2, c 2, d 1, e 1 (and one "<unk>" token, which is special).
LINES = [["b", "a", "c", "a"], ["c", "d", "a", "<unk>"], ["e", "b"]]


def test_special_names():
    assert (PAD, UNK, EOS) == tuple(SPECIALS)


def test_build_frequency_order_with_alphabetical_ties():
    vocab = WordVocabulary.build(LINES)
    assert vocab.words == SPECIALS + ["a", "b", "c", "d", "e"]
    assert len(vocab) == 8
    assert vocab.index == {w: i for i, w in enumerate(SPECIALS + ["a", "b", "c", "d", "e"])}


def test_build_tie_break_does_not_depend_on_input_order():
    forward = WordVocabulary.build([["z", "y", "x", "x", "y", "z", "w"]])
    backward = WordVocabulary.build([["w", "z", "y", "x", "x", "y", "z"][::-1]])
    assert forward.words == backward.words == SPECIALS + ["x", "y", "z", "w"]


@pytest.mark.parametrize(
    "max_size, expected",
    [(3, []), (4, ["a"]), (5, ["a", "b"]), (7, ["a", "b", "c", "d"]), (100, list("abcde"))],
)
def test_build_max_size_counts_the_specials(max_size, expected):
    vocab = WordVocabulary.build(LINES, max_size=max_size)
    assert vocab.words == SPECIALS + expected
    assert len(vocab) <= max_size


@pytest.mark.parametrize(
    "min_count, expected", [(1, list("abcde")), (2, ["a", "b", "c"]), (3, ["a"]), (4, [])]
)
def test_build_min_count(min_count, expected):
    assert WordVocabulary.build(LINES, min_count=min_count).words == SPECIALS + expected


def test_build_never_duplicates_special_tokens():
    vocab = WordVocabulary.build([["<eos>", "<pad>", "x", "<unk>", "<unk>"]])
    assert vocab.words == SPECIALS + ["x"]


def test_encode_appends_eos_and_maps_oov_to_unk():
    vocab = WordVocabulary.build(LINES)
    assert vocab.encode(["a", "zzz", "e", "b"]) == [3, 1, 7, 4, 2]
    assert vocab.encode(["<unk>"]) == [1, 2]
    assert vocab.encode([]) == [2]


def test_save_load_round_trip(tmp_path):
    vocab = WordVocabulary(SPECIALS + ["Größe", "é", "the", "\"quoted\""])
    path = tmp_path / "vocab.json"
    vocab.save(str(path))
    # The file is a plain JSON list of the words in id order.
    assert json.loads(path.read_text(encoding="utf-8")) == SPECIALS + [
        "Größe", "é", "the", "\"quoted\""
    ]
    loaded = WordVocabulary.load(str(path))
    assert loaded.words == vocab.words
    assert loaded.encode(["é", "nope"]) == [4, 1, 2]


@pytest.mark.parametrize(
    "words",
    [[], ["a", "b", "c"], ["<unk>", "<pad>", "<eos>", "a"], ["<pad>", "<unk>"], ["<pad>", "<eos>", "<unk>"]],
)
def test_constructor_rejects_lists_without_the_specials_first(words):
    with pytest.raises(ValueError, match="<pad>"):
        WordVocabulary(words)
