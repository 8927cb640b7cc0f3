"""Real text that is already on the machine, and plain text files."""

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
                messages = read_mo(f.read())
        except (OSError, UnicodeDecodeError, ValueError, struct.error):
            skipped += 1
            continue
        for source, target in messages:
            if source and target:
                pairs.setdefault(source, target)
    return sorted(pairs.items()), skipped


def read_mo(data):
    """The singular messages of a compiled gettext catalogue (`.mo` bytes).

    The format is GNU gettext's: a magic number that also gives the byte
    order, the number of strings N and the offsets of two tables of N
    (length, offset) pairs, one for the message ids and one for their
    translations. The header entry (empty id) names the charset. Plural
    entries (an id holding a NUL) are left out, as the pairs use singular
    messages only. Python's `gettext` module parses the same format, but
    keeps the table in a private attribute, so it is read here.

    Returns:
        list of `(message id, translation)` strings, in file order.

    Raises:
        ValueError: not a catalogue; struct.error, UnicodeDecodeError: a
            truncated table or undecodable text.
    """
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x950412DE:
        order = "<"
    elif magic == 0xDE120495:
        order = ">"
    else:
        raise ValueError("not a gettext .mo catalogue (bad magic number)")
    count, ids_at, texts_at = struct.unpack(order + "3I", data[8:20])
    raw = []
    for i in range(count):
        id_len, id_off = struct.unpack(order + "2I", data[ids_at + 8 * i: ids_at + 8 * i + 8])
        tx_len, tx_off = struct.unpack(order + "2I", data[texts_at + 8 * i: texts_at + 8 * i + 8])
        if id_off + id_len > len(data) or tx_off + tx_len > len(data):
            raise ValueError("truncated gettext .mo catalogue")
        raw.append((data[id_off: id_off + id_len], data[tx_off: tx_off + tx_len]))
    charset = "ascii"
    for msgid, text in raw:
        if msgid == b"":
            found = re.search(rb"charset=([-\w]+)", text)
            if found:
                charset = found.group(1).decode("ascii")
    return [(msgid.decode(charset), text.decode(charset))
            for msgid, text in raw if msgid and b"\x00" not in msgid]


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
