"""Tests of keras_moe.pipelines.data.wordpiece and the vocabulary interface of lm_data.

The WordPiece vocabulary is learned from a small corpus written here; what
the tokenizer does with it is checked against a plain-Python
longest-match-first splitter (`reference_pieces`), so expected pieces never
come from the code under test.
"""

import random
import re
import warnings

import pytest

from keras_moe.pipelines.data import lm_corpora, wordpiece
from keras_moe.pipelines.data.vocabulary import (
    WordVocabulary,
    check_vocabulary_matches,
)
from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary
from keras_moe.pipelines.training.rundir import RunDir
from tests.conftest import require_shared_data

SPECIALS = ["<pad>", "<unk>", "<eos>"]

# Frequent words (each used dozens of times below), with PTB-style tokens
# that BERT's punctuation splitting would cut: `u.s.`, `'s`, `<unk>`.
SUBJECTS = ["the company", "the market", "the government", "investors", "u.s. officials"]
VERBS = ["said", "expects", "reported"]
OBJECTS = ["higher prices", "lower rates", "strong sales", "the company 's <unk> shares"]
FREQUENT = ["the", "company", "market", "said", "prices", "u.s.", "'s", "<unk>", "shares"]
# Words seen once each: below the learner's threshold of 10, so never whole.
RARE = ["markets", "zebra", "quixotic", "overcapitalization"]


def make_corpus():
    rng = random.Random(7)
    lines = [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(300)
    ]
    lines += [f"the {word} said ." for word in RARE]
    return lines


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def vocab():
    return WordPieceVocabulary.learn(CORPUS, vocab_size=120)


def reference_pieces(word, tokens):
    """WordPiece's greedy longest-match-first split, written out plainly."""
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in tokens:
                pieces.append(piece)
                start = end
                break
        else:
            return ["<unk>"]  # one unsplittable part makes the whole word unknown
    return pieces


def tokens_of(vocab, ids):
    return [vocab.tokens[i] for i in ids]


# ---------------------------------------------------------------------------
# learning


def test_reserved_ids_and_size(vocab):
    assert vocab.tokens[:3] == SPECIALS
    assert [vocab.index[t] for t in SPECIALS] == [0, 1, 2]
    assert len(vocab) <= 120
    # The learner keeps every character of the corpus, word-initial and `##`.
    for char in set("".join(CORPUS).replace(" ", "")) - set("<>"):
        assert char in vocab.index and "##" + char in vocab.index


def test_frequent_words_are_single_tokens(vocab):
    for word in FREQUENT:
        assert vocab.encode_line(word) == [vocab.index[word], 2], word


def test_rare_words_split_into_joiner_pieces(vocab):
    for word in RARE:
        assert word not in vocab.index
        pieces = tokens_of(vocab, vocab.encode_line(word)[:-1])
        assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:]), pieces
        assert vocab.decode(vocab.encode_line(word)) == word
    # By hand: "market" is a token and "s" a suffix character, "markets" is not.
    assert tokens_of(vocab, vocab.encode_line("markets")) == ["market", "##s", "<eos>"]


def test_pieces_match_longest_match_first(vocab):
    words = sorted({w for line in CORPUS for w in line.split()})
    words += ["marketed", "sharesaid", "qqq", "zz9", "日本", "x" * 120]
    tokens = set(vocab.tokens)
    for word in words:
        expected = reference_pieces(word, tokens) if len(word.encode()) <= 100 else ["<unk>"]
        assert tokens_of(vocab, vocab.encode_line(word)) == expected + ["<eos>"], word


def test_unknown_characters_make_one_unk(vocab):
    the, market = vocab.index["the"], vocab.index["market"]
    assert vocab.encode_line("the 日本 market") == [the, 1, market, 2]
    assert vocab.encode_line("<unk>") == [1, 2]  # PTB's own <unk> is the reserved id


def test_round_trip_of_every_corpus_line(vocab):
    encoded = vocab.encode_lines(CORPUS)
    assert [vocab.decode(ids) for ids in encoded] == CORPUS
    assert all(ids[-1] == 2 and 2 not in ids[:-1] for ids in encoded)
    assert vocab.decode(encoded[0] + encoded[1]) == CORPUS[0] + "\n" + CORPUS[1]
    assert vocab.decode([0] + encoded[0] + [0, 0]) == CORPUS[0]  # padding skipped


