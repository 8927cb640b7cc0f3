"""Real text that is already on the machine, and plain text files."""

import gettext
import glob
import gzip
import os
import re
import struct
import zlib

GETTEXT_ROOT = "/usr/share/locale"

# Words, numbers and single punctuation marks: raw text such as message
# catalogues. Already-tokenized corpora (PTB's "'s", "u.s.") must be split on
# whitespace instead, or their token counts change.
_TOKEN = re.compile(r"<\w+>|\w+(?:[-']\w+)*|[^\w\s]", re.UNICODE)


def tokenize(line):
    """Split raw text into word and punctuation tokens (for message catalogues)."""
    return _TOKEN.findall(line)


def split_whitespace(line):
    """Tokens of an already-tokenized corpus (PTB, WikiText): split on spaces."""
    return line.split()


TOKENIZERS = {"regex": tokenize, "whitespace": split_whitespace}


def gettext_pairs(language="de", root=GETTEXT_ROOT):
    """English message ids and their translations from the machine's catalogues.

    Reads every `<root>/<language>/LC_MESSAGES/*.mo` with Python's `gettext`
    module; catalogues it cannot parse are skipped and counted.

    Args:
        language: target language folder (e.g. `"de"`).
        root: the locale directory.

    Returns:
        `(pairs, skipped)`: a list of `(english, translation)` sorted by the
        English text (deterministic across runs), and the number of
        unreadable catalogues.
    """
    pattern = os.path.join(root, language, "LC_MESSAGES", "*.mo")
    pairs = {}
    skipped = 0
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, "rb") as f:
                catalogue = gettext.GNUTranslations(f)
        except (OSError, UnicodeDecodeError, ValueError, struct.error):
            skipped += 1
            continue
        # _catalog is the parsed table; plural forms are keyed by tuples.
        for source, target in catalogue._catalog.items():
            if isinstance(source, str) and source and isinstance(target, str) and target:
                pairs.setdefault(source, target)
    return sorted(pairs.items()), skipped


def gettext_english_lines(language="de", root=GETTEXT_ROOT):
    """Non-empty English lines of the message ids (multi-line messages split)."""
    pairs, _ = gettext_pairs(language, root)
    lines = []
    for source, _ in pairs:
        for line in source.splitlines():
            line = " ".join(line.split())
            if line:
                lines.append(line)
    return lines


def open_binary(path):
    """`path` opened for reading bytes, decompressed when it ends in `.gz`."""
    # Binary: each line is decoded on its own, so an error can name its line.
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def numbered_lines(path, error=ValueError):
    """`(number, line)` of a UTF-8 text file (`.gz` too), read lazily.

    Lines are numbered from 1 as an editor numbers them (blank lines
    count); the line ending (`\n` or `\r\n`) is removed and nothing else
    (separators such as U+2028 that `str.splitlines` would split at stay
    in the line); a UTF-8 byte order mark at the start of the file is
    dropped.

    Raises:
        error: (an exception class, `ValueError` by default) naming the file
            and line of the first byte that is not UTF-8, or the file when
            a `.gz` name holds no valid gzip data.
    """
    path = os.fspath(path)
    with open_binary(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise error(
                        f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})"
                    ) from None
                if number == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # a byte order mark is no text
                yield number, line.removesuffix("\n").removesuffix("\r")
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise error(f"{path}: not a valid gzip file ({e})") from None


def read_lines(path):
    """Non-empty lines of a UTF-8 text file (`.gz` too), stripped.

    Raises:
        FileNotFoundError: naming the file.
        ValueError: naming the file and line of the first undecodable byte,
            or when the file has no non-empty line.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus file not found: {path}")
    lines = [line.strip() for _, line in numbered_lines(path)]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path}: the corpus is empty (no non-empty line)")
    return lines


def split_deterministic(items, valid_fraction=0.05, test_fraction=0.05):
    """Split a list into train/valid/test by position of a stable hash.

    The same item always lands in the same split, whatever else the list
    holds, so adding catalogues never moves an old message into train.
    """
    train, valid, test = [], [], []
    for item in items:
        key = item if isinstance(item, str) else item[0]
        bucket = (zlib.crc32(key.encode("utf-8")) % 10000) / 10000.0
        if bucket < test_fraction:
            test.append(item)
        elif bucket < test_fraction + valid_fraction:
            valid.append(item)
        else:
            train.append(item)
    return train, valid, test
