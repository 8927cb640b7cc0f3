"""Tests of keras_moe.pipelines.data.parallel_corpora: readers, specs, cleaning, TFDS.

Every corpus is written by the test into tmp_path with hand-written
contents, so each expected pair, line number and count is known. The TFDS
tests prepare small translation datasets locally, with TFDS's own writing
and reading code: nothing is downloaded.
"""

import gzip
import os
import re
import socket
import sys

import pytest

from keras_moe.pipelines.data import parallel_corpora
from keras_moe.pipelines.data.parallel_corpora import (
    CleaningCounts,
    ParallelDataError,
    clean_pairs,
    iter_pairs,
    read_parallel_files,
    read_parallel_sgm,
    read_sgm,
    read_tsv,
    tfds_pairs,
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def write_gz(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def raises(error, *parts):
    """pytest.raises whose message must contain every part, literally."""
    return pytest.raises(error, match="(?s)" + ".*".join(re.escape(str(p)) for p in parts))


# ---------------------------------------------------------------------------
# aligned text files


def test_parallel_files_strip_keep_blank_lines_and_align(tmp_path):
    # A UTF-8 byte order mark, CRLF endings, a blank line on one side only,
    # and a Unicode line separator that must not split a sentence.
    source = write(tmp_path / "train.en", "\ufeff Hello world .\r\n\nA\u2028B\n  last  ")
    target = write(tmp_path / "train.de", "Hallo Welt .\r\nNur hier .\n \t \nzuletzt\n")
    pairs = read_parallel_files(str(source), target)  # os.PathLike too
    assert not isinstance(pairs, list)  # a generator, not a loaded list
    assert list(pairs) == [
        ("Hello world .", "Hallo Welt ."),
        ("", "Nur hier ."),
        ("A\u2028B", ""),
        ("last", "zuletzt"),
    ]


def test_parallel_files_gz_on_either_side(tmp_path):
    source = write_gz(tmp_path / "a.en.gz", b"Good morning .\nThank you .\n")
    target = write(tmp_path / "a.fr", "Bonjour .\nMerci .\n")
    assert list(read_parallel_files(source, target)) == [
        ("Good morning .", "Bonjour ."),
        ("Thank you .", "Merci ."),
    ]
    assert list(read_parallel_files(target, source))[1] == ("Merci .", "Thank you .")


def test_parallel_files_missing_file_fails_at_the_call(tmp_path):
    present = write(tmp_path / "train.en", "x\n")
    missing = tmp_path / "train.de"
    with raises(FileNotFoundError, missing):
        read_parallel_files(present, missing)
    with raises(FileNotFoundError, missing):
        read_parallel_files(missing, present)


def test_longer_source_names_both_files_and_counts(tmp_path):
    source = write(tmp_path / "train.en", "one\ntwo\nthree\n")
    target = write(tmp_path / "train.de", "eins\nzwei\n")
    pairs = read_parallel_files(source, target)
    # The aligned pairs stream out; the mismatch is met where the target ends.
    assert next(pairs) == ("one", "eins") and next(pairs) == ("two", "zwei")
    with raises(ParallelDataError, f"{source} has 3 lines but {target} has 2 lines"):
        next(pairs)


def test_longer_target_is_counted_to_its_end(tmp_path):
    source = write(tmp_path / "train.en", "one\n\n")  # a blank line is a line
    target = write_gz(tmp_path / "train.de.gz", b"eins\n\ndrei\nvier\n\n")
    with raises(ParallelDataError, f"{source} has 2 lines but {target} has 5 lines"):
        list(read_parallel_files(source, target))
    with raises(ParallelDataError, f"{target} has 5 lines but {source} has 2 lines"):
        list(read_parallel_files(target, source))


def test_one_line_is_singular_and_empty_file_has_zero(tmp_path):
    source = write(tmp_path / "s.txt", "only\n")
    target = write(tmp_path / "t.txt", "")
    with raises(ParallelDataError, f"{source} has 1 line but {target} has 0 lines"):
        list(read_parallel_files(source, target))


def test_bad_utf8_names_file_and_line(tmp_path):
    source = write(tmp_path / "s.txt", "a\nb\nc\n")
    target = tmp_path / "t.txt"
    target.write_bytes(b"x\ncaf\xe9\nz\n")  # Latin-1 on line 2
    pairs = read_parallel_files(source, target)
    assert next(pairs) == ("a", "x")
    with raises(ParallelDataError, f"{target}:2: not valid UTF-8"):
        next(pairs)
    gz = write_gz(tmp_path / "bad.gz", b"ok\n\xff\xfe\nok\n")
    with raises(ParallelDataError, f"{gz}:2: not valid UTF-8"):
        list(read_parallel_files(gz, source))


def test_gz_name_on_plain_text_names_the_file(tmp_path):
    source = write(tmp_path / "s.txt", "a\n")
    fake = write(tmp_path / "t.txt.gz", "not compressed\n")
    with raises(ParallelDataError, f"{fake}: not a valid gzip file"):
        list(read_parallel_files(source, fake))


def test_parallel_files_stream(tmp_path, opened_files):
    n = 50_000
    line = b"the quick brown fox jumps over the lazy dog .\n"
    write(tmp_path / "s.txt", "").write_bytes(line * n)
    write(tmp_path / "t.txt", "").write_bytes(line * n)
    pairs = read_parallel_files(tmp_path / "s.txt", tmp_path / "t.txt")
    assert opened_files == []  # nothing is opened before iteration
    next(pairs)
    assert os.path.getsize(tmp_path / "s.txt") > 2_000_000
    # Each file's operating-system position: one read buffer, not 2 MB.
    assert [f.raw.tell() < 100_000 for _, f in opened_files] == [True, True]
    assert sum(1 for _ in pairs) == n - 1
    assert all(f.closed for _, f in opened_files)


# ---------------------------------------------------------------------------
# TSV


def test_tsv_columns_are_split_on_tabs_and_stripped(tmp_path):
    path = write(
        tmp_path / "tatoeba.tsv",
        "1\t I am here. \t99\tIch bin hier.\n"
        "\n"  # blank row: ("", "") for clean_pairs to count
        "2\t\t98\tLeere Quelle.\n"
        '3\t"Quoted", he said.\t97\t"Zitiert", sagte er.\r\n',
    )
    assert list(read_tsv(path, source_column=1, target_column=3)) == [
        ("I am here.", "Ich bin hier."),
        ("", ""),
        ("", "Leere Quelle."),
        ('"Quoted", he said.', '"Zitiert", sagte er.'),
    ]
    assert next(read_tsv(path, 3, 1)) == ("Ich bin hier.", "I am here.")


def test_tsv_default_columns_and_gz(tmp_path):
    path = write_gz(tmp_path / "wikimatrix.tsv.gz", b"Yes .\tJa .\t0.93\nNo .\tNein .\t0.91\n")
    assert list(read_tsv(path)) == [("Yes .", "Ja ."), ("No .", "Nein .")]


def test_tsv_short_row_names_file_line_and_columns(tmp_path):
    path = write(tmp_path / "pairs.tsv", "a\tb\tc\nd\te\tf\ng\th\n")
    pairs = read_tsv(path, 0, 2)
    assert next(pairs) == ("a", "c") and next(pairs) == ("d", "f")
    with raises(ParallelDataError, f"{path}:3: found 2 tab-separated columns, need 3"):
        next(pairs)
    path = write(tmp_path / "one.tsv", "no tab here\n")
    with raises(ParallelDataError, f"{path}:1: found 1 tab-separated column, need 2"):
        list(read_tsv(path))
    with raises(FileNotFoundError, tmp_path / "nope.tsv"):
        read_tsv(tmp_path / "nope.tsv")


@pytest.mark.parametrize("name, value", [("source_column", -1), ("target_column", 1.0)])
def test_tsv_bad_column_names_the_argument(tmp_path, name, value):
    path = write(tmp_path / "p.tsv", "a\tb\n")
    with raises(ValueError, f"`{name}` must be an integer >= 0. Received: {name}={value!r}"):
        read_tsv(path, **{name: value})


# ---------------------------------------------------------------------------
# WMT SGML

SRC_SGM = """\
<srcset setid="newstest2014" srclang="any">
<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">
<seg id="1">Gutach: Increased safety for pedestrians</seg>
<seg id="2"> They are not even 100 metres apart &amp; still &quot;far&quot; </seg>
</doc>
<doc docid="1018-lenta" sysid="ref"><p><seg id="1">Fish &lt;3 chips</seg><seg
 id="2">It&#39;s &#x263A; &#8364;5 at AT&T</seg></p>
<SEG ID="3">spread
over lines</SEG>
</doc>
</srcset>
"""
SRC_SEGMENTS = [
    "Gutach: Increased safety for pedestrians",
    'They are not even 100 metres apart & still "far"',
    "Fish <3 chips",
    "It's \u263a \u20ac5 at AT&T",
    "spread\nover lines",
]
REF_SGM = """\
<refset setid="newstest2014" srclang="any" trglang="de">
<doc docid="1012-bbc" sysid="ref">
<seg id="1">Gutach: Noch mehr Sicherheit für Fußgänger</seg>
<seg id="2">Sie liegen nicht einmal 100 Meter voneinander entfernt</seg>
</doc>
<doc docid="1018-lenta" sysid="ref">
<seg id="1">Fisch &amp; Chips</seg>
<seg id="2">Es kostet 5 &#8364;</seg>
<seg id="3">über Zeilen</seg>
</doc>
</refset>
"""


def test_read_sgm_finds_segments_in_order_and_unescapes(tmp_path):
    path = write(tmp_path / "newstest2014-deen-src.en.sgm", SRC_SGM)
    assert read_sgm(path) == SRC_SEGMENTS
    assert read_sgm(write_gz(tmp_path / "src.en.sgm.gz", SRC_SGM.encode())) == SRC_SEGMENTS


def test_read_parallel_sgm(tmp_path):
    source = write(tmp_path / "src.en.sgm", SRC_SGM)
    target = write(tmp_path / "ref.de.sgm", REF_SGM)
    pairs = read_parallel_sgm(source, target)
    assert len(pairs) == 5
    assert pairs[0] == ("Gutach: Increased safety for pedestrians",
                        "Gutach: Noch mehr Sicherheit für Fußgänger")
    assert pairs[3] == ("It's \u263a \u20ac5 at AT&T", "Es kostet 5 \u20ac")


def test_sgm_errors_name_the_files(tmp_path):
    source = write(tmp_path / "src.en.sgm", SRC_SGM)
    short = write(tmp_path / "ref.de.sgm", REF_SGM.replace('<seg id="3">über Zeilen</seg>', ""))
    with raises(ParallelDataError, f"{source} has 5 segments but {short} has 4 segments"):
        read_parallel_sgm(source, short)
    empty = write(tmp_path / "plain.sgm", "<srcset>\n<doc docid='x'>\nno segments\n</doc>\n")
    with raises(ParallelDataError, f"{empty}: no <seg> element found"):
        read_sgm(empty)
    with raises(FileNotFoundError, tmp_path / "missing.sgm"):
        read_sgm(tmp_path / "missing.sgm")
    bad = tmp_path / "bad.sgm"
    bad.write_bytes(b'<srcset>\n<seg id="1">ok</seg>\n<seg id="2">caf\xe9</seg>\n')
    with raises(ParallelDataError, f"{bad}:3: not valid UTF-8"):
        read_sgm(bad)


# ---------------------------------------------------------------------------
# iter_pairs


def test_iter_pairs_concatenates_specs_in_order(tmp_path):
    write(tmp_path / "europarl.en", "Resumption of the session\n")
    write_gz(tmp_path / "europarl.de.gz", b"Wiederaufnahme der Sitzungsperiode\n")
    write(tmp_path / "tatoeba.tsv", "de\ten\nHallo .\tHello .\nTschüss .\tBye .\n")
    write(tmp_path / "src.en.sgm", SRC_SGM)
    write(tmp_path / "ref.de.sgm", REF_SGM)
    spec = [
        {"source": str(tmp_path / "europarl.en"), "target": str(tmp_path / "europarl.de.gz")},
        {"tsv": str(tmp_path / "tatoeba.tsv"), "source_column": 1, "target_column": 0},
        {"source": tmp_path / "src.en.sgm", "target": tmp_path / "ref.de.sgm"},
    ]
    pairs = list(iter_pairs(spec))
    assert pairs[:4] == [
        ("Resumption of the session", "Wiederaufnahme der Sitzungsperiode"),
        ("en", "de"),
        ("Hello .", "Hallo ."),
        ("Bye .", "Tschüss ."),
    ]
    assert pairs[4:] == read_parallel_sgm(tmp_path / "src.en.sgm", tmp_path / "ref.de.sgm")
    # One mapping alone is a spec too.
    assert list(iter_pairs(spec[1])) == pairs[1:4]


def test_iter_pairs_checks_every_spec_at_the_call(tmp_path):
    write(tmp_path / "a.en", "a\n")
    write(tmp_path / "a.de", "a\n")
    good = {"source": str(tmp_path / "a.en"), "target": str(tmp_path / "a.de")}
    missing = str(tmp_path / "nope.tsv")
    with raises(FileNotFoundError, missing):
        iter_pairs([good, {"tsv": missing}])
    write(tmp_path / "a.sgm", SRC_SGM)
    with raises(FileNotFoundError, tmp_path / "b.sgm"):
        iter_pairs([good, {"source": str(tmp_path / "a.sgm"), "target": str(tmp_path / "b.sgm")}])


@pytest.mark.parametrize(
    "mapping, parts",
    [
        ({"source": "a.en", "traget": "a.de"}, ["unknown key 'traget'", "'traget': 'a.de'"]),
        ({"source": "a.en"}, ["missing key 'target'", "{'source': 'a.en'}"]),
        ({"target": "a.de"}, ["missing key 'source'", "{'target': 'a.de'}"]),
        ({"tsv": "p.tsv", "column": 2}, ["unknown key 'column'", "'tsv': 'p.tsv'"]),
        ({"tsv": "p.tsv", "source": "a.en"}, ["unknown key 'tsv'", "'source': 'a.en'"]),
        (
            {"tfds": "wmt14_translate/de-en", "split": "test", "source_language": "en"},
            ["missing key 'target_language'", "'tfds': 'wmt14_translate/de-en'"],
        ),
        ({"path": "a.txt"}, ["missing key 'source' (with 'target'), 'tsv' or 'tfds'", "'path'"]),
        ({"source": "a.sgm", "target": "a.de"}, ["'a.sgm'", "mixes an .sgm file"]),
        ("a.en", ["must be a mapping", "'a.en'"]),
    ],
)
def test_iter_pairs_bad_spec_names_key_and_mapping(mapping, parts):
    with raises(ParallelDataError, *parts):
        iter_pairs([mapping])


def test_iter_pairs_empty_list():
    with raises(ParallelDataError, "empty list"):
        iter_pairs([])


# ---------------------------------------------------------------------------
# cleaning

# (pair, reason) with max_length=4, max_ratio=2.0; word counts in comments.
CLEANING_CASES = [
    (("a  b\tc", " x  y "), "kept"),  # 3, 2 -> ratio 1.5
    (("", "x"), "empty"),
    (("   ", "\t"), "empty"),
    (("a b c d e f g", ""), "empty"),  # empty outranks too long
    (("a b c d e", "x y z w v"), "too_long"),  # 5 > 4 on both sides
    (("a", "v w x y z"), "too_long"),  # too long outranks the ratio 5
    (("a b c", "x"), "bad_ratio"),  # 3 / 1 = 3 > 2
    (("a", "x y z"), "bad_ratio"),
    (("a b", "w x y z"), "kept"),  # 4 / 2 = 2: the limit itself is kept
    (("a\u00a0b", "x y"), "kept"),  # no-break space is whitespace
]


def test_clean_pairs_counts_each_reason_once():
    counts = CleaningCounts()
    kept = clean_pairs([pair for pair, _ in CLEANING_CASES], counts, max_length=4, max_ratio=2.0)
    assert counts.read == 0  # nothing is read before iteration
    assert list(kept) == [("a b c", "x y"), ("a b", "w x y z"), ("a b", "x y")]
    assert counts == CleaningCounts(read=10, kept=3, empty=3, too_long=2, bad_ratio=2)
    expected = {reason: 0 for reason in ("kept", "empty", "too_long", "bad_ratio")}
    for _, reason in CLEANING_CASES:
        expected[reason] += 1
    assert dataclass_values(counts) == {"read": len(CLEANING_CASES), **expected}
    assert counts.summary() == (
        "read 10 pairs, kept 3 (30.0%), dropped 3 empty, 2 too long, 2 with a bad length ratio"
    )


def dataclass_values(counts):
    import dataclasses

    return dataclasses.asdict(counts)


def test_clean_pairs_limits_can_be_disabled_and_counts_accumulate():
    pairs = [pair for pair, _ in CLEANING_CASES]
    counts = CleaningCounts()
    assert len(list(clean_pairs(pairs, counts, max_length=None, max_ratio=2.0))) == 4
    assert (counts.too_long, counts.bad_ratio) == (0, 3)  # ("a", "v w x y z") is now bad_ratio
    assert len(list(clean_pairs(pairs, counts, max_length=4, max_ratio=None))) == 5
    assert counts == CleaningCounts(read=20, kept=9, empty=6, too_long=2, bad_ratio=3)
    # Defaults (250 words, ratio 3): the empty pairs and ("a", "v w x y z") go.
    assert len(list(clean_pairs(pairs))) == 6
    assert CleaningCounts().summary().startswith("read 0 pairs, kept 0 (-)")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_ratio": 0.5}, "`max_ratio` must be a number >= 1 (or None for no limit). "
                             "Received: max_ratio=0.5"),
        ({"max_ratio": "3"}, "Received: max_ratio='3'"),
        ({"max_ratio": float("nan")}, "Received: max_ratio=nan"),
        ({"max_length": 0}, "`max_length` must be an integer >= 1 (or None for no limit). "
                            "Received: max_length=0"),
        ({"max_length": 2.5}, "Received: max_length=2.5"),
        ({"max_length": True}, "Received: max_length=True"),
        ({"counts": {}}, "`counts` must be a CleaningCounts or None. Received: counts={}"),
    ],
)
def test_clean_pairs_bad_arguments_are_named_at_the_call(kwargs, message):
    with raises(ValueError, message):
        clean_pairs(iter([]), **kwargs)