def test_encode_lines_batches_agree_with_single_lines(vocab):
    lines = CORPUS[:10] + ["", "   ", "the  zebra\tsaid"]
    one_by_one = [vocab.encode_line(line) for line in lines]
    assert vocab.encode_lines(lines) == one_by_one
    assert vocab.encode_lines(iter(lines), batch_size=3) == one_by_one
    assert one_by_one[10] == one_by_one[11] == [2]
    assert vocab.encode_lines([]) == []
    assert vocab.encode(["the", "zebra"]) == vocab.encode_line("the zebra")


def test_words_in_counts_words_not_pieces(vocab):
    line = "the quixotic zebra"
    assert len(vocab.encode_line(line)) > 4
    assert vocab.words_in(line) == 4 == lm_corpora.count_words(line)


def test_learn_streams_and_caps_the_lines_read():
    read = []

    def lines():
        for line in CORPUS:
            read.append(line)
            yield line

    capped = WordPieceVocabulary.learn(lines(), vocab_size=120, max_lines=100)
    assert len(read) == 100  # the generator was consumed no further
    assert capped == WordPieceVocabulary.learn(CORPUS[:100], vocab_size=120)
    # The rare words come after line 300, so the capped alphabet lacks "q".
    assert "q" not in capped.index and "q" in WordPieceVocabulary.learn(CORPUS, 120).index


def test_learn_from_iter_lines(tmp_path, vocab):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    assert WordPieceVocabulary.learn(lm_corpora.iter_lines(str(path)), 120) == vocab


def test_learn_small_vocabulary_keeps_every_character(vocab):
    # The corpus has 27 characters (a-z without j, "'" and "."): 3 + 2 * 27 = 57
    # tokens are needed before any longer piece.
    chars = [t for t in vocab.tokens if len(t) == 1 or (t.startswith("##") and len(t) == 3)]
    assert len(chars) == 54
    small = WordPieceVocabulary.learn(CORPUS, vocab_size=58)
    assert len(small) <= 58
    assert set(chars) <= set(small.tokens)
    # Every corpus line still round-trips, in shorter pieces.
    encoded = small.encode_lines(CORPUS)
    assert [small.decode(ids) for ids in encoded] == CORPUS
    assert sum(map(len, encoded)) > sum(map(len, vocab.encode_lines(CORPUS)))
    with pytest.raises(ValueError, match="vocab_size=56 is below the 57"):
        WordPieceVocabulary.learn(CORPUS, vocab_size=56)


def test_fit_to_size_drops_the_rarest_long_tokens():
    learned = SPECIALS + ["a", "b", "ab", "##a", "##b", "ba", "##ab", "bab"]
    fit = wordpiece._fit_to_size
    assert fit(learned, 11) == learned
    assert fit(learned, 9) == SPECIALS + ["a", "b", "ab", "##a", "##b", "ba"]
    assert fit(learned, 7) == SPECIALS + ["a", "b", "##a", "##b"]
    with pytest.raises(ValueError, match="vocab_size=6 is below the 7"):
        fit(learned, 6)


@pytest.mark.parametrize("lines", [[], ["", "   "]])
def test_learn_without_words(lines):
    with pytest.raises(ValueError, match="no word"):
        WordPieceVocabulary.learn(lines, 100)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"vocab_size": 3}, "vocab_size"), ({"vocab_size": 50, "max_lines": 0}, "max_lines")],
)
def test_learn_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WordPieceVocabulary.learn(CORPUS, **kwargs)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["<unk>", "<pad>", "<eos>", "a"], "must start with"),
        (SPECIALS + ["a", "b", "a"], "'a' twice"),
        (SPECIALS + ["a b"], "without spaces"),
        (SPECIALS + [""], "non-empty"),
    ],
)
def test_constructor_rejects_bad_token_lists(tokens, message):
    with pytest.raises(ValueError, match=message):
        WordPieceVocabulary(tokens)


def test_decode_rejects_an_unknown_id(vocab):
    with pytest.raises(ValueError, match=f"id {len(vocab)} is outside"):
        vocab.decode([3, len(vocab)])


def test_fast_tokenizer_used_and_fallback_gives_the_same_ids(vocab, monkeypatch):
    import tensorflow_text

    lines = CORPUS + ["the 日本 quixotic marketed " + "x" * 120]
    fast_ids = vocab.encode_lines(lines)
    assert vocab.tokenizer_name == "FastWordpieceTokenizer"

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(tensorflow_text, "FastWordpieceTokenizer", broken)
    fresh = WordPieceVocabulary(vocab.tokens)
    with pytest.warns(UserWarning, match="simulated failure"):
        slow_ids = fresh.encode_lines(lines)
    assert fresh.tokenizer_name == "WordpieceTokenizer"
    assert slow_ids == fast_ids


