"""Tests of keras_moe.pipelines.data.lm_corpora: file specs, formats, streaming, bad input.

Every corpus is written by the test into tmp_path, with hand-written expected
lines; the shared PTB and WikiText files are checked against the counts in
their READMEs (`wc`). The TFDS test prepares an `lm1b` dataset locally from
a 1B Word layout written here: nothing is downloaded.
"""

import gzip
import os
import re

import pytest

from keras_moe.pipelines.data import lm_corpora
from keras_moe.pipelines.data.lm_corpora import count_words, iter_lines, resolve_files
from tests.conftest import require_shared_data


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_gz(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------------------
# resolve_files


def test_resolve_file(tmp_path):
    path = write(tmp_path / "a.txt", "x\n")
    assert resolve_files(str(path)) == [str(path)]
    assert resolve_files(path) == [str(path)]  # os.PathLike too


def test_resolve_directory_sorted_regular_visible_files(tmp_path):
    for name in ["b.txt", "a.txt.gz", "c", ".hidden", "sub/d.txt"]:
        write(tmp_path / name, "x\n")
    expected = [str(tmp_path / n) for n in ["a.txt.gz", "b.txt", "c"]]
    assert resolve_files(str(tmp_path)) == expected


def test_resolve_glob_sorted_files_only(tmp_path):
    for name in ["part-2.txt", "part-10.txt", "part-1.txt", "other.txt"]:
        write(tmp_path / name, "x\n")
    (tmp_path / "part-dir.txt").mkdir()  # a directory matching the pattern is no file
    expected = [str(tmp_path / n) for n in ["part-1.txt", "part-10.txt", "part-2.txt"]]
    assert resolve_files(str(tmp_path / "part-*.txt")) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.txt", "corpus file not found"),
        ("nothing-*.txt", "no corpus file matches"),
        ("empty_dir", "holds no file"),
    ],
)
def test_resolve_errors_name_the_spec(tmp_path, spec, message):
    (tmp_path / "empty_dir").mkdir()
    write(tmp_path / "empty_dir" / ".hidden", "x\n")
    spec = str(tmp_path / spec)
    with pytest.raises(FileNotFoundError, match=message) as info:
        resolve_files(spec)
    assert spec in str(info.value)


# ---------------------------------------------------------------------------
# count_words


@pytest.mark.parametrize(
    "line, expected",
    [("the cat sat .", 5), ("", 1), ("  a\tb  ", 3), ("<unk> 's N", 4), ("= Title =", 4)],
)
def test_count_words_counts_end_of_sentence(line, expected):
    assert count_words(line) == expected


# ---------------------------------------------------------------------------
# plain text


def test_text_strips_and_drops_blank_lines(tmp_path):
    path = write(tmp_path / "t.txt", "  first line \n\n \t\nsecond\tline\t\n\nthird\n")
    lines = iter_lines(str(path))
    assert not isinstance(lines, list)  # a generator, not a loaded list
    assert list(lines) == ["first line", "second\tline", "third"]


def test_text_directory_glob_and_gz_in_order(tmp_path):
    write(tmp_path / "corpus" / "b.txt", "b one\nb two\n")
    write_gz(tmp_path / "corpus" / "a.txt.gz", "a one é\n\na two\n".encode())
    write(tmp_path / "corpus" / "c.txt", "c one\n")
    expected = ["a one é", "a two", "b one", "b two", "c one"]
    assert list(iter_lines(str(tmp_path / "corpus"))) == expected
    assert list(iter_lines(str(tmp_path / "corpus" / "*.txt"))) == ["b one", "b two", "c one"]
    assert list(iter_lines(tmp_path / "corpus" / "a.txt.gz")) == ["a one é", "a two"]


def test_unknown_format_names_it(tmp_path):
    path = write(tmp_path / "t.txt", "x\n")
    with pytest.raises(ValueError, match="'conll'"):
        iter_lines(str(path), "conll")


# ---------------------------------------------------------------------------
# PTB and WikiText

PTB_VALID = (
    " consumers may want to move their telephones a little closer to the tv set \n"
    " <unk> <unk> watching abc 's monday night football can now vote \n"
    " the company said N years ago \n"
)
PTB_VALID_LINES = [
    "consumers may want to move their telephones a little closer to the tv set",
    "<unk> <unk> watching abc 's monday night football can now vote",
    "the company said N years ago",
]


