"""Readers of the multi-domain corpus's sources: each domain's documents.

`domain_corpus.build_domain_corpus` calls one reader per domain; each
returns `(training documents, held-out documents, sources)`, a document
being a list of lines (paragraphs, sentences, captions, verses, msgids),
and reads its files in place (gzip compressed). `DOCUMENT_RULES` says what
a document is in each domain; whole units (Bible books, gettext packages)
are held out where the source has no split of its own.
"""

import csv
import glob
import os
import re
import struct

from keras_moe.pipelines.data import corpora

LOCALE_ROOTS = ("/usr/share/locale", "/usr/share/locale-langpack")
GUTENBERG_DOCUMENT_WORDS = 1000
LINES_PER_DOCUMENT = {"ptb": 20, "multi30k": 20, "gettext": 25}

# The sources each domain needs, checked before anything is written.
REQUIRED = {
    "gutenberg": ("gutenberg/books.tsv", "gutenberg/valid.txt.gz", "gutenberg/train-*.txt.gz"),
    "wikipedia": ("wikipedia_extract/articles.tsv", "wikipedia_extract/train.txt.gz",
                  "wikipedia_extract/valid.txt.gz"),
    "ptb": ("ptb/ptb.train.txt", "ptb/ptb.valid.txt"),
    "multi30k": ("multi30k/train.en", "multi30k/val.en"),
    "bible": ("bible_parallel/bible.en_web", "bible_parallel/verse_ids.txt"),
}

DOCUMENT_RULES = {
    "gutenberg": f"consecutive paragraphs of one book, about {GUTENBERG_DOCUMENT_WORDS} words "
                 "(paragraphs are whole; a book's short tail joins its last document)",
    "wikipedia": "one article (articles.tsv)",
    "ptb": "20 consecutive lines (PTB has no article boundaries)",
    "multi30k": "20 consecutive English captions",
    "bible": "one chapter (verse_ids.txt book:chapter:verse); whole books held out",
    "gettext": "25 consecutive English msgids of one package (text domain), msgids deduplicated "
               "over locales and packages, no-letter msgids dropped, one msgid per line; whole "
               "packages held out",
}


def count_words(document):
    """Whitespace words of a document (a list of lines)."""
    return sum(len(line.split()) for line in document)


def _clean(line):
    return " ".join(line.split())


def require(path):
    """`path`, or FileNotFoundError naming it (a glob pattern: when it matches nothing)."""
    if not (glob.glob(path) if glob.has_magic(path) else os.path.exists(path)):
        raise FileNotFoundError(f"domain corpus source not found: {path}")
    return path


def _text_lines(path):
    """Stripped, whitespace-collapsed lines of a UTF-8 file (`.gz` too), blank ones kept."""
    return (_clean(line) for _, line in corpora.numbered_lines(path))


def _groups(lines, size):
    """Documents of `size` consecutive non-blank lines (the last may be shorter)."""
    lines = [line for line in lines if line]
    return [lines[i:i + size] for i in range(0, len(lines), size)]


