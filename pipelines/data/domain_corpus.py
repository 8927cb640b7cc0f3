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

import json
import os
import random
import sys
import time

from keras_moe.pipelines import progress
from keras_moe.pipelines.data import domain_sources as sources_lib
from keras_moe.pipelines.data.domain_sources import (
    DOCUMENT_RULES,
    LOCALE_ROOTS,
    REQUIRED,
    count_words,
)

DOMAINS = ("gutenberg", "wikipedia", "ptb", "multi30k", "bible", "gettext")
DEFAULT_TRAIN_WORDS = {"gutenberg": 2_000_000, "wikipedia": 2_000_000}


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
        words += count_words(documents[i])
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
    return {"documents": len(documents), "words": sum(count_words(d) for d in documents),
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
            sources_lib.require(os.path.join(root, relative))
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
            built = sources_lib.gettext(locale_roots, cap, rng, held_documents, held_words)
            if built is None:
                warning = (f"no gettext catalogue (.mo) under {', '.join(locale_roots)}: "
                           "the gettext domain is skipped")
                print(f"warning: {warning}", file=sys.stderr, flush=True)
                manifest["skipped"]["gettext"] = warning
                continue
        elif domain == "bible":
            built = sources_lib.bible(root, cap, rng, held_documents, held_words)
        else:
            built = getattr(sources_lib, domain)(root, cap, rng)
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