def test_ptb_file_and_directory_split(tmp_path):
    write(tmp_path / "ptb" / "ptb.train.txt", " aer banknote berlitz \n")
    path = write(tmp_path / "ptb" / "ptb.valid.txt", PTB_VALID)
    assert list(iter_lines(str(path), "ptb")) == PTB_VALID_LINES
    # A directory means the split's file, never all files of the folder.
    assert list(iter_lines(str(tmp_path / "ptb"), "ptb", "valid")) == PTB_VALID_LINES
    assert list(iter_lines(str(tmp_path / "ptb"), "ptb")) == ["aer banknote berlitz"]
    # 14 + 11 + 6 words, plus one end of sentence per line.
    assert sum(map(count_words, iter_lines(str(path), "ptb"))) == 31 + 3
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "ptb" / "ptb.test.txt"))):
        iter_lines(str(tmp_path / "ptb"), "ptb", "test")


WIKITEXT = (
    " \n"
    " = Homarus gammarus = \n"
    " \n"
    " Homarus gammarus , known as the European lobster , is a species . \n"
    " \n"
    " = = Description = = \n"
    " \n"
    " It may grow to a length of 60 @-@ 70 cm . \n"
)


def test_wikitext_keeps_headings_and_blank_lines(tmp_path):
    path = write(tmp_path / "wiki.valid.tokens", WIKITEXT)
    expected = [
        "",
        "= Homarus gammarus =",
        "",
        "Homarus gammarus , known as the European lobster , is a species .",
        "",
        "= = Description = =",
        "",
        "It may grow to a length of 60 @-@ 70 cm .",
    ]
    lines = list(iter_lines(str(path), "wikitext"))
    assert lines == expected
    # WikiText's published counts: every line, blank ones too, adds one
    # token. Words: 4 + 13 + 5 + 12 = 34, lines: 8.
    assert sum(map(count_words, lines)) == 34 + 8
    assert list(iter_lines(str(path), "wikitext", blank_lines=False)) == [
        line for line in expected if line
    ]
    assert list(iter_lines(str(tmp_path), "wikitext", "valid")) == expected


def test_wikitext_directory_raw_files(tmp_path):
    write(tmp_path / "wiki.test.raw", " = Raw = \n \n Raw text, untokenized.\n")
    assert list(iter_lines(str(tmp_path), "wikitext", "test")) == [
        "= Raw =", "", "Raw text, untokenized."
    ]
    with pytest.raises(FileNotFoundError, match="wiki.train.tokens or .*wiki.train.raw"):
        iter_lines(str(tmp_path), "wikitext", "train")


# ---------------------------------------------------------------------------
# One Billion Word layout

TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
SHARDS = {
    "news.en-00001-of-00100": "The U.S. dollar rose .\nShares fell 2 % on Monday .\n",
    "news.en-00002-of-00100": "He said he would stay .\n",
    "news.en-00099-of-00100": "Last shard .\n",
}
HELDOUT = {
    "news.en.heldout-00000-of-00050": "Test sentence one .\nTest sentence two .\n",
    "news.en.heldout-00001-of-00050": "Valid sentence .\n",
    "news.en.heldout-00049-of-00050": "Another heldout sentence .\n",
}


def write_one_billion_word(root, decoys=True):
    for name, text in SHARDS.items():
        write(root / TRAIN_DIR / name, text)
    for name, text in HELDOUT.items():
        write(root / HELDOUT_DIR / name, text)
    if decoys:
        # Neither matches the benchmark's names: both must be left out.
        write(root / TRAIN_DIR / "news.en-00003-of-00100.bak", "backup\n")
        write(root / HELDOUT_DIR / "README", "readme\n")
    return root


def test_one_billion_word_files_per_split(tmp_path):
    root = write_one_billion_word(tmp_path)
    files = lm_corpora.one_billion_word_files
    assert files(str(root), "train") == [str(root / TRAIN_DIR / n) for n in sorted(SHARDS)]
    assert files(str(root), "heldout") == [str(root / HELDOUT_DIR / n) for n in sorted(HELDOUT)]
    assert files(root, "test") == [str(root / HELDOUT_DIR / "news.en.heldout-00000-of-00050")]
    assert files(root, "valid") == [str(root / HELDOUT_DIR / "news.en.heldout-00001-of-00050")]


def test_one_billion_word_root_may_be_the_archive_parent(tmp_path):
    write_one_billion_word(tmp_path / lm_corpora.ONE_BILLION_WORD_TOP)
    assert list(iter_lines(str(tmp_path), "1b", "test")) == [
        "Test sentence one .", "Test sentence two ."
    ]


