"""Evaluation of translation models: one trace for every batch shape, overlong sentences cut.

Issue 28: `evaluate_pairs.<locals>.step` was a new `tf.function` at every
call and retraced for batches of new lengths (TensorFlow's retracing
warnings); one 100k-character validation line held a run in validation for
12 minutes at 4.3 GB.
"""

import math

import numpy as np
import pytest

from keras_moe.models import translation_presets
from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary
from keras_moe.pipelines.translate import evaluation
from tests.pipelines.translate.train_test import ENGLISH, LEXICON, tiny_config

GERMAN = sorted(set(LEXICON.values()))


@pytest.fixture(scope="module")
def vocab():
    # Every English and German word whole, plus its letters (for unknown words).
    words = sorted(set(ENGLISH + GERMAN + ["."]))
    letters = sorted({c for w in words for c in w} - set(words))
    return WordPieceVocabulary(["<pad>", "<unk>", "<eos>", *words, *letters,
                                *[f"##{c}" for c in sorted({c for w in words for c in w})]])


@pytest.fixture(scope="module")
def model(vocab):
    model = translation_presets.build_translation_model(
        "cpu-gnmt-moe-16", len(vocab), model_dim=16, num_experts=4, expert_hidden_dim=8, k=2,
        dropout=0.0, seed=1,
    )
    model((np.full((1, 2), 2, np.int32), np.full((1, 2), 2, np.int32)))
    return model


def sentence(n, offset=0):
    words = [ENGLISH[(i + offset) % len(ENGLISH)] for i in range(n)]
    return " ".join(words), " ".join(LEXICON[w] for w in words)


def test_evaluate_pairs_traces_its_step_once_for_batches_of_every_length(model, vocab):
    # Batches of 3 pairs of 1..12 words: 12 different (batch, length) shapes.
    pairs = [sentence(n, k) for n in range(1, 13) for k in range(3)]
    first = evaluation.evaluate_pairs(model, vocab, pairs, batch_size=3)
    second = evaluation.evaluate_pairs(model, vocab, pairs[::-1], batch_size=5, routing=True)
    assert evaluation.evaluation_step(model).experimental_get_tracing_count() == 1
    assert evaluation.evaluation_step(model, True).experimental_get_tracing_count() == 1
    # The same sums whatever the batching: per-piece perplexity over all pairs.
    assert first["tokens"] == second["tokens"] == sum(
        len(vocab.encode_line(t)) for _, t in pairs)
    assert first["perplexity"] == pytest.approx(second["perplexity"], rel=1e-4)
    assert second["routing"]  # the routing pass shares the traced step


def test_limit_lines_keeps_whole_words_up_to_the_limit_and_says_which(vocab):
    short, _ = sentence(3)
    long_line = " ".join(ENGLISH * 10)  # 150 words, one piece each
    lines, cut = evaluation.limit_lines(vocab, [short, long_line, short], 20)
    assert cut == [1]
    assert lines[0] == lines[2] == short
    assert lines[1] == " ".join((ENGLISH * 10)[:20])
    # "bigbird" is 5 pieces (big ##b ##i ##r ##d): it does not fit after 17 words.
    assert len(vocab.encode_line("bigbird")) == 5 + 1
    lines, cut = evaluation.limit_lines(vocab, [" ".join((ENGLISH * 2)[:17] + ["bigbird"])], 20)
    assert cut == [0] and lines[0] == " ".join((ENGLISH * 2)[:17])
    assert evaluation.limit_lines(vocab, [long_line], None) == ([long_line], [])


def test_a_100k_character_validation_line_is_cut_counted_and_scored(
        model, vocab, tmp_path):
    config = tiny_config(
        {s: {"en": "x", "de": "y"} for s in ("train", "valid", "test")}, "data.max_eval_pieces=24"
    )
    source = " ".join(ENGLISH[i % len(ENGLISH)] for i in range(22_000))
    assert len(source) > 100_000
    target = " ".join(LEXICON[w] for w in source.split())
    pairs = [sentence(4), (source, target), sentence(6, 2)]
    result = evaluation.score_split(model, vocab, config, pairs, "valid", str(tmp_path),
                                    beam_width=2)
    # Uncut, the long pair alone would be 22,000 source steps and up to
    # 44,000 decoding steps at beam 2. That it was cut is checked by what
    # was scored and decoded (below), not by a clock, which a busy machine
    # (a CI clone beside a training run took 75 s) would fail.
    assert result["truncated"] == {"max_pieces": 24, "sources": 1, "references": 1}
    assert result["sentences"] == 3
    # Perplexity counts the cut reference: 24 pieces and its <eos>.
    assert result["tokens"] == 5 + 25 + 7
    assert math.isfinite(result["perplexity"])
    hypotheses = (tmp_path / "valid.hyp").read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == 3
    # The decoder may write at most max_length_ratio * source + min_extra pieces.
    d = config.decode
    assert len(hypotheses[1].split()) <= d.max_length_ratio * 25 + d.min_extra
