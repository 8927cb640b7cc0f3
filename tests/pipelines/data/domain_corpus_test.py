"""Tests of keras_moe.pipelines.data.domain_corpus on hand-made source trees.

Every domain's source is written here, small and in its real layout (a
Gutenberg shard and books.tsv, Wikipedia articles.tsv, PTB, Multi30k, the
Bible with verse ids, and `.mo` catalogues built byte by byte in GNU
gettext's format), so each document rule is checked against text whose
documents are known by construction.
"""

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from keras_moe.pipelines.data import domain_sources
from keras_moe.pipelines.data.domain_corpus import DOMAINS, build_domain_corpus
from keras_moe.pipelines.inspection.domains import read_documents
from tests.conftest import require_shared_data


def write_mo(path, messages):
    """A GNU `.mo` catalogue of `{msgid: msgstr}` (header entry first), little-endian."""
    entries = sorted({"": "Content-Type: text/plain; charset=UTF-8\n", **messages}.items())
    ids = [k.encode() for k, _ in entries]
    texts = [v.encode() for _, v in entries]
    n = len(entries)
    ids_at, texts_at = 28, 28 + 8 * n
    data_at = texts_at + 8 * n
    blob, id_table, text_table = b"", b"", b""
    for raw in ids:
        id_table += struct.pack("<2I", len(raw), data_at + len(blob))
        blob += raw + b"\0"
    for raw in texts:
        text_table += struct.pack("<2I", len(raw), data_at + len(blob))
        blob += raw + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, ids_at, texts_at, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(header + id_table + text_table + blob)


def paragraph(tag, i, words=50):
    return " ".join(f"{tag}{i}w{j}" for j in range(words))