def test_one_billion_word_lines(tmp_path):
    root = str(write_one_billion_word(tmp_path))
    assert list(iter_lines(root, "1b")) == [
        "The U.S. dollar rose .", "Shares fell 2 % on Monday .", "He said he would stay .",
        "Last shard .",
    ]
    assert list(iter_lines(root, "1b", "valid")) == ["Valid sentence ."]


def test_one_billion_word_errors_name_what_is_missing(tmp_path):
    files = lm_corpora.one_billion_word_files
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / TRAIN_DIR))):
        files(str(tmp_path), "train")
    write(tmp_path / HELDOUT_DIR / "news.en.heldout-00000-of-00050", "t\n")
    expected = str(tmp_path / HELDOUT_DIR / "news.en.heldout-00001-of-00050")
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        files(str(tmp_path), "valid")
    (tmp_path / TRAIN_DIR).mkdir()
    with pytest.raises(FileNotFoundError, match=r"no 1B Word train file .*" + TRAIN_DIR):
        files(str(tmp_path), "train")
    with pytest.raises(ValueError, match="'dev'"):
        files(str(tmp_path), "dev")


# ---------------------------------------------------------------------------
# bad input


def test_missing_file_fails_at_the_call_not_at_iteration(tmp_path):
    spec = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(spec)):
        iter_lines(spec)


@pytest.mark.parametrize("content", ["", "\n\n", "  \n\t\n \n"])
@pytest.mark.parametrize("format", ["text", "ptb", "wikitext"])
def test_empty_corpus_names_the_file(tmp_path, content, format):
    path = write(tmp_path / "empty.txt", content)
    lines = iter_lines(str(path), format)
    with pytest.raises(ValueError, match="empty") as info:
        list(lines)
    assert str(path) in str(info.value)


def test_empty_corpus_of_several_files_names_the_spec(tmp_path):
    write(tmp_path / "a.txt", "\n")
    write_gz(tmp_path / "b.txt.gz", b" \n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} (2 files)")):
        list(iter_lines(str(tmp_path)))


def test_one_empty_file_among_others_is_fine(tmp_path):
    write(tmp_path / "a.txt", "\n")
    write(tmp_path / "b.txt", "b\n")
    assert list(iter_lines(str(tmp_path))) == ["b"]


def test_bad_utf8_names_file_and_physical_line(tmp_path):
    write(tmp_path / "a.txt", "fine\n")
    path = tmp_path / "b.txt"
    path.write_bytes(b"good\n\ncaf\xe9 au lait\nlast\n")  # Latin-1 on line 3
    lines = iter_lines(str(tmp_path))
    assert next(lines) == "fine" and next(lines) == "good"
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not valid UTF-8")):
        next(lines)


