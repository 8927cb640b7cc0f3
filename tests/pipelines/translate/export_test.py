"""Tests of keras_moe.pipelines.translate.export.

A tiny translation model with random weights is exported with a WordPiece
vocabulary learned here. What the SavedModel serves is compared, string for
string, with the Python path it replaces: `vocabulary.encode_lines`, padding,
`beam_search` (or `greedy_decode`), `vocabulary.decode`. The main check runs
the SavedModel in a fresh Python process that imports only TensorFlow and
TensorFlow Text, as a server would.
"""

import json
import os
import random
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose

from keras_moe.models import TranslationModel
from keras_moe.models.decoding import beam_search, greedy_decode
from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary
from keras_moe.pipelines.translate.export import export_translator, load_translator

EOS = 2
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "home", "a", "big", "red", "house",
         "is", "it", "yes", "no"]
MARKS = [",", ".", "!", "?", ""]
SETTINGS = {"alpha": 0.6, "beta": 0.2, "max_length_ratio": 2.0, "min_extra": 10}
# Punctuation stays on its word; `Z`, `€`, `ï` and `日` are outside the
# learned alphabet (their words become `<unk>`); the third is empty; the
# fourth has tab, non-breaking, ideographic and information-separator
# spaces, all of which `str.split()` splits at.
SENTENCES = [
    "the cat sat on the mat.",
    "Zebra€ naïve, 日本!",
    "",
    "dog\t ran\xa0home\u3000? yes\x1cno",
    "is it a big red house?",
]


def make_corpus():
    rng = random.Random(3)
    return [
        " ".join(rng.choice(WORDS) + rng.choice(MARKS) for _ in range(rng.randint(2, 7)))
        for _ in range(50)
    ]


def padded(rows):
    width = max(map(len, rows))
    return tf.constant([row + [0] * (width - len(row)) for row in rows], tf.int32)


def text_before_eos(vocab, row):
    """`vocab.decode` of a row's ids up to its first `<eos>`."""
    row = list(row)
    return vocab.decode(row[: row.index(EOS)] if EOS in row else row)


@pytest.fixture(scope="module")
def vocab():
    # lower_thresh=2: whole words and `word,`-style pieces on 50 lines.
    return WordPieceVocabulary.learn(make_corpus(), vocab_size=80, lower_thresh=2)