# ---------------------------------------------------------------------------
# files in the run directory


def test_save_load_round_trip(tmp_path, vocab):
    run_dir = tmp_path / "run"
    path = vocab.save(str(run_dir))
    assert path == str(run_dir / "wordpiece.txt")
    assert (run_dir / "wordpiece.txt").read_text(encoding="utf-8").split("\n") == [
        *vocab.tokens, ""
    ]
    loaded = WordPieceVocabulary.load(str(run_dir))
    assert loaded == vocab and len(loaded) == len(vocab)
    assert WordPieceVocabulary.load(path) == vocab  # the file itself also works
    assert loaded.encode_lines(CORPUS[:20]) == vocab.encode_lines(CORPUS[:20])
    assert RunDir(str(run_dir)).load_vocabulary() == vocab


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "wordpiece.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        WordPieceVocabulary.load(str(tmp_path))
    missing.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{missing}: a vocabulary must start")):
        WordPieceVocabulary.load(str(tmp_path))
    missing.write_bytes(b"<pad>\n<unk>\n<eos>\ncaf\xe9\n")
    with pytest.raises(ValueError, match=re.escape(f"{missing}: not valid UTF-8")):
        WordPieceVocabulary.load(str(tmp_path))


# ---------------------------------------------------------------------------
# lm_data: WordVocabulary's line interface, load_vocabulary, size check


def test_word_vocabulary_line_interface():
    words = WordVocabulary(SPECIALS + ["the", "cat", "sat"])
    assert words.encode_line("  the cat\tsat dog ") == [3, 4, 5, 1, 2]
    assert words.encode_lines(["the cat", "", "sat"]) == [[3, 4, 2], [2], [5, 2]]
    assert words.words_in("the cat sat dog") == 5
    assert words.decode([3, 4, 2, 0, 5, 1, 2]) == "the cat\nsat <unk>"


def test_both_vocabularies_answer_the_same_calls(vocab):
    words = WordVocabulary.build([line.split() for line in CORPUS], max_size=1000)
    for v in (words, vocab):
        ids = v.encode_lines(CORPUS[:5])
        assert [v.decode(i) for i in ids] == CORPUS[:5]
        word_counts = [len(line.split()) + 1 for line in CORPUS[:5]]
        assert [v.words_in(line) for line in CORPUS[:5]] == word_counts
        assert v.encode_line(CORPUS[0]) == ids[0]


def test_word_vocabulary_save_to_and_load_vocabulary(tmp_path):
    words = WordVocabulary(SPECIALS + ["Größe", "é"])
    path = words.save_to(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "vocab.json")
    loaded = RunDir(str(tmp_path / "run")).load_vocabulary()
    assert isinstance(loaded, WordVocabulary) and loaded == words


def test_word_vocabulary_load_errors_name_the_file(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a vocabulary file")):
        WordVocabulary.load(str(path))
    path.write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: a vocabulary must start")):
        WordVocabulary.load(str(path))


def test_load_vocabulary_needs_exactly_one_file(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no vocabulary in {tmp_path}")):
        RunDir(str(tmp_path)).load_vocabulary()
    vocab.save(str(tmp_path))
    WordVocabulary(SPECIALS).save_to(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: holds both")):
        RunDir(str(tmp_path)).load_vocabulary()


def test_check_vocabulary_matches(vocab):
    assert check_vocabulary_matches(vocab, len(vocab), "run") is vocab
    expected = (
        f"run/wordpiece.txt: the vocabulary has {len(vocab)} entries "
        "but the model expects 5000"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_vocabulary_matches(vocab, 5000, "run/wordpiece.txt")
    with pytest.raises(ValueError, match="has 3 entries but the model expects 4"):
        check_vocabulary_matches(WordVocabulary(SPECIALS), 4, "vocab.json")


# ---------------------------------------------------------------------------
# the shared PTB corpus


def test_shared_ptb_valid_round_trips():
    path = require_shared_data("ptb", "ptb.valid.txt")
    lines = list(lm_corpora.iter_lines(str(path), "ptb"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast tokenizer must build
        vocab = WordPieceVocabulary.learn(lines, vocab_size=1000)
        encoded = vocab.encode_lines(lines)
    assert vocab.tokenizer_name == "FastWordpieceTokenizer"
    assert 950 <= len(vocab) <= 1000
    assert [vocab.decode(ids) for ids in encoded] == [" ".join(line.split()) for line in lines]
    # Sub-words: more tokens than the 73,760 words (<eos> included), same word count.
    assert sum(map(len, encoded)) > 73760
    assert sum(map(vocab.words_in, lines)) == 73760