# ---------------------------------------------------------------------------
# TFDS

WMT_PAIRS = {
    "train": [("Hallo Welt .", "Hello world ."), ("Danke .", "Thank you ."),
              ("Guten Morgen .", "Good morning ."), (" Ja . ", "Yes .")],
    "validation": [("Nein .", "No .")],
    "test": [("Vielleicht .", "Maybe ."), ("Fußgänger", "pedestrians")],
}


def import_tfds():
    # CI installs tensorflow-datasets (the [test] extra); a user without it skips.
    if os.environ.get("CI", "").lower() == "true":
        import tensorflow_datasets

        return tensorflow_datasets
    return pytest.importorskip(
        "tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install it)"
    )


@pytest.fixture(scope="module")
def no_network():
    """Any attempt to open a network connection fails the test."""

    def refuse(self, address):
        raise AssertionError(f"a TFDS test tried to connect to {address}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        yield


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory, no_network):
    """`wmt14_translate/de-en` and an unregistered `local_parallel`, prepared locally."""
    tfds = import_tfds()
    data_dir = str(tmp_path_factory.mktemp("tfds"))

    def split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the pairs are here
        return [
            tfds.core.SplitGenerator(name=name, gen_kwargs={"pairs": pairs})
            for name, pairs in WMT_PAIRS.items()
        ]

    def generate_examples(self, pairs):
        for key, (de, en) in enumerate(pairs):
            yield key, {"de": de, "en": en}

    class LocalWmt14(tfds.builder_cls("wmt14_translate"), skip_registration=True):
        """The registered WMT14 builder, writing the pairs above instead of downloading."""

        name = "wmt14_translate"
        _split_generators = split_generators
        _generate_examples = generate_examples

    class LocalParallel(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A translation dataset no registered code knows: read back from its files."""

        name = "local_parallel"
        VERSION = tfds.core.Version("1.0.0")
        _split_generators = split_generators
        _generate_examples = generate_examples

        def _info(self):
            features = tfds.features.Translation(languages=("de", "en"))
            return tfds.core.DatasetInfo(builder=self, features=features)

    tfds.disable_progress_bar()
    no_gcs = tfds.download.DownloadConfig(try_download_gcs=False)
    LocalWmt14(config="de-en", data_dir=data_dir).download_and_prepare(download_config=no_gcs)
    LocalParallel(data_dir=data_dir).download_and_prepare(download_config=no_gcs)
    return data_dir


def stripped(pairs, source="en"):
    if source == "de":
        return sorted((de.strip(), en.strip()) for de, en in pairs)
    return sorted((en.strip(), de.strip()) for de, en in pairs)


def test_tfds_pairs_reads_a_prepared_wmt_dataset(tfds_data_dir):
    name = "wmt14_translate/de-en"
    pairs = tfds_pairs(name, "train", "en", "de", data_dir=tfds_data_dir)
    assert not isinstance(pairs, list)
    # TFDS orders examples by a hash of their keys: compare as multisets.
    assert sorted(pairs) == stripped(WMT_PAIRS["train"])
    test = list(tfds_pairs(name, "test", "de", "en", data_dir=tfds_data_dir))
    assert sorted(test) == stripped(WMT_PAIRS["test"], source="de")
    both = list(tfds_pairs(name, "validation+test[:1]", "en", "de", data_dir=tfds_data_dir))
    assert len(both) == 2 and both[0] == ("No .", "Nein .")


def test_tfds_pairs_unregistered_name_and_directory(tfds_data_dir):
    expected = stripped(WMT_PAIRS["validation"])
    # Registered by no code here: found from its files in data_dir.
    assert list(tfds_pairs("local_parallel", "validation", "en", "de", tfds_data_dir)) == expected
    # A prepared dataset's directory stands for itself.
    directory = os.path.join(tfds_data_dir, "wmt14_translate", "de-en", "1.0.0")
    assert list(tfds_pairs(directory, "validation", "en", "de")) == expected


def test_iter_pairs_tfds_spec(tfds_data_dir, tmp_path):
    write(tmp_path / "a.en", "first\n")
    write(tmp_path / "a.de", "erste\n")
    spec = [
        {"source": str(tmp_path / "a.en"), "target": str(tmp_path / "a.de")},
        {"tfds": "wmt14_translate/de-en", "split": "validation", "source_language": "en",
         "target_language": "de", "data_dir": tfds_data_dir},
    ]
    assert list(iter_pairs(spec)) == [("first", "erste"), ("No .", "Nein .")]


def test_tfds_not_prepared_says_where_and_how(tfds_data_dir, tmp_path):
    with raises(ParallelDataError, "'wmt14_translate/de-en' is not prepared in", tmp_path,
                "never downloads", "tfds build wmt14_translate/de-en"):
        tfds_pairs("wmt14_translate/de-en", "train", "en", "de", data_dir=str(tmp_path))
    with raises(ParallelDataError, "'no_such_corpus' not found", f"data_dir={str(tmp_path)!r}"):
        tfds_pairs("no_such_corpus", "train", "en", "de", data_dir=str(tmp_path))
    with raises(ParallelDataError, f"{tmp_path} is a directory but not a prepared TFDS dataset"):
        tfds_pairs(str(tmp_path), "train", "en", "de")


def test_tfds_unknown_language_or_split_names_what_exists(tfds_data_dir):
    with raises(ParallelDataError, "no language 'fr'", "['de', 'en']"):
        tfds_pairs("wmt14_translate/de-en", "test", "en", "fr", data_dir=tfds_data_dir)
    with raises(ParallelDataError, "no split 'valid'", "['test', 'train', 'validation']"):
        tfds_pairs("wmt14_translate/de-en", "valid[:10]", "en", "de", data_dir=tfds_data_dir)


def test_tfds_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with raises(ImportError, "pip install tensorflow-datasets"):
        tfds_pairs("wmt14_translate/de-en", "test", "en", "de")


def test_read_sentences_keeps_blank_lines_and_reads_gz_and_sgm(tmp_path):
    import gzip

    plain = tmp_path / "a.en"
    plain.write_text("  one \n\ntwo\n", encoding="utf-8")
    packed = tmp_path / "a.en.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("one\n\ntwo\n")
    sgm = tmp_path / "a.sgm"
    sgm.write_text('<srcset><doc docid="d"><seg id="1">A &amp; B</seg>\n<seg id="2">C</seg>'
                   "</doc></srcset>\n", encoding="utf-8")
    assert parallel_corpora.read_sentences(str(plain)) == ["one", "", "two"]
    assert parallel_corpora.read_sentences(str(packed)) == ["one", "", "two"]
    assert parallel_corpora.read_sentences(str(sgm)) == ["A & B", "C"]
    with pytest.raises(FileNotFoundError, match="missing.en"):
        parallel_corpora.read_sentences(str(tmp_path / "missing.en"))