@pytest.fixture(scope="module")
def model(vocab):
    keras.utils.set_random_seed(5)
    model = TranslationModel(vocab_size=len(vocab), model_dim=8, num_experts=4,
                             expert_hidden_dim=8, k=2, seed=1)
    # Untrained, the decoder states hardly depend on the tokens fed back
    # and every output repeats one piece; larger embeddings give varied
    # outputs (several words, `##` pieces, `<unk>`, some cut at the limit).
    rng = np.random.default_rng(0)
    embeddings = model.embedding.embeddings
    embeddings.assign(rng.normal(0.0, 3.0, embeddings.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def export_dir(model, vocab, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "translator"
    assert export_translator(model, vocab, str(path), beam_width=2, **SETTINGS) == str(path)
    return path


@pytest.fixture(scope="module")
def python_path(model, vocab):
    """Translations and scores of SENTENCES the way Python code gets them."""
    ids, scores = beam_search(model, padded(vocab.encode_lines(SENTENCES)), bos_id=EOS,
                              eos_id=EOS, beam_width=2, **SETTINGS)
    return [vocab.decode(row) for row in ids.numpy()], scores.numpy()


def detokenize_rows(vocab):
    """Hand-made id rows: a leading `##` piece, `<unk>`, padding inside, ids after <eos>."""
    word = vocab.index["sat"]
    suffix = next(i for i, t in enumerate(vocab.tokens) if t.startswith("##") and len(t) > 3)
    rows = [
        [suffix, word, suffix, 1, 0, word, EOS, word],
        [word, word, 1, suffix, 0, 0, 0, 0],  # no <eos>: cut at the length limit
        [EOS, word, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, suffix, suffix, word, EOS, 0, 0],
    ]
    return rows


SERVE = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  the WordPiece ops

request = json.load(open(sys.argv[1]))
loaded = tf.saved_model.load(request["export_dir"])
signatures = loaded.signatures
out = signatures["serving_default"](sentences=tf.constant(request["sentences"], tf.string))
empty = signatures["serving_default"](sentences=tf.zeros([0], tf.string))
source_ids = signatures["tokenize"](sentences=tf.constant(request["sentences"], tf.string))
texts = signatures["detokenize"](ids=tf.constant(request["ids"], tf.int32))
json.dump({
    "keras_moe_imported": "keras_moe" in sys.modules,
    "inputs": sorted(signatures["serving_default"].structured_input_signature[1]),
    "outputs": sorted(signatures["serving_default"].structured_outputs),
    "translations": [t.decode("utf-8") for t in out["translations"].numpy()],
    "scores": out["scores"].numpy().tolist(),
    "scores_dtype": out["scores"].dtype.name,
    "empty_batch": [out_.shape.as_list() for out_ in empty.values()],
    "source_ids": source_ids["source_ids"].numpy().tolist(),
    "detokenized": [t.decode("utf-8") for t in texts["translations"].numpy()],
}, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def served(export_dir, vocab, tmp_path_factory):
    """What the SavedModel gives in a process with only TensorFlow and TensorFlow Text."""
    folder = tmp_path_factory.mktemp("serve")
    request, response = folder / "request.json", folder / "response.json"
    request.write_text(json.dumps(
        {"export_dir": str(export_dir), "sentences": SENTENCES, "ids": detokenize_rows(vocab)}
    ))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", SERVE, str(request), str(response)],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(response.read_text())


# ---------------------------------------------------------------------------
# the SavedModel in a separate process


def test_served_translations_equal_the_python_path(served, python_path):
    translations, scores = python_path
    assert not served["keras_moe_imported"]
    assert served["translations"] == translations
    assert served["scores_dtype"] == "float32"
    assert_allclose(served["scores"], scores, rtol=1e-6)
    # The random model's outputs exercise the text assembly: several words,
    # and the sentences do not all get the same translation.
    assert any(" " in t for t in translations)
    assert len(set(translations)) > 1


def test_signature_names_and_empty_inputs(served):
    assert served["inputs"] == ["sentences"]
    assert served["outputs"] == ["scores", "translations"]
    assert isinstance(served["translations"][SENTENCES.index("")], str)
    assert served["empty_batch"] == [[0], [0]]


def test_in_graph_tokenization_equals_encode_lines(served, vocab):
    expected = vocab.encode_lines(SENTENCES)
    assert any(1 in row for row in expected)  # unknown characters were met
    rows = served["source_ids"]
    assert len(rows[0]) == max(map(len, expected))  # padded to the longest
    assert [row[: len(e)] for row, e in zip(rows, expected, strict=True)] == expected
    assert all(set(row[len(e):]) <= {0} for row, e in zip(rows, expected, strict=True))


def test_in_graph_detokenization_equals_decode(served, vocab):
    rows = detokenize_rows(vocab)
    expected = [text_before_eos(vocab, row) for row in rows]
    assert served["detokenized"] == expected
    assert expected[0].startswith("##")  # a leading `##` piece stays as it is
    assert "<unk>" in expected[0] and expected[2] == expected[3] == ""


# ---------------------------------------------------------------------------
# load_translator, greedy decoding, truncation, the files written


def test_greedy_export_truncates_long_sources(model, vocab, tmp_path):
    path = export_translator(model, vocab, tmp_path / "greedy", beam_width=1,
                             max_source_pieces=4, **SETTINGS)
    translate = load_translator(path)
    # At most 3 pieces, then <eos>.
    sources = [row[:3] + [EOS] if len(row) > 4 else row for row in vocab.encode_lines(SENTENCES)]
    ids, _ = greedy_decode(model, padded(sources), bos_id=EOS, eos_id=EOS,
                           max_length_ratio=2.0, min_extra=10)
    assert translate(SENTENCES) == [vocab.decode(row) for row in ids.numpy()]
    assert translate([]) == []
    tokenized = translate.saved_model.signatures["tokenize"](sentences=tf.constant(SENTENCES))
    assert tokenized["source_ids"].numpy().tolist() == padded(sources).numpy().tolist()

    with open(os.path.join(path, "translator.json"), encoding="utf-8") as f:
        settings = json.load(f)
    assert settings["decoder"] == "greedy_decode"
    assert settings["beam_width"] == 1 and settings["max_source_pieces"] == 4
    assert settings["vocab_size"] == len(vocab) and settings["bos_id"] == settings["eos_id"] == 2
    assert WordPieceVocabulary.load(path) == vocab
    assert os.listdir(tmp_path) == ["greedy"]  # no staging folder left behind


def test_load_translator_errors(export_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        load_translator(tmp_path)
    translate = load_translator(export_dir)
    with pytest.raises(ValueError, match="not one string"):
        translate("the cat sat")


# ---------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize("name, value, message", [
    ("beam_width", 0, "`beam_width` must be an integer >= 1. Received: beam_width=0"),
    ("beam_width", True, "Received: beam_width=True"),
    ("alpha", -0.1, "`alpha` must be a finite number >= 0. Received: alpha=-0.1"),
    ("beta", float("nan"), "Received: beta=nan"),
    ("max_length_ratio", 0, "`max_length_ratio` must be a finite number > 0"),
    ("min_extra", -1, "Received: min_extra=-1"),
    ("max_source_pieces", 0, "Received: max_source_pieces=0"),
])
def test_bad_settings_are_refused(model, vocab, tmp_path, name, value, message):
    with pytest.raises(ValueError) as error:
        export_translator(model, vocab, tmp_path / "out", **{name: value})
    assert message in str(error.value)
    assert os.listdir(tmp_path) == []


def test_mismatched_or_missing_pieces_are_refused(model, vocab, tmp_path):
    smaller = WordPieceVocabulary(vocab.tokens[:-1])
    with pytest.raises(ValueError, match=r"vocab_size.*Received: len\(vocabulary\)="):
        export_translator(model, smaller, tmp_path / "out")
    with pytest.raises(ValueError, match="`vocabulary` must be a WordPieceVocabulary"):
        export_translator(model, vocab.tokens, tmp_path / "out")
    with pytest.raises(ValueError, match="`model` must be a translation model"):
        export_translator(object(), vocab, tmp_path / "out")


def test_a_non_empty_export_dir_is_never_overwritten(model, vocab, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(target)):
        export_translator(model, vocab, target)
    assert os.listdir(target) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_translator(model, vocab, a_file)