def test_byte_order_mark_is_not_a_word(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffthe cat\r\nsat\n".encode("utf-8"))
    assert list(iter_lines(str(path))) == ["the cat", "sat"]


def test_bad_utf8_in_gz_names_file_and_line(tmp_path):
    path = write_gz(tmp_path / "bad.txt.gz", b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid UTF-8")):
        list(iter_lines(str(path)))


def test_gz_name_on_plain_text_names_the_file(tmp_path):
    path = write(tmp_path / "plain.txt.gz", "not compressed\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a valid gzip file")):
        list(iter_lines(str(path)))


def test_truncated_gz_names_the_file(tmp_path):
    data = gzip.compress(("a sentence .\n" * 1000).encode())
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a valid gzip file")):
        list(iter_lines(str(path)))


# ---------------------------------------------------------------------------
# streaming


# `opened_files`: tests/conftest.py


def test_streaming_reads_a_buffer_not_the_file(tmp_path, opened_files):
    n = 100_000
    path = tmp_path / "big.txt"
    body = b"the quick brown fox jumps over the lazy dog .\n" * n
    path.write_bytes(b"first line\n" + body + b"caf\xe9\n")
    assert os.path.getsize(path) > 4_000_000
    lines = iter_lines(str(path))
    assert opened_files == []  # nothing is opened before iteration
    assert next(lines) == "first line"
    (_, f), = opened_files
    # The operating-system position of the file: one read buffer, not 4 MB.
    assert f.raw.tell() < 100_000
    # The bad byte of the last line is met only when that line is reached.
    for _ in range(n):
        assert next(lines) == "the quick brown fox jumps over the lazy dog ."
    with pytest.raises(ValueError, match=re.escape(f"{path}:{n + 2}:")):
        next(lines)


def test_streaming_opens_one_file_at_a_time(tmp_path, opened_files):
    write(tmp_path / "a.txt", "a1\na2\n")
    write(tmp_path / "b.txt", "b1\n")
    lines = iter_lines(str(tmp_path))
    assert next(lines) == "a1"
    assert [os.path.basename(p) for p, _ in opened_files] == ["a.txt"]
    assert next(lines) == "a2" and next(lines) == "b1"
    assert [os.path.basename(p) for p, _ in opened_files] == ["a.txt", "b.txt"]
    assert opened_files[0][1].closed  # closed before the next file was read
    assert list(lines) == []


# ---------------------------------------------------------------------------
# shared corpora (counts from their READMEs: `wc -l` and `wc -w`)


def test_shared_ptb_valid_counts():
    path = require_shared_data("ptb", "ptb.valid.txt")
    lines = list(iter_lines(str(path), "ptb"))
    assert len(lines) == 3370
    assert sum(map(count_words, lines)) == 70390 + 3370
    assert list(iter_lines(str(path.parent), "ptb", "valid")) == lines


def test_shared_wikitext2_valid_matches_the_published_token_count():
    path = require_shared_data("wikitext2", "wiki.valid.tokens")
    lines = list(iter_lines(str(path), "wikitext"))
    assert len(lines) == 3760
    # 213,886 words + 3,760 end-of-line tokens = 217,646, WikiText-2's valid count.
    assert sum(map(count_words, lines)) == 217646
    kept = list(iter_lines(str(path), "wikitext", blank_lines=False))
    assert len(kept) == 3760 - 1299  # `grep -c '^\s*$'` counts 1,299 blank lines
    assert kept[0] == "= Homarus gammarus ="


# ---------------------------------------------------------------------------
# TFDS


def test_tfds_without_the_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        iter_lines("lm1b", "tfds")


def import_tfds():
    # CI installs tensorflow-datasets (the [test] extra); a user without it skips.
    if os.environ.get("CI", "").lower() == "true":
        import tensorflow_datasets

        return tensorflow_datasets
    return pytest.importorskip(
        "tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install it)"
    )


@pytest.fixture(scope="module")
def lm1b_data_dir(tmp_path_factory):
    """An `lm1b` prepared from a local 1B Word layout by TFDS's own lm1b code."""
    tfds = import_tfds()
    from tensorflow_datasets.datasets.lm1b import lm1b_dataset_builder as real

    parent = tmp_path_factory.mktemp("1b")
    # No decoy files: TFDS's own lm1b code globs `news.en-*` and would read them.
    write_one_billion_word(parent / lm_corpora.ONE_BILLION_WORD_TOP, decoys=False)
    data_dir = tmp_path_factory.mktemp("tfds")

    class LocalLm1b(tfds.builder_cls("lm1b"), skip_registration=True):
        """The registered builder, reading the local layout instead of downloading."""

        name = "lm1b"

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download: the files are local
            return [
                tfds.core.SplitGenerator(
                    name="train", gen_kwargs={"files": real._train_data_filenames(str(parent))}
                ),
                tfds.core.SplitGenerator(
                    name="test", gen_kwargs={"files": real._test_data_filenames(str(parent))}
                ),
            ]

    tfds.disable_progress_bar()
    LocalLm1b(data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir)


def lines_of(texts):
    return [line for text in texts for line in text.splitlines()]


def test_tfds_lm1b_reads_prepared_data(lm1b_data_dir):
    train = list(iter_lines("lm1b", "tfds", data_dir=lm1b_data_dir))
    # TFDS orders examples by a hash of their keys: compare as multisets.
    assert sorted(train) == sorted(lines_of(SHARDS.values()))
    # TFDS's lm1b test split is all 50 held-out files (not only 00000).
    test = list(iter_lines("lm1b:test", "tfds", data_dir=lm1b_data_dir))
    assert sorted(test) == sorted(lines_of(HELDOUT.values()))
    assert list(iter_lines("lm1b", "tfds", "test", data_dir=lm1b_data_dir)) == test
    assert len(list(iter_lines("lm1b:train[:2]", "tfds", data_dir=lm1b_data_dir))) == 2


def test_tfds_errors(lm1b_data_dir, tmp_path):
    with pytest.raises(ValueError, match="'valid'.*'test', 'train'"):
        iter_lines("lm1b:valid", "tfds", data_dir=lm1b_data_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        iter_lines("lm1b", "tfds", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no_such_corpus"):
        iter_lines("no_such_corpus", "tfds", data_dir=str(tmp_path))