def gz_lines(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def make_tree(root, locales):
    """Every source in its layout; returns the facts the tests check against."""
    # Gutenberg: 6 train books of 70 paragraphs x 50 words (3,500 words: documents
    # of 20, 20, 20 and 10 paragraphs) in one shard, 4 held-out books in valid.
    g = root / "gutenberg"
    g.mkdir(parents=True)
    rows = ["split\tfile\tfirst_line\tlines\twords\tauthor\ttitle"]
    train_lines, valid_lines = [], []
    for b in range(6):
        rows.append(f"train\ttrain-00000.txt.gz\t{len(train_lines)}\t70\t3500\tA\tBook {b}")
        train_lines += [paragraph(f"g{b}p", i) for i in range(70)]
    for b in range(4):
        rows.append(f"valid\tvalid.txt.gz\t{len(valid_lines)}\t70\t3500\tA\tHeld {b}")
        valid_lines += [paragraph(f"h{b}p", i) for i in range(70)]
    gz_lines(g / "train-00000.txt.gz", train_lines)
    gz_lines(g / "valid.txt.gz", valid_lines)
    (g / "books.tsv").write_text("\n".join(rows) + "\n")
    # Wikipedia: 30 train articles of 3 paragraphs, 12 held-out ones.
    w = root / "wikipedia_extract"
    w.mkdir()
    rows = ["split\tfile\tfirst_line\tlines\twords\tfirst_paragraph"]
    for split, name, count in (("train", "train.txt.gz", 30), ("valid", "valid.txt.gz", 12)):
        lines = []
        for a in range(count):
            rows.append(f"{split}\t{name}\t{len(lines)}\t3\t30\tx")
            lines += [paragraph(f"{split}a{a}p", i, 10) for i in range(3)]
        gz_lines(w / name, lines)
    (w / "articles.tsv").write_text("\n".join(rows) + "\n")
    # PTB and Multi30k: 100 train lines, 60 held-out ones.
    for folder, train, held in (("ptb", "ptb.train.txt", ["ptb.valid.txt"]),
                                ("multi30k", "train.en", ["val.en", "test_2016_flickr.en"])):
        (root / folder).mkdir()
        (root / folder / train).write_text("".join(f" {folder} t{i} x \n" for i in range(100)))
        for name in held:
            (root / folder / name).write_text("".join(f"{folder} {name} {i}\n"
                                                      for i in range(30)))
    # Bible: 6 books of 4 chapters of 5 verses.
    bible = root / "bible_parallel"
    bible.mkdir()
    ids, verses = [], []
    for book in range(1, 7):
        for chapter in range(1, 5):
            for verse in range(1, 6):
                ids.append(f"{book}:{chapter}:{verse}")
                verses.append(f"book{book} chapter{chapter} verse{verse} text")
    (bible / "verse_ids.txt").write_text("\n".join(ids) + "\n")
    (bible / "bible.en_web").write_text("\n".join(verses) + "\n")
    # gettext: packages alpha (60 msgids), beta (30), gamma (55) in two locales.
    for locale in ("de", "fr"):
        for package, count in (("alpha", 60), ("beta", 30), ("gamma", 55)):
            messages = {f"{package} message {i}": f"{locale} {i}" for i in range(count)}
            messages.update({"%d / %s": "x", "12 - 34": "x", "%s files": "x", f"{locale} only {package}": "y",
                             "ctx\x04In context": "z", "Two\nlines here": "w",
                             "shared by all": "s"})
            write_mo(str(locales / locale / "LC_MESSAGES" / f"{package}.mo"), messages)
    return {"verses": dict(zip(verses, ids, strict=True))}


@pytest.fixture
def tree(tmp_path):
    root, locales = tmp_path / "data", tmp_path / "locale"
    facts = make_tree(root, locales)
    return root, locales, facts


def build(tree, out, **kwargs):
    root, locales, _ = tree
    options = dict(seed=1, eval_words=60, max_select=4, locale_roots=(str(locales),))
    return build_domain_corpus(str(out), str(root), **{**options, **kwargs})


def documents_of(path):
    return [tuple(d) for d in read_documents(str(path), max_documents=10**9)]


def test_every_domain_written_with_disjoint_select_and_eval(tree, tmp_path):
    out = tmp_path / "out"
    manifest = build(tree, out)
    assert list(manifest["domains"]) == list(DOMAINS) and manifest["skipped"] == {}
    train = documents_of(out / "train.txt")
    valid = documents_of(out / "valid.txt")
    evals = []
    for domain in DOMAINS:
        select = documents_of(out / "valid" / f"{domain}.select.txt")
        held = documents_of(out / "valid" / f"{domain}.eval.txt")
        entry = manifest["domains"][domain]
        assert len(select) == entry["select"]["documents"] <= 4
        assert len(held) == entry["eval"]["documents"] >= 1
        assert not set(select) & set(held), domain
        assert not (set(select) | set(held)) & set(train), domain
        # .eval stops at the first document that reaches 60 words.
        words = [sum(len(line.split()) for line in d) for d in held]
        assert sum(words[:-1]) < 60
        assert entry["eval"]["words"] == sum(words)
        evals += held
    # valid.txt is the union of the .eval files; train.txt holds every training document.
    assert sorted(valid) == sorted(evals)
    assert len(train) == manifest["total"]["train"]["documents"] == sum(
        manifest["domains"][d]["train"]["documents"] for d in DOMAINS)
    assert manifest["total"]["train"]["words"] == sum(
        len(line.split()) for d in train for line in d)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["domains"]["ptb"]["train"] == {"documents": 5, "words": 300, "lines": 100}
    # Documents of all domains are mixed: the first ten are not all of one domain.
    assert len({d[0].split()[0][:3] for d in train[:10]}) > 1


def test_documents_follow_each_domain_rule(tree, tmp_path):
    out = tmp_path / "out"
    manifest = build(tree, out)
    train = documents_of(out / "train.txt")

    def of(prefix):
        return [d for d in train if re.match(prefix, d[0])]

    # Gutenberg: a book of 70 paragraphs of 50 words = documents of 20, 20, 20, 10 paragraphs
    # (the 500-word tail is not under half of 1,000 words, so it stays a document).
    gutenberg = of(r"g\d+p")
    assert sorted(len(d) for d in gutenberg) == [10] * 6 + [20] * 18
    assert manifest["domains"]["gutenberg"]["sources"]["train_books"] == 6
    for d in gutenberg:  # consecutive paragraphs of one book
        book = {line.split("p")[0] for line in d}
        numbers = [int(line.split()[0].split("p")[1].split("w")[0]) for line in d]
        assert len(book) == 1 and numbers == list(range(numbers[0], numbers[0] + len(d)))
    # Wikipedia: one article of 3 paragraphs.
    assert sorted(len(d) for d in of("traina")) == [3] * 30
    # PTB and Multi30k: 20 consecutive lines, whitespace collapsed.
    for prefix in ("ptb", "multi30k"):
        docs = of(prefix)
        assert [len(d) for d in docs] == [20] * 5
        assert all(line == line.strip() and "  " not in line for d in docs for line in d)
    # Bible: one chapter (5 verses) per document, and whole books held out.
    verses = tree[2]["verses"]
    bible_train = of("book")
    assert all(len(d) == 5 and len({verses[v].rsplit(":", 1)[0] for v in d}) == 1
               for d in bible_train)
    held_books = set(manifest["domains"]["bible"]["sources"]["held_out_books"])
    assert held_books and not held_books & {verses[d[0]].split(":")[0] for d in bible_train}
    # Max 4 select documents = 2 x 4 = 8 held-out chapters at least: two books of 4.
    assert len(held_books) == 2


def test_gettext_msgids_deduplicated_cleaned_and_packages_held_out_whole(tree, tmp_path):
    _, locales, _ = tree
    messages, read, skipped = domain_sources.gettext_messages([str(locales)])
    assert (read, skipped) == (6, 0)
    # alpha is first by name: it keeps the msgids every package has.
    assert "shared by all" in messages["alpha"] and "shared by all" not in messages["beta"]
    assert "de only alpha" in messages["alpha"] and "fr only alpha" in messages["alpha"]
    assert "In context" in messages["alpha"] and "Two lines here" in messages["alpha"]
    assert "%d / %s" not in messages["alpha"] and "12 - 34" not in messages["alpha"]
    assert "%s files" in messages["alpha"]  # letters outside the placeholder
    assert len(messages["alpha"]) == 60 + 6 and len(messages["beta"]) == 30 + 2
    out = tmp_path / "out"
    manifest = build(tree, out)
    sources = manifest["domains"]["gettext"]["sources"]
    held, trained = set(sources["held_out_packages"]), set(sources["train_packages"])
    assert held and trained and held | trained == {"alpha", "beta", "gamma"}
    assert not held & trained
    train = documents_of(out / "train.txt")
    train_msgs = [d for d in train if d[0].split()[0] in ("alpha", "beta", "gamma", "de", "fr",
                                                          "In", "Two", "shared")]
    packages_in_train = {line.split()[0] for d in train_msgs for line in d
                         if line.split()[0] in ("alpha", "beta", "gamma")}
    assert packages_in_train == trained
    assert all(len(d) <= 25 for d in train_msgs)
    assert manifest["domains"]["gettext"]["train"]["lines"] == sum(
        len(messages[p]) for p in trained)


def test_same_seed_same_files_other_seed_other_draw(tree, tmp_path):
    first, second, other = (tmp_path / name for name in ("a", "b", "c"))
    build(tree, first)
    build(tree, second)
    build(tree, other, seed=2)
    names = ["train.txt", "valid.txt", *(f"valid/{d}.{s}.txt" for d in DOMAINS
                                         for s in ("select", "eval"))]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "train.txt").read_bytes() != (other / "train.txt").read_bytes()
    assert sorted(documents_of(first / "train.txt")) != sorted(documents_of(other / "train.txt"))


