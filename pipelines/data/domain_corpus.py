"""A multi-domain English corpus of documents (`keras-moe lm domains`).

Six domains of real text from `../shared/data` and this machine's gettext
catalogues, cut into documents, written as training text for a language
model whose rows stay inside one document (`data.document_rows: true`,
docs/lm.md) and as per-domain held-out files for expert selection and
per-domain perplexity (docs/modularity.md):

```
OUT/train.txt                  training documents of every domain, shuffled
OUT/valid.txt                  the held-out mixture: every domain's .eval documents
OUT/valid/<domain>.select.txt  up to `max_select` held-out documents of a domain
OUT/valid/<domain>.eval.txt    other held-out documents, about `eval_words` words
OUT/manifest.json              sources, document rules, counts, caps, seed
```

Every file holds one paragraph or sentence per line and one blank line
between documents (the convention of `inspection.domains.read_documents`).

The domains and their documents:

- `gutenberg`: books of `gutenberg/train-*.txt.gz` (held out: `valid.txt.gz`),
  found with `books.tsv`; a document is a run of consecutive paragraphs of
  one book of about `GUTENBERG_DOCUMENT_WORDS` words.
- `wikipedia`: `wikipedia_extract/{train,valid}.txt.gz` with `articles.tsv`;
  a document is one article.
- `ptb`: `ptb/ptb.{train,valid}.txt`; no article boundaries, so a document
  is 20 consecutive lines.
- `multi30k`: English captions, `train.en` (held out: `val.en` and, when
  present, `test_2016_flickr.en`); a document is 20 consecutive captions.
- `bible`: `bible_parallel/bible.en_web` with `verse_ids.txt`; a document is
  a chapter; whole books are held out.
- `gettext`: the English msgids of the `.mo` catalogues under the locale
  roots; one text domain (package) is one source; a document is 25
  consecutive msgids of one package; whole packages are held out.

Training text is capped per domain (`DEFAULT_TRAIN_WORDS`: Gutenberg and
Wikipedia 2,000,000 words, all of the others). Held-out documents are
drawn (seeded) from each domain's held-out part: the first
`min(max_select, half of them)` go to `.select`, the next ones to `.eval`
until it holds `eval_words` words; the two never share a document.
Sources are read in place (gzip read compressed).
"""

import csv
import glob
import json
import os
import random
import re
import struct
import sys
import time

from keras_moe.pipelines import progress
from keras_moe.pipelines.data import corpora

DOMAINS = ("gutenberg", "wikipedia", "ptb", "multi30k", "bible", "gettext")
DEFAULT_TRAIN_WORDS = {"gutenberg": 2_000_000, "wikipedia": 2_000_000}
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


def _words(document):
    return sum(len(line.split()) for line in document)


def _clean(line):
    return " ".join(line.split())


def _require(path):
    if not os.path.exists(path):
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
        path = _require(os.path.join(folder, name))
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
    folder = _require(os.path.join(root, "gutenberg"))
    table = _read_table(_require(os.path.join(folder, "books.tsv")))
    valid_path = _require(os.path.join(folder, "valid.txt.gz"))
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
    folder = _require(os.path.join(root, "wikipedia_extract"))
    table = _read_table(_require(os.path.join(folder, "articles.tsv")))
    for name in ("train.txt.gz", "valid.txt.gz"):
        _require(os.path.join(folder, name))
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
    train_path = _require(os.path.join(root, "ptb", "ptb.train.txt"))
    valid_path = _require(os.path.join(root, "ptb", "ptb.valid.txt"))
    size = LINES_PER_DOCUMENT["ptb"]
    train = _cap_documents(_groups(_text_lines(train_path), size), cap, rng)
    return train, _groups(_text_lines(valid_path), size), {
        "train": [train_path], "held_out": [valid_path]}


def multi30k(root, cap, rng):
    """`(train, held-out, sources)` of English Multi30k captions: 20 captions a document."""
    train_path = _require(os.path.join(root, "multi30k", "train.en"))
    held_paths = [_require(os.path.join(root, "multi30k", "val.en"))]
    test_path = os.path.join(root, "multi30k", "test_2016_flickr.en")
    if os.path.isfile(test_path):
        held_paths.append(test_path)
    size = LINES_PER_DOCUMENT["multi30k"]
    train = _cap_documents(_groups(_text_lines(train_path), size), cap, rng)
    held = [doc for path in held_paths for doc in _groups(_text_lines(path), size)]
    return train, held, {"train": [train_path], "held_out": held_paths}


