"""Tests of keras_moe.pipelines.data.corpora: tokenizer, text files, gettext catalogues, splits.

Expected values are written out by hand. The gettext catalogues are GNU `.mo`
files that this module writes itself (`write_mo`), byte by byte from the
format description, so the tests never depend on the machine's locales.
"""

import gzip
import struct

import pytest

from keras_moe.pipelines.data import corpora

# ---------------------------------------------------------------------------
# tokenize


@pytest.mark.parametrize(
    "line, expected",
    [
        ("the cat sat", ["the", "cat", "sat"]),
        ("Hello, world!", ["Hello", ",", "world", "!"]),
        ("(yes)?", ["(", "yes", ")", "?"]),
        ("a well-known e-mail", ["a", "well-known", "e-mail"]),
        ("don't stop", ["don't", "stop"]),
        ("rock-'n'-roll", ["rock", "-", "'", "n", "'", "-", "roll"]),
        ("the <unk> sat on <unk>.", ["the", "<unk>", "sat", "on", "<unk>", "."]),
        ("3 files in 2024", ["3", "files", "in", "2024"]),
        ("Größe ändern", ["Größe", "ändern"]),
        ("  spaced\tout  ", ["spaced", "out"]),
        ("", []),
        ("--", ["-", "-"]),
    ],
)
def test_tokenize_hand_examples(line, expected):
    assert corpora.tokenize(line) == expected


# ---------------------------------------------------------------------------
# read_lines