def test_caps_take_whole_units_within_the_word_cap(tree, tmp_path):
    manifest = build(tree, tmp_path / "out", train_words=7000)
    # Two whole books of 3,500 words; every article (900 words) fits.
    assert manifest["domains"]["gutenberg"]["train"]["words"] == 7000
    assert manifest["domains"]["gutenberg"]["sources"]["train_books"] == 2
    assert manifest["domains"]["wikipedia"]["train"]["words"] == 900
    assert manifest["domains"]["ptb"]["train_cap_words"] is None
    capped = build(tree, tmp_path / "small", train_words={"wikipedia": 100})
    assert capped["domains"]["wikipedia"]["train"] == {"documents": 3, "words": 90, "lines": 9}
    assert capped["domains"]["gutenberg"]["train_cap_words"] is None


def test_no_catalogue_skips_gettext_with_a_warning(tree, tmp_path, capsys):
    manifest = build(tree, tmp_path / "out", locale_roots=(str(tmp_path / "none"),))
    assert "gettext" not in manifest["domains"]
    assert "no gettext catalogue" in manifest["skipped"]["gettext"]
    assert "warning: no gettext catalogue" in capsys.readouterr().err
    assert not (tmp_path / "out" / "valid" / "gettext.eval.txt").exists()


def test_a_missing_source_is_named(tree, tmp_path):
    root, _, _ = tree
    os.remove(root / "bible_parallel" / "verse_ids.txt")
    with pytest.raises(FileNotFoundError, match="verse_ids.txt"):
        build(tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "keras_moe.pipelines.cli", "lm", "domains", "--out",
         str(tmp_path / "cli"), "--data-root", str(root)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("keras-moe lm domains: error:") and "verse_ids.txt" in error
    assert "Traceback" not in done.stderr


def test_real_sources_build_quickly_in_their_layout(tmp_path):
    root = require_shared_data("bible_parallel", "verse_ids.txt").parent.parent
    for domain_folder in ("gutenberg", "wikipedia_extract", "ptb", "multi30k"):
        require_shared_data(domain_folder)
    manifest = build_domain_corpus(str(tmp_path / "out"), str(root), train_words=20_000,
                                   locale_roots=(), domains=DOMAINS[:5])
    entry = manifest["domains"]
    assert entry["gutenberg"]["train"]["words"] <= 20_000
    assert entry["ptb"]["train"]["words"] == 887_521  # the README's count: all of it
    assert entry["multi30k"]["train"]["lines"] == 29_000
    assert entry["bible"]["train"]["documents"] + entry["bible"]["held_out_pool"][
        "documents"] == 1189  # the Bible's chapters
    for domain in DOMAINS[:5]:
        assert entry[domain]["select"]["documents"] >= 50
        assert entry[domain]["eval"]["words"] >= 10_000
