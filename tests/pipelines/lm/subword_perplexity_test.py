"""Per-word perplexity with a sub-word vocabulary, read from a `wordpiece.txt` of the
format runs have always written (one token per line, `<pad>`, `<unk>`, `<eos>` first).

A model that gives every entry the same score predicts each piece with
probability 1/V, so the whole-file NLL is `pieces * ln V` and the per-word
perplexity is `V ** (pieces / words)`, words counted as whitespace words
plus one `<eos>` per line: worked out by hand below.
"""

import math

import keras
import pytest

from keras_moe.pipelines.config import load_config
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig
from keras_moe.pipelines.training.rundir import RunDir

# As an older run's wordpiece.txt holds it, written here by hand.
OLD_FILE = "<pad>\n<unk>\n<eos>\nc\na\nt\n##a\n##t\n##s\n"
V = 9
LINES = ["cat cats", "at"]
# cat -> c ##a ##t, cats -> c ##a ##t ##s, at -> a ##t; one <eos> per line.
PIECES = [[3, 6, 7, 3, 6, 7, 8, 2], [4, 7, 2]]
PREDICTED = 3 + 4 + 1 + 2 + 1  # stream mode: an <eos> in front, every piece predicted
WORDS = (2 + 1) + (1 + 1)


class Uniform(keras.Model):
    """Logits 0 for every entry: probability 1/V for each piece."""

    vocab_size = V

    def call(self, tokens, training=False):
        return keras.ops.zeros(keras.ops.shape(tokens) + (V,))


@pytest.fixture
def old_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wordpiece.txt").write_text(OLD_FILE, encoding="utf-8")
    (tmp_path / "valid.txt").write_text("".join(line + "\n" for line in LINES))
    return tmp_path


def config(root, *extra):
    return load_config(LMConfig, None, [
        f"data.train={root / 'valid.txt'}", f"data.valid={root / 'valid.txt'}",
        "data.vocabulary=wordpiece", "data.vocab_learner=tokenizers", "data.vocab_size=100",
        "data.seq_len=4", "data.eval_batch_size=2", *extra,
    ])


def test_an_old_wordpiece_file_loads_and_encodes_as_before(old_run):
    vocab = RunDir.wrap(str(old_run / "run")).load_vocabulary()
    assert len(vocab) == V
    assert [list(ids) for ids in vocab.encode_lines(LINES)] == PIECES
    # A run directory that has the file keeps it, whatever the learner now is.
    kept = lm_train.build_vocabulary(config(old_run), str(old_run / "run"))
    assert kept == vocab


@pytest.mark.parametrize("mode", ["stream", "sentences"])
def test_per_word_perplexity_of_pieces(old_run, mode):
    vocab = RunDir.wrap(str(old_run / "run")).load_vocabulary()
    cfg = config(old_run, f"data.mode={mode}")
    result = lm_train.evaluate_lines(
        Uniform(), lm_train.lines_factory(cfg.data, "valid"), vocab, cfg.data
    )
    assert result["tokens"] == PREDICTED and result["words"] == WORDS
    assert result["loss"] == pytest.approx(PREDICTED * math.log(V) / WORDS, rel=1e-6)
    assert result["perplexity"] == pytest.approx(V ** (PREDICTED / WORDS), rel=1e-6)
    assert "per word" in result["convention"]


def test_validation_slice_words_are_whitespace_words(old_run):
    # The slice counts whitespace words (2 in the first line): a limit of 2
    # keeps one line, 3 keeps both.
    factory = lm_train.lines_factory(config(old_run).data, "valid")
    assert list(lm_train.first_words(factory, 2)()) == LINES[:1]
    assert list(lm_train.first_words(factory, 3)()) == LINES


def test_frequency_order_renumbers_pieces_by_count(old_run):
    # In LINES: c 2, ##a 2, ##t 3, ##s 1, a 1, t 0; <eos> keeps id 2.
    vocab = RunDir.wrap(str(old_run / "run")).load_vocabulary()
    ordered = lm_train.frequency_ordered(vocab, LINES)
    assert ordered.tokens == ["<pad>", "<unk>", "<eos>", "##t", "c", "##a", "a", "##s", "t"]
    # The same pieces: the text splits as before, only the ids change.
    decode = dict(enumerate(ordered.tokens))
    assert [[decode[i] for i in ids] for ids in ordered.encode_lines(LINES)] == [
        [vocab.tokens[i] for i in ids] for ids in PIECES
    ]


def test_the_pipeline_orders_a_new_vocabulary_when_asked(old_run):
    learned = lm_train.build_vocabulary(config(old_run), None)
    ordered = lm_train.build_vocabulary(config(old_run, "data.vocab_order=frequency"), None)
    assert sorted(ordered.tokens) == sorted(learned.tokens)
    counts = {}
    for ids in ordered.encode_lines(LINES):
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    seen = [counts.get(i, 0) for i in range(3, len(ordered))]
    assert seen == sorted(seen, reverse=True) and seen[0] > 0