def bible(root, cap, rng, held_documents, held_words):
    """`(train, held-out, sources)` of the World English Bible: a chapter a document.

    Whole books, in seeded order, are held out until the held-out part has
    `held_documents` chapters and `held_words` words.
    """
    text_path = _require(os.path.join(root, "bible_parallel", "bible.en_web"))
    ids_path = _require(os.path.join(root, "bible_parallel", "verse_ids.txt"))
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
    train_units, held_units = _hold_out(
        {book: list(chapters.values()) for book, chapters in books.items()},
        rng, held_documents, held_words)
    train = _cap_documents([d for _, docs in train_units for d in docs], cap, rng)
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
    train_units, held_units = _hold_out(units, rng, held_documents, held_words)
    train = _cap_documents([d for _, docs in train_units for d in docs], cap, rng)
    return train, [d for _, docs in held_units for d in docs], {
        "locale_roots": list(locale_roots), "catalogues_read": read,
        "catalogues_skipped": skipped,
        "train_packages": sorted(u for u, _ in train_units),
        "held_out_packages": sorted(u for u, _ in held_units)}


def _hold_out(units, rng, held_documents, held_words):
    """Whole units (books, packages) in seeded order held out until both minimums are met."""
    order = sorted(units)
    rng.shuffle(order)
    held, documents, words = [], 0, 0
    for name in order:
        if documents >= held_documents and words >= held_words:
            break
        held.append(name)
        documents += len(units[name])
        words += sum(_words(d) for d in units[name])
    if len(held) == len(order) and len(order) > 1:
        held.pop()  # keep at least one unit for training
    held_set = set(held)
    train = [(name, units[name]) for name in sorted(units) if name not in held_set]
    return train, [(name, units[name]) for name in held]


def _cap_documents(documents, cap, rng):
    """Documents in order, or with a cap a seeded choice of whole documents within it."""
    if cap is None:
        return documents
    order = list(range(len(documents)))
    rng.shuffle(order)
    chosen, total = [], 0
    for i in order:
        words = _words(documents[i])
        if total + words <= cap:
            chosen.append(i)
            total += words
    return [documents[i] for i in sorted(chosen)]


def split_held_out(documents, rng, max_select=100, eval_words=40_000):
    """`(select, eval)`: disjoint seeded draws from a domain's held-out documents.

    `select` is the first `min(max_select, len(documents) // 2)` documents
    of a seeded shuffle (at least one when there are two or more); `eval`
    the following ones until it holds at least `eval_words` words.

    Example:

    >>> docs = [[f"w{i} x"] for i in range(10)]
    >>> select, held = split_held_out(docs, random.Random(0), max_select=3, eval_words=4)
    >>> len(select), len(held), set(map(id, select)) & set(map(id, held))
    (3, 2, set())
    """
    order = list(range(len(documents)))
    rng.shuffle(order)
    n_select = min(max_select, len(documents) // 2)
    select = [documents[i] for i in order[:n_select]]
    held, words = [], 0
    for i in order[n_select:]:
        if words >= eval_words:
            break
        held.append(documents[i])
        words += _words(documents[i])
    return select, held


def write_documents(path, documents):
    """One line per paragraph or sentence, one blank line between documents.

    A file of a single document ends in a blank line: a file without one
    would be read as one document per line (`inspection.domains.read_documents`).
    """
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(doc) for doc in documents))
        if documents:
            f.write("\n\n" if len(documents) == 1 else "\n")


def _counts(documents):
    return {"documents": len(documents), "words": sum(_words(d) for d in documents),
            "lines": sum(len(d) for d in documents)}


def _say(text):
    progress.emit(f"[lm domains] {text}")


