"""`lm evaluate` states its `<unk>` share, and survives a pathological line (issue 28).

Point 12: text of unseen words got perplexity 6.4 (every word one `<unk>`)
without a word about it. Point 7: in sentences mode one line is one row, so
a 100k-word line made a [batch, 100k, vocab] tensor.
"""

import numpy as np
import pytest

from keras_moe.pipelines.data.vocabulary import WordVocabulary
from keras_moe.pipelines.lm import inputs as lm_input
from keras_moe.pipelines.lm import train as lm_train
from tests.pipelines.lm.train_test import WORDS, corpus, tiny_config  # noqa: F401


@pytest.fixture
def run_dir(tmp_path, corpus):  # noqa: F811
    run_dir = tmp_path / "run"
    lm_train.train(tiny_config(corpus, "data.mode=sentences", "data.batch_tokens=64"),
                   str(run_dir))
    return run_dir


def test_evaluate_reports_unk_tokens_and_long_lines(run_dir, tmp_path):
    unseen = tmp_path / "unseen.txt"
    # 3 lines, 8 words, of which 6 never seen in training ("the" and "cat" were).
    unseen.write_text("zorp the blick\ncat quux\nfnord wibble snark\n", encoding="utf-8")
    result = lm_train.evaluate(str(run_dir), str(unseen))
    assert result["unk_tokens"] == 6
    assert result["unk_rate"] == pytest.approx(6 / 8)
    assert "<unk>" in result["unk_convention"]
    assert result["segmented_lines"] == 0

    known = tmp_path / "known.txt"
    long_line = " ".join(WORDS[i % len(WORDS)] for i in range(2500))
    known.write_text(f"the cat sat\n{long_line}\n", encoding="utf-8")
    result = lm_train.evaluate(str(run_dir), str(known))
    assert result["unk_tokens"] == 0 and result["unk_rate"] == 0.0
    # The 2,500-word line went in 3 segments; every word (and <eos>) counted once.
    assert result["segmented_lines"] == 1
    assert result["words"] == result["tokens"] == 3 + 1 + 2500 + 1


def test_sentence_segments_cover_every_token_once_from_the_token_before():
    vocab = WordVocabulary(["<pad>", "<unk>", "<eos>", *sorted(set(WORDS))])
    line = " ".join(WORDS[i % len(WORDS)] for i in range(25))
    counts = {}
    rows = list(lm_input.sentence_segments(["the cat", line], vocab, max_len=10, counts=counts))
    whole = list(lm_input.sentence_rows(["the cat", line], vocab))
    assert counts == {"segmented_lines": 1}
    # "the cat" + <eos> is one row; the 26 tokens of the long line are 10 + 10 + 6.
    assert [len(r[1]) for r in rows] == [3, 10, 10, 6]
    for column in range(3):
        np.testing.assert_array_equal(np.concatenate([r[column] for r in rows[1:]]),
                                      whole[1][column])