def _read_table(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _units_lines(folder, rows):
    """`{row index: [lines]}` of the chosen table rows (split, file, first_line, lines)."""
    wanted = {}
    for index, row in rows:
        wanted.setdefault(row["file"], []).append(
            (int(row["first_line"]), int(row["lines"]), index))
    out = {}
    for name, spans in sorted(wanted.items()):
        path = require(os.path.join(folder, name))
        starts = {first: (count, index) for first, count, index in spans}
        last = max(first + count for first, count, _ in spans)
        current, remaining = None, 0
        for number, (_, line) in enumerate(corpora.numbered_lines(path)):
            if number >= last:
                break
            if number in starts:
                remaining, index = starts[number]
                current = out.setdefault(index, [])
            if remaining:
                current.append(_clean(line))
                remaining -= 1
    return out


def _capped(units, cap, rng):
    """Table rows `(index, row)` in seeded order, whole, while their words fit `cap`."""
    units = list(units)
    rng.shuffle(units)
    if cap is None:
        return units, False
    chosen, total = [], 0
    for index, row in units:
        words = int(row["words"])
        if total + words > cap:
            continue
        chosen.append((index, row))
        total += words
    return chosen, True


def _book_documents(paragraphs, target=GUTENBERG_DOCUMENT_WORDS):
    documents, current, words = [], [], 0
    for paragraph in paragraphs:
        if not paragraph:
            continue
        current.append(paragraph)
        words += len(paragraph.split())
        if words >= target:
            documents.append(current)
            current, words = [], 0
    if current:
        if documents and words < target // 2:
            documents[-1].extend(current)
        else:
            documents.append(current)
    return documents


def gutenberg(root, cap, rng):
    """`(train documents, held-out documents, sources)` of Project Gutenberg books.

    Training takes whole books of the train shards in seeded order, skipping
    a book that would pass `cap` words, then cuts them into documents; the
    held-out part is every book of `valid.txt.gz`.
    """
    folder = require(os.path.join(root, "gutenberg"))
    table = _read_table(require(os.path.join(folder, "books.tsv")))
    valid_path = require(os.path.join(folder, "valid.txt.gz"))
    shards = sorted(glob.glob(os.path.join(folder, "train-*.txt.gz")))
    if not shards:
        raise FileNotFoundError(f"domain corpus source not found: {folder}/train-*.txt.gz")
    train_rows = [(i, row) for i, row in enumerate(table) if row["split"] == "train"]
    chosen, _ = _capped(train_rows, cap, rng)
    books = _units_lines(folder, chosen)
    train = [doc for index, _ in chosen for doc in _book_documents(books.get(index, []))]
    held_rows = [(i, row) for i, row in enumerate(table) if row["split"] == "valid"]
    held_books = _units_lines(folder, held_rows)
    held = [doc for index, _ in held_rows for doc in _book_documents(held_books.get(index, []))]
    return train, held, {"train": sorted({os.path.join(folder, r["file"]) for _, r in chosen}),
                         "held_out": [valid_path], "table": os.path.join(folder, "books.tsv"),
                         "train_books": len(chosen), "held_out_books": len(held_rows)}


def wikipedia(root, cap, rng):
    """`(train, held-out, sources)` of Wikipedia articles (one article, one document)."""
    folder = require(os.path.join(root, "wikipedia_extract"))
    table = _read_table(require(os.path.join(folder, "articles.tsv")))
    for name in ("train.txt.gz", "valid.txt.gz"):
        require(os.path.join(folder, name))
    train_rows = [(i, row) for i, row in enumerate(table) if row["split"] == "train"]
    chosen, _ = _capped(train_rows, cap, rng)
    articles = _units_lines(folder, chosen)
    train = [[p for p in articles[i] if p] for i, _ in chosen if i in articles]
    held_rows = [(i, row) for i, row in enumerate(table) if row["split"] == "valid"]
    held_articles = _units_lines(folder, held_rows)
    held = [[p for p in held_articles[i] if p] for i, _ in held_rows if i in held_articles]
    return ([d for d in train if d], [d for d in held if d],
            {"train": [os.path.join(folder, "train.txt.gz")],
             "held_out": [os.path.join(folder, "valid.txt.gz")],
             "table": os.path.join(folder, "articles.tsv"), "train_articles": len(chosen)})


def ptb(root, cap, rng):
    """`(train, held-out, sources)` of the Penn Treebank: 20 consecutive lines a document."""
    train_path = require(os.path.join(root, "ptb", "ptb.train.txt"))
    valid_path = require(os.path.join(root, "ptb", "ptb.valid.txt"))
    size = LINES_PER_DOCUMENT["ptb"]
    train = cap_documents(_groups(_text_lines(train_path), size), cap, rng)
    return train, _groups(_text_lines(valid_path), size), {
        "train": [train_path], "held_out": [valid_path]}


def multi30k(root, cap, rng):
    """`(train, held-out, sources)` of English Multi30k captions: 20 captions a document."""
    train_path = require(os.path.join(root, "multi30k", "train.en"))
    held_paths = [require(os.path.join(root, "multi30k", "val.en"))]
    test_path = os.path.join(root, "multi30k", "test_2016_flickr.en")
    if os.path.isfile(test_path):
        held_paths.append(test_path)
    size = LINES_PER_DOCUMENT["multi30k"]
    train = cap_documents(_groups(_text_lines(train_path), size), cap, rng)
    held = [doc for path in held_paths for doc in _groups(_text_lines(path), size)]
    return train, held, {"train": [train_path], "held_out": held_paths}


def bible(root, cap, rng, held_documents, held_words):
    """`(train, held-out, sources)` of the World English Bible: a chapter a document.

    Whole books, in seeded order, are held out until the held-out part has
    `held_documents` chapters and `held_words` words.
    """
    text_path = require(os.path.join(root, "bible_parallel", "bible.en_web"))
    ids_path = require(os.path.join(root, "bible_parallel", "verse_ids.txt"))
    verses = list(_text_lines(text_path))
    ids = [line for line in _text_lines(ids_path)]
    if len(ids) != len(verses):
        raise ValueError(f"{ids_path} has {len(ids)} lines but {text_path} has {len(verses)}")
    books = {}
    for number, (verse_id, verse) in enumerate(zip(ids, verses, strict=True), start=1):
        parts = verse_id.split(":")
        if len(parts) != 3:
            raise ValueError(f"{ids_path}:{number}: expected book:chapter:verse, got {verse_id!r}")
        chapters = books.setdefault(parts[0], {})
        if verse:
            chapters.setdefault(parts[1], []).append(verse)
    train_units, held_units = hold_out(
        {book: list(chapters.values()) for book, chapters in books.items()},
        rng, held_documents, held_words)
    train = cap_documents([d for _, docs in train_units for d in docs], cap, rng)
    return train, [d for _, docs in held_units for d in docs], {
        "train": [text_path, ids_path], "held_out": [text_path, ids_path],
        "held_out_books": sorted((u for u, _ in held_units), key=int)}


# printf (`%s`, `%-5.2f`, `%(name)s`, `%1$s`) and brace (`{0}`, `{name}`) placeholders:
# their letters are not words, so a msgid such as "%s: %s" counts as having no letter.
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\)|\d+\$)?[-+ #0-9.*]*[hlLqjzt]*[a-zA-Z%]|\{[^{}]*\}")


def gettext_messages(locale_roots):
    """`{package: [msgids]}` of the `.mo` catalogues under `locale_roots`.

    Every `<root>/<locale>/LC_MESSAGES/<package>.mo` is read
    (`corpora.read_mo`); a msgid's context (before `\\x04`) is dropped,
    internal newlines become spaces, msgids with no letter outside their format
    placeholders (`%s`, `{0}`) are dropped,
    and a msgid is kept once: in the first package (by name) that has it,
    so no msgid is in two packages (which could put it in train and
    held-out). Unreadable catalogues are skipped.

    Returns:
        `(messages, catalogues read, catalogues skipped)`; messages maps a
        package to its msgids, sorted, packages sorted by name.
    """
    found = {}
    read = skipped = 0
    for root in locale_roots:
        for path in sorted(glob.glob(os.path.join(root, "*", "LC_MESSAGES", "*.mo"))):
            try:
                with open(path, "rb") as f:
                    entries = corpora.read_mo(f.read())
            except (OSError, ValueError, LookupError, struct.error):
                # Unreadable, not a catalogue, or an unknown charset.
                skipped += 1
                continue
            read += 1
            package = os.path.basename(path)[: -len(".mo")]
            bucket = found.setdefault(package, set())
            for msgid, _ in entries:
                msgid = _clean(msgid.rpartition("\x04")[2])
                if any(ch.isalpha() for ch in _PLACEHOLDER.sub("", msgid)):
                    bucket.add(msgid)
    seen, messages = set(), {}
    for package in sorted(found):
        kept = sorted(found[package] - seen)
        seen.update(kept)
        if kept:
            messages[package] = kept
    return messages, read, skipped


def gettext(locale_roots, cap, rng, held_documents, held_words):
    """`(train, held-out, sources)` of gettext msgids: 25 msgids of one package a document.

    Returns `None` when no catalogue is found under `locale_roots`.
    """
    messages, read, skipped = gettext_messages(locale_roots)
    if not messages:
        return None
    size = LINES_PER_DOCUMENT["gettext"]
    units = {package: _groups(msgids, size) for package, msgids in messages.items()}
    train_units, held_units = hold_out(units, rng, held_documents, held_words)
    train = cap_documents([d for _, docs in train_units for d in docs], cap, rng)
    return train, [d for _, docs in held_units for d in docs], {
        "locale_roots": list(locale_roots), "catalogues_read": read,
        "catalogues_skipped": skipped,
        "train_packages": sorted(u for u, _ in train_units),
        "held_out_packages": sorted(u for u, _ in held_units)}


def hold_out(units, rng, held_documents, held_words):
    """Whole units (books, packages) in seeded order held out until both minimums are met."""
    order = sorted(units)
    rng.shuffle(order)
    held, documents, words = [], 0, 0
    for name in order:
        if documents >= held_documents and words >= held_words:
            break
        held.append(name)
        documents += len(units[name])
        words += sum(count_words(d) for d in units[name])
    if len(held) == len(order) and len(order) > 1:
        held.pop()  # keep at least one unit for training
    held_set = set(held)
    train = [(name, units[name]) for name in sorted(units) if name not in held_set]
    return train, [(name, units[name]) for name in held]


def cap_documents(documents, cap, rng):
    """Documents in order, or with a cap a seeded choice of whole documents within it."""
    if cap is None:
        return documents
    order = list(range(len(documents)))
    rng.shuffle(order)
    chosen, total = [], 0
    for i in order:
        words = count_words(documents[i])
        if total + words <= cap:
            chosen.append(i)
            total += words
    return [documents[i] for i in sorted(chosen)]