def build_domain_corpus(out, data_root="../shared/data", *, seed=1, train_words=None,
                        eval_words=40_000, max_select=100, locale_roots=LOCALE_ROOTS,
                        domains=DOMAINS):
    """Write the multi-domain corpus into the folder `out` (see the module docstring).

    Args:
        out: folder to write (created; existing files of the same names are
            replaced).
        data_root: the shared data folder (`gutenberg/`, `wikipedia_extract/`,
            `ptb/`, `multi30k/`, `bible_parallel/`).
        seed: int, seeds every draw (books, articles, held-out units,
            select/eval, the order of `train.txt` and `valid.txt`).
        train_words: None for `DEFAULT_TRAIN_WORDS`; an int caps the
            training words of Gutenberg and Wikipedia (the others take all
            of their training part); a dict `{domain: cap or None}` sets each.
        eval_words: int, about this many words in each `.eval` file.
        max_select: int, at most this many documents in each `.select` file.
        locale_roots: folders holding `<locale>/LC_MESSAGES/*.mo`; without a
            catalogue the `gettext` domain is skipped with a warning (and
            recorded in the manifest).
        domains: the domains to build, a subset of `DOMAINS`.

    Returns:
        The manifest (a dict, also written to `out/manifest.json`).

    Raises:
        FileNotFoundError: naming the first missing source.
        ValueError: for an unknown domain or a bad argument.
    """
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain {unknown[0]!r}; expected some of {DOMAINS}")
    for name, value in (("eval_words", eval_words), ("max_select", max_select)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    caps = _caps(train_words)
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"domain corpus data root not found: {root}")
    for domain in domains:
        for relative in REQUIRED.get(domain, ()):
            path = os.path.join(root, relative)
            if not (glob.glob(path) if glob.has_magic(path) else os.path.exists(path)):
                raise FileNotFoundError(f"domain corpus source not found: {path}")
    held_documents, held_words = 2 * max_select, 2 * eval_words
    start = time.perf_counter()
    manifest = {"seed": seed, "data_root": os.path.abspath(root), "eval_words": eval_words,
                "max_select": max_select, "domains": {}, "skipped": {}}
    train_all, valid_all = [], []
    os.makedirs(os.path.join(out, "valid"), exist_ok=True)
    for index, domain in enumerate(domains):
        rng = random.Random(f"{seed}:{domain}")
        cap = caps.get(domain)
        _say(f"{domain}: reading ({time.perf_counter() - start:.1f} s)")
        if domain == "gettext":
            built = gettext(locale_roots, cap, rng, held_documents, held_words)
            if built is None:
                warning = (f"no gettext catalogue (.mo) under {', '.join(locale_roots)}: "
                           "the gettext domain is skipped")
                print(f"warning: {warning}", file=sys.stderr, flush=True)
                manifest["skipped"]["gettext"] = warning
                continue
        elif domain == "bible":
            built = bible(root, cap, rng, held_documents, held_words)
        else:
            built = globals()[domain](root, cap, rng)
        train, held, sources = built
        if not train or not held:
            raise ValueError(f"{domain}: no {'training' if not train else 'held-out'} document "
                             f"in {sources}")
        select, evaluation = split_held_out(held, rng, max_select, eval_words)
        write_documents(os.path.join(out, "valid", f"{domain}.select.txt"), select)
        write_documents(os.path.join(out, "valid", f"{domain}.eval.txt"), evaluation)
        train_all.extend(train)
        valid_all.extend(evaluation)
        manifest["domains"][domain] = {
            "sources": sources, "document": DOCUMENT_RULES[domain],
            "train_cap_words": cap, "train": _counts(train), "held_out_pool": _counts(held),
            "select": _counts(select), "eval": _counts(evaluation),
            "files": {"select": f"valid/{domain}.select.txt", "eval": f"valid/{domain}.eval.txt"},
        }
        _say(f"{domain}: {len(train):,} training documents, {_counts(train)['words']:,} words; "
             f"{len(select)} select, {len(evaluation)} eval documents "
             f"({index + 1}/{len(domains)}, {time.perf_counter() - start:.1f} s)")
    mixer = random.Random(f"{seed}:mixture")
    mixer.shuffle(train_all)
    mixer.shuffle(valid_all)
    write_documents(os.path.join(out, "train.txt"), train_all)
    write_documents(os.path.join(out, "valid.txt"), valid_all)
    manifest["total"] = {"train": _counts(train_all), "valid": _counts(valid_all)}
    manifest["files"] = {"train": "train.txt", "valid": "valid.txt"}
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    _say(f"done: {manifest['total']['train']['words']:,} training words, "
         f"{manifest['total']['valid']['words']:,} valid words in {manifest['seconds']} s -> {out}")
    return manifest


def _caps(train_words):
    if train_words is None:
        return dict(DEFAULT_TRAIN_WORDS)
    if isinstance(train_words, dict):
        unknown = [d for d in train_words if d not in DOMAINS]
        if unknown:
            raise ValueError(f"train_words: unknown domain {unknown[0]!r}")
        return dict(train_words)
    if isinstance(train_words, bool) or not isinstance(train_words, int) or train_words < 1:
        raise ValueError(f"`train_words` must be an integer >= 1. Received: {train_words!r}")
    return {domain: train_words for domain in DEFAULT_TRAIN_WORDS}
