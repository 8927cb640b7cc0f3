"""The compiled WordPiece learner: its vocabulary, applied by tensorflow-text, splits as `tokenizers` does."""

import io

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from keras_moe.pipelines.data.wordpiece import RESERVED, WordPieceVocabulary
from keras_moe.pipelines.data.wordpiece_learner import learn_tokens

LINES = [
    "the cat sat on the mat .",
    "the cats sat on the mats , said the <unk> .",
    "u.s. officials said the cat 's mat was flat",
    "a flat cat is a happy cat ; mats are not",
] * 30


def hf_ids(tokens, line):
    """The ids HuggingFace's own WordPiece model gives `line` with the same tokens."""
    tokenizer = Tokenizer(models.WordPiece(
        vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>",
        max_input_chars_per_word=100))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer.encode(line).ids


@pytest.fixture(scope="module")
def tokens():
    return learn_tokens(LINES, 60, RESERVED, progress=None)


def test_reserved_tokens_first_then_alphabet_and_pieces(tokens):
    assert tokens[:3] == ["<pad>", "<unk>", "<eos>"]
    # The rest in a canonical order: the same file from every run.
    assert tokens[3:] == sorted(tokens[3:])
    assert learn_tokens(LINES, 60, RESERVED, progress=None) == tokens
    assert len(tokens) <= 60 and len(set(tokens)) == len(tokens)
    words = {w for line in LINES for w in line.split()}
    # Each character where it occurs: first in a word alone, later as "##c". So
    # no training word becomes <unk>.
    for c in {w[0] for w in words}:
        assert c in tokens
    for c in {c for w in words for c in w[1:]}:
        assert "##" + c in tokens
    # Merges were learned: whole frequent words exist beyond the characters.
    assert "the" in tokens and "cat" in tokens


def test_tensorflow_text_applies_it_as_tokenizers_does(tokens):
    vocab = WordPieceVocabulary(tokens)
    for line in LINES[:4] + ["catsat flatmats u.s.a. <unk>", "the zebra"]:
        ids = vocab.encode_line(line)
        assert ids[-1] == 2  # <eos>
        assert ids[:-1] == hf_ids(tokens, line), line
    # A training line decodes back to itself; a word with a character never seen is <unk>.
    assert vocab.decode(vocab.encode_line(LINES[1])) == LINES[1]
    assert vocab.encode_line("zebra") == [1, 2]


def test_saved_file_is_the_existing_format(tokens, tmp_path):
    vocab = WordPieceVocabulary(tokens)
    vocab.save(str(tmp_path))
    assert WordPieceVocabulary.load(str(tmp_path)) == vocab
    assert (tmp_path / "wordpiece.txt").read_text(encoding="utf-8").split("\n")[:3] == list(RESERVED)


def test_reads_at_most_max_lines_lazily_and_shows_progress():
    read = []

    def lines():
        for i, line in enumerate(LINES * 100):
            read.append(i)
            yield line

    stream = io.StringIO()
    learn_tokens(lines(), 40, RESERVED, max_lines=25_000, progress=stream, progress_every=0.0)
    # 12,000 lines exist; the iterator was read to its end, and no further than max_lines.
    assert len(read) == 12_000
    out = stream.getvalue().splitlines()
    assert out[0].startswith("vocabulary: read 10,000 lines")
    assert out[-1].startswith("vocabulary: ") and "from 12,000 lines" in out[-1]
    read.clear()
    learn_tokens(lines(), 40, RESERVED, max_lines=500, progress=None)
    assert len(read) == 500


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 3}, "vocab_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"max_lines": 0}, "max_lines"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"vocab_size": 50, **kwargs}
    with pytest.raises(ValueError, match=match):
        learn_tokens(LINES, reserved=RESERVED, progress=None, **args)


def test_no_word_is_an_error():
    with pytest.raises(ValueError, match="no word"):
        learn_tokens(["", "   "], 50, RESERVED, progress=None)


def test_wordpiece_vocabulary_learns_with_either_learner():
    compiled = WordPieceVocabulary.learn(LINES, 60, learner="tokenizers", progress=None)
    assert compiled.tokens == learn_tokens(LINES, 60, RESERVED, progress=None)
    python = WordPieceVocabulary.learn(LINES, 60)  # the default: TensorFlow Text's learner
    assert python.tokens[:3] == list(RESERVED) and len(python) <= 60
    with pytest.raises(ValueError, match="learner"):
        WordPieceVocabulary.learn(LINES, 60, learner="sentencepiece")


def test_config_key_chooses_the_learner_and_refuses_others():
    from keras_moe.pipelines.lm.config import DataConfig
    from keras_moe.pipelines.translate.config import DataConfig as PairsConfig

    assert DataConfig(vocab_learner="tokenizers").vocab_learner == "tokenizers"
    assert PairsConfig().vocab_learner == "tensorflow_text"
    for make in (DataConfig, PairsConfig):
        with pytest.raises(ValueError, match="vocab_learner"):
            make(vocab_learner="bpe")


def test_the_lm_pipeline_learns_its_vocabulary_with_the_chosen_learner(tmp_path):
    from keras_moe.pipelines.config import load_config
    from keras_moe.pipelines.lm import train as lm_train
    from keras_moe.pipelines.lm.config import LMConfig

    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    config = load_config(LMConfig, None, [
        f"data.train={corpus}", f"data.valid={corpus}", "data.vocabulary=wordpiece",
        "data.vocab_size=60", "data.vocab_learner=tokenizers"])
    vocab = lm_train.build_vocabulary(config, None)
    assert vocab.tokens == learn_tokens(LINES, 60, RESERVED, progress=None)