def test_read_lines_drops_blank_lines_and_strips(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("first line\n\n   \n  second line  \n\t\nthird\n", encoding="utf-8")
    assert corpora.read_lines(str(path)) == ["first line", "second line", "third"]


def test_read_lines_keeps_non_ascii_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Grüße aus Köln\nnaïve café\n", encoding="utf-8")
    assert corpora.read_lines(str(path)) == ["Grüße aus Köln", "naïve café"]


def test_read_lines_reads_gzip(tmp_path):
    path = tmp_path / "text.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write("one two\n\nthree é\n".encode())
    assert corpora.read_lines(str(path)) == ["one two", "three é"]


def test_read_lines_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt") as info:
        corpora.read_lines(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n  \n"])
def test_read_lines_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="empty") as info:
        corpora.read_lines(str(path))
    assert str(path) in str(info.value)


def test_read_lines_bad_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    # Line 3 holds "café" encoded as Latin-1: 0xE9 followed by a newline is
    # not valid UTF-8. Line 2 is blank, so the count must be of physical lines.
    path.write_bytes(b"good line\n\ncaf\xe9\nlast\n")
    with pytest.raises(ValueError) as info:
        corpora.read_lines(str(path))
    assert f"{path}:3" in str(info.value)


def test_read_lines_bad_utf8_in_gzip_names_line(tmp_path):
    path = tmp_path / "bad.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError) as info:
        corpora.read_lines(str(path))
    assert f"{path}:2" in str(info.value)


def test_numbered_lines_keeps_text_and_counts_physical_lines(tmp_path):
    path = tmp_path / "text.txt"
    # A byte order mark, CRLF and LF endings, a blank line, inner and outer
    # spaces and U+2028 (a line separator to str.splitlines, not to a file),
    # and a last line without a newline.
    path.write_bytes("\ufeff a b \r\n\nc\u2028d\n  last".encode("utf-8"))
    assert list(corpora.numbered_lines(str(path))) == [
        (1, " a b "), (2, ""), (3, "c\u2028d"), (4, "  last"),
    ]


class _MyError(ValueError):
    pass


def test_numbered_lines_raises_the_given_error(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\n\xff\n")
    lines = corpora.numbered_lines(str(path), _MyError)
    assert next(lines) == (1, "ok")
    with pytest.raises(_MyError, match=f"{path}:2: not valid UTF-8"):
        next(lines)
    fake = tmp_path / "plain.txt.gz"
    fake.write_bytes(b"not compressed\n")
    with pytest.raises(_MyError, match=f"{fake}: not a valid gzip file"):
        list(corpora.numbered_lines(str(fake), _MyError))


def test_read_lines_drops_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffwort\r\nzwei\r\n".encode("utf-8"))
    assert corpora.read_lines(str(path)) == ["wort", "zwei"]


# ---------------------------------------------------------------------------
# gettext catalogues written by the test


MO_MAGIC = 0x950412DE
HEADER = "Content-Type: text/plain; charset=UTF-8\n"


def mo_bytes(messages, header=HEADER):
    """A GNU .mo catalogue (little-endian, revision 0, no hash table).

    `messages` maps msgid -> msgstr (str, or bytes to write raw). Plural
    entries are written as "singular\\0plural" -> "form0\\0form1".
    """
    entries = {b"": header.encode("utf-8")}
    for source, target in messages.items():
        key = source if isinstance(source, bytes) else source.encode("utf-8")
        value = target if isinstance(target, bytes) else target.encode("utf-8")
        entries[key] = value
    keys = sorted(entries)  # GNU tools keep the originals sorted
    n = len(keys)
    header_size = 7 * 4
    originals_offset = header_size
    translations_offset = originals_offset + 8 * n
    data_offset = translations_offset + 8 * n
    originals, translations, data = [], [], b""
    for key in keys:
        originals.append((len(key), data_offset + len(data)))
        data += key + b"\0"
    for key in keys:
        value = entries[key]
        translations.append((len(value), data_offset + len(data)))
        data += value + b"\0"
    out = struct.pack("<7I", MO_MAGIC, 0, n, originals_offset, translations_offset, 0, 0)
    for length, offset in originals + translations:
        out += struct.pack("<2I", length, offset)
    return out + data


def write_mo(root, language, domain, messages=None, raw=None):
    folder = root / language / "LC_MESSAGES"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{domain}.mo"
    path.write_bytes(raw if raw is not None else mo_bytes(messages))
    return path


def test_mo_writer_is_readable_by_python_gettext(tmp_path):
    # Guard for the helper itself: Python's own parser accepts what it writes.
    import gettext

    path = write_mo(tmp_path, "de", "guard", {"File": "Datei", "Größe": "Size-ü"})
    with open(path, "rb") as f:
        catalogue = gettext.GNUTranslations(f)
    assert catalogue.gettext("File") == "Datei"
    assert catalogue.gettext("Größe") == "Size-ü"
    assert catalogue.info()["content-type"] == "text/plain; charset=UTF-8"


@pytest.fixture
def locale_root(tmp_path):
    root = tmp_path / "locale"
    write_mo(root, "de", "alpha", {
        "Open file": "Datei öffnen",
        "Save": "Speichern",
        "Quit": "Beenden",
        "First line\nSecond   line\n\n": "Erste Zeile\nZweite Zeile\n",
        "Untranslated": "",
        "%d file\0%d files": "%d Datei\0%d Dateien",
    })
    # "Save" again with a different translation: the first catalogue in path
    # order (alpha < beta) wins, so runs are deterministic.
    write_mo(root, "de", "beta", {"Save": "Sichern", "About": "Über"})
    write_mo(root, "de", "corrupt", raw=b"this is not a catalogue at all, just bytes")
    # Another language must not leak in.
    write_mo(root, "fr", "alpha", {"Save": "Enregistrer", "Zebra": "Zèbre"})
    return root


def test_gettext_pairs_sorted_deduplicated_and_counts_skipped(locale_root):
    pairs, skipped = corpora.gettext_pairs("de", root=str(locale_root))
    assert pairs == [
        ("About", "Über"),
        ("First line\nSecond   line\n\n", "Erste Zeile\nZweite Zeile\n"),
        ("Open file", "Datei öffnen"),
        ("Quit", "Beenden"),
        ("Save", "Speichern"),
    ]
    assert skipped == 1


def test_gettext_pairs_other_language(locale_root):
    pairs, skipped = corpora.gettext_pairs("fr", root=str(locale_root))
    assert pairs == [("Save", "Enregistrer"), ("Zebra", "Zèbre")]
    assert skipped == 0


def test_gettext_pairs_missing_language_is_empty(locale_root):
    assert corpora.gettext_pairs("xx", root=str(locale_root)) == ([], 0)


def test_gettext_english_lines_splits_multiline_messages(locale_root):
    assert corpora.gettext_english_lines("de", root=str(locale_root)) == [
        "About",
        "First line",
        "Second line",
        "Open file",
        "Quit",
        "Save",
    ]


@pytest.mark.parametrize(
    "name, raw",
    [
        pytest.param(name, raw, id=name)
        for name, raw in [
            ("bad_magic", b"\x00\x01\x02\x03" + b"\x00" * 40),
            ("offsets_past_end", struct.pack("<7I", MO_MAGIC, 0, 1, 28, 36, 0, 0)
             + struct.pack("<2I", 5, 9999) + struct.pack("<2I", 5, 9999)),
            ("not_utf8_translation", mo_bytes({"Yes": b"J\xe4"})),
            ("empty_file", b""),
            ("truncated_header", struct.pack("<I", MO_MAGIC) + b"\x00" * 6),
        ]
    ],
)
def test_gettext_pairs_skips_and_counts_each_kind_of_corrupt_catalogue(tmp_path, name, raw):
    # The docstring: "catalogues it cannot parse are skipped and counted".
    write_mo(tmp_path, "de", "good", {"Yes": "Ja"})
    write_mo(tmp_path, "de", name, raw=raw)
    pairs, skipped = corpora.gettext_pairs("de", root=str(tmp_path))
    assert pairs == [("Yes", "Ja")]
    assert skipped == 1


# ---------------------------------------------------------------------------
# split_deterministic


def make_items(n):
    return [f"message number {i} of the catalogue" for i in range(n)]


def test_split_is_a_partition_and_deterministic():
    items = make_items(2000)
    first = corpora.split_deterministic(items)
    second = corpora.split_deterministic(list(items))
    assert first == second
    train, valid, test = first
    assert sorted(train + valid + test) == sorted(items)
    assert not set(train) & set(valid)
    assert not set(train) & set(test)
    assert not set(valid) & set(test)
    # Order within each split follows the input order.
    position = {item: i for i, item in enumerate(items)}
    for part in first:
        assert [position[x] for x in part] == sorted(position[x] for x in part)


@pytest.mark.parametrize("valid_fraction, test_fraction", [(0.05, 0.05), (0.1, 0.2)])
def test_split_fractions_are_roughly_respected(valid_fraction, test_fraction):
    n = 10_000
    train, valid, test = corpora.split_deterministic(make_items(n), valid_fraction, test_fraction)
    # A hash spreads items like independent draws: the binomial standard
    # deviation is at most sqrt(n * 0.25) = 50, so 4 sd is 200 items.
    assert abs(len(valid) - valid_fraction * n) < 200
    assert abs(len(test) - test_fraction * n) < 200
    assert len(train) + len(valid) + len(test) == n


def test_split_of_an_item_does_not_depend_on_the_others():
    items = make_items(3000)
    full = corpora.split_deterministic(items)
    where = {item: s for s, part in enumerate(full) for item in part}
    subset = items[::7] + ["a brand new message"]
    for s, part in enumerate(corpora.split_deterministic(list(reversed(subset)))):
        for item in part:
            if item in where:
                assert where[item] == s, item
    # The new message lands in the same split alone as among thousands.
    alone = corpora.split_deterministic(["a brand new message"])
    together = corpora.split_deterministic(items + ["a brand new message"])
    assert [len(p) for p in alone] == [int("a brand new message" in p) for p in together]


def test_split_of_pairs_is_keyed_by_the_source_text():
    sources = make_items(500)
    pairs = [(s, f"translation {i}") for i, s in enumerate(sources)]
    other_targets = [(s, "something else entirely") for s in sources]
    by_source = [[p[0] for p in part] for part in corpora.split_deterministic(pairs)]
    by_source_again = [[p[0] for p in part] for part in corpora.split_deterministic(other_targets)]
    assert by_source == by_source_again
    assert by_source == [list(part) for part in corpora.split_deterministic(sources)]


def test_split_with_zero_fractions_keeps_everything_in_train():
    items = make_items(300)
    assert corpora.split_deterministic(items, 0.0, 0.0) == (items, [], [])


def test_read_mo_equals_python_gettext_on_a_catalogue_both_read():
    # Python's own parser is the reference where it succeeds.
    import gettext
    import io

    messages = {"File": "Datei", "Größe": "Size-ü", "%d file\0%d files": "%d Datei\0%d Dateien",
                "Empty": ""}
    data = mo_bytes(messages)
    reference = {k: v for k, v in gettext.GNUTranslations(io.BytesIO(data))._catalog.items()
                 if isinstance(k, str) and k}
    assert dict(corpora.read_mo(data)) == reference
    # The plural entry is left out, the untranslated one kept (gettext_pairs drops it).
    assert sorted(corpora.read_mo(data)) == [("Empty", ""), ("File", "Datei"),
                                             ("Größe", "Size-ü")]


def test_read_mo_decodes_a_latin1_catalogue_and_big_endian_files():
    header = "Content-Type: text/plain; charset=iso-8859-1\nLast-Translator: Jörg\n"
    data = mo_bytes({b"Size": "Größe".encode("latin-1")}, header=header)
    # The header's own bytes are Latin-1 too (Python's gettext fails on these).
    data = data.replace("Jörg".encode() + b"\n", "Jörg".encode("latin-1") + b"\n ")
    assert corpora.read_mo(data) == [("Size", "Größe")]
    # The same table written big-endian: every 32-bit word of the first 7 swapped.
    words = struct.unpack("<7I", data[:28])
    count, ids_at, texts_at = words[2], words[3], words[4]
    body = bytearray(data)
    body[:28] = struct.pack(">7I", *words)
    for table in (ids_at, texts_at):
        for i in range(2 * count):
            at = table + 4 * i
            body[at:at + 4] = struct.pack(">I", struct.unpack("<I", data[at:at + 4])[0])
    assert corpora.read_mo(bytes(body)) == [("Size", "Größe")]
    with pytest.raises(ValueError, match="magic"):
        corpora.read_mo(b"\0" * 28)
