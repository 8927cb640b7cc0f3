"""Language-model corpora: plain text, PTB, WikiText, the 1B Word benchmark and TFDS.

Every reader streams: `iter_lines` opens one file at a time and yields one
line at a time, so a corpus as large as the One Billion Word benchmark
(about 4 GB) never sits in memory. Words are whitespace-separated tokens
(the corpora here are tokenized already) and every sentence ends with an
end-of-sentence token that counts as a word (`count_words`), the benchmark's
convention for per-word perplexity.
"""

import glob
import os
import re

from keras_moe.pipelines.data import corpora

FORMATS = ("text", "ptb", "wikitext", "1b", "tfds")

# The layout of the benchmark's release archive
# (1-billion-word-language-modeling-benchmark-r13output.tar.gz).
ONE_BILLION_WORD_TOP = "1-billion-word-language-modeling-benchmark-r13output"
ONE_BILLION_WORD_TRAIN_DIR = "training-monolingual.tokenized.shuffled"
ONE_BILLION_WORD_HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
ONE_BILLION_WORD_SPLITS = ("train", "heldout", "valid", "test")

# File names of the split files when a PTB or WikiText spec is a directory.
_SPLIT_FILES = {
    "ptb": ("ptb.{split}.txt",),
    "wikitext": ("wiki.{split}.tokens", "wiki.{split}.raw"),
}

# Lines read from TFDS per tf.data batch: one Python round trip per batch,
# not per sentence.
_TFDS_BATCH = 1024


def resolve_files(spec):
    """The files named by a corpus spec: a file, a glob pattern or a directory.

    A directory stands for every regular file directly inside it, hidden
    files (names starting with `.`) skipped; a pattern matches regular
    files only (Python's `glob`, which skips hidden files too).

    Args:
        spec: path of a file or directory, or a glob pattern (`str` or
            `os.PathLike`).

    Returns:
        A sorted list of file paths (at least one).

    Raises:
        FileNotFoundError: naming the spec when nothing matches, the
            directory holds no file, or the path does not exist.

    Example:

    >>> resolve_files("/no/such/corpus.txt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: corpus file not found: /no/such/corpus.txt
    """
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(spec, name)
            for name in os.listdir(spec)
            if not name.startswith(".") and os.path.isfile(os.path.join(spec, name))
        )
        if not files:
            raise FileNotFoundError(f"corpus directory holds no file: {spec}")
        return files
    if os.path.isfile(spec):
        return [spec]
    if glob.has_magic(spec):
        files = sorted(path for path in glob.glob(spec) if os.path.isfile(path))
        if not files:
            raise FileNotFoundError(f"no corpus file matches the pattern {spec}")
        return files
    raise FileNotFoundError(f"corpus file not found: {spec}")


def one_billion_word_files(root, split):
    """Files of one split of the One Billion Word benchmark, in its own layout.

    The release archive unpacks to::

        1-billion-word-language-modeling-benchmark-r13output/
            training-monolingual.tokenized.shuffled/
                news.en-00001-of-00100 ... news.en-00099-of-00100
            heldout-monolingual.tokenized.shuffled/
                news.en.heldout-00000-of-00050 ... news.en.heldout-00049-of-00050

    (training shard 00000 is the one cut into the 50 held-out files). By the
    convention of the benchmark's papers (Chelba et al. 2013; Jozefowicz et
    al. 2016; Shazeer et al. 2017), `news.en.heldout-00000-of-00050` is the
    test set; `news.en.heldout-00001-of-00050` is used here as the
    validation set. Note that TFDS's `lm1b` "test" split is all 50 held-out
    files instead.

    Args:
        root: the folder holding the two directories above, or the
            `1-billion-word-language-modeling-benchmark-r13output` folder's
            parent.
        split: `"train"` (every training shard), `"heldout"` (all 50
            held-out files), `"test"` (held-out file 00000) or `"valid"`
            (held-out file 00001).

    Returns:
        A sorted list of file paths.

    Raises:
        ValueError: for an unknown split.
        FileNotFoundError: naming the missing directory or file.
    """
    if split not in ONE_BILLION_WORD_SPLITS:
        raise ValueError(
            f"unknown 1B Word split {split!r}; expected one of {ONE_BILLION_WORD_SPLITS}"
        )
    root = os.fspath(root)
    unpacked = os.path.join(root, ONE_BILLION_WORD_TOP)
    if not os.path.isdir(os.path.join(root, ONE_BILLION_WORD_TRAIN_DIR)) and os.path.isdir(
        unpacked
    ):
        root = unpacked
    if split == "train":
        folder = os.path.join(root, ONE_BILLION_WORD_TRAIN_DIR)
        pattern = "news.en-000??-of-00100"
    else:
        folder = os.path.join(root, ONE_BILLION_WORD_HELDOUT_DIR)
        pattern = "news.en.heldout-000??-of-00050"
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"1B Word directory not found: {folder}")
    if split in ("test", "valid"):
        number = 0 if split == "test" else 1
        path = os.path.join(folder, f"news.en.heldout-{number:05d}-of-00050")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"1B Word {split} file not found: {path}")
        return [path]
    files = sorted(p for p in glob.glob(os.path.join(folder, pattern)) if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"no 1B Word {split} file ({pattern}) in {folder}")
    return files


def count_words(line):
    """Words of a line for per-word perplexity: whitespace tokens plus one.

    The one is the end-of-sentence token, which the model predicts and the
    1B Word benchmark counts as a word. A blank line counts 1.

    Example:

    >>> count_words("the cat sat .")
    5
    """
    return len(line.split()) + 1


def iter_lines(spec, format="text", split="train", *, data_dir=None, blank_lines=None):
    """Stream the stripped lines of a corpus, one file after another.

    The files are found (and a missing one reported) when this is called;
    the lines are read lazily as the returned generator is consumed.

    Formats:
        - `"text"`: one sentence per line; `spec` is a file, a glob or a
          directory (`resolve_files`); `.gz` files are decompressed.
        - `"ptb"`: Mikolov's Penn Treebank files, whitespace-tokenized with
          `<unk>` already in the text (kept as is). A directory spec means
          its `ptb.<split>.txt`.
        - `"wikitext"`: WikiText's `wiki.<split>.tokens` (or `.raw`); a
          directory spec means that split's file. Heading lines such as
          ` = Homarus gammarus = ` are kept as lines (stripped). Blank lines
          are kept as empty strings by default: the published WikiText
          token counts (217,646 for WikiText-2 valid = 213,886 words + 3,760
          lines) and the usual setups (PyTorch's word_language_model, the
          AWD-LSTM code, fairseq) give every line, blank ones included, an
          end-of-sentence token, and only then is per-word perplexity
          comparable with published figures. Pass `blank_lines=False` to
          drop them.
        - `"1b"`: `spec` is the root of the benchmark's layout and `split`
          picks the files (`one_billion_word_files`).
        - `"tfds"`: `spec` is `name[:split]` (e.g. `"lm1b"`, `"lm1b:test"`),
          read with `tensorflow_datasets` from `data_dir`, field `"text"`.
          Never downloads: the data must be prepared already.

    Args:
        spec: the corpus, as described for each format.
        format: one of `FORMATS`.
        split: the split for `"1b"`, for PTB/WikiText directories and for
            TFDS names without `:split`; ignored otherwise.
        data_dir: TFDS data directory (`None`: TFDS's default).
        blank_lines: whether to yield blank lines (as `""`); `None` keeps
            them for `"wikitext"` only.

    Returns:
        A generator of `str` lines, whitespace stripped.

    Raises:
        ValueError: for an unknown format; while iterating, naming
            `file:line` for bytes that are not UTF-8, naming a `.gz` file
            that is not gzip data, or naming the corpus when it has no
            non-empty line at all (raised at the end of iteration).
        FileNotFoundError: naming the missing file, pattern or directory,
            or the TFDS data directory of a dataset not prepared.
        ImportError: for `"tfds"` without `tensorflow-datasets` installed.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown corpus format {format!r}; expected one of {FORMATS}")
    if blank_lines is None:
        blank_lines = format == "wikitext"
    if format == "tfds":
        return _tfds_lines(spec, split, data_dir)
    if format == "1b":
        files = one_billion_word_files(spec, split)
    elif format in _SPLIT_FILES and os.path.isdir(spec):
        files = [_split_file(spec, format, split)]
    else:
        files = resolve_files(spec)
    name = files[0] if len(files) == 1 else f"{os.fspath(spec)} ({len(files)} files)"
    return _lines_of_files(files, name, blank_lines)


def _split_file(folder, format, split):
    candidates = [os.path.join(folder, n.format(split=split)) for n in _SPLIT_FILES[format]]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{format} {split} file not found: {' or '.join(candidates)}")


def _file_lines(path):
    return (line.strip() for _, line in corpora.numbered_lines(path))


def _lines_of_files(files, name, blank_lines):
    found = False
    for path in files:
        for line in _file_lines(path):
            if line:
                found = True
                yield line
            elif blank_lines:
                yield line
    # Checked at the end so that streaming never needs a look-ahead pass.
    if not found:
        raise ValueError(f"{name}: the corpus is empty (no non-empty line)")


def _tfds_lines(spec, split, data_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "format='tfds' needs the tensorflow-datasets package: pip install tensorflow-datasets"
        ) from None
    name, _, tfds_split = str(spec).partition(":")
    tfds_split = tfds_split or split
    # An unknown name raises TFDS's DatasetNotFoundError (a ValueError naming it).
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (data_dir={data_dir}); "
            f"this loader never downloads: prepare it first, e.g. "
            f"`tfds build {name} --data_dir=...`"
        )
    available = sorted(builder.info.splits.keys())
    # Accept TFDS split expressions such as "train[:1%]" or "train+test".
    for part in re.sub(r"\[[^\]]*\]", "", tfds_split).split("+"):
        if part not in available:
            raise ValueError(f"TFDS dataset {name!r} has no split {part!r}; it has {available}")
    if "text" not in builder.info.features.keys():
        raise ValueError(f"TFDS dataset {name!r} has no 'text' feature: {builder.info.features}")
    return _tfds_generator(builder, tfds_split, f"{name}:{tfds_split}")


def _tfds_generator(builder, split, name):
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(lambda example: example["text"]).batch(_TFDS_BATCH)
    found = False
    number = 0
    for batch in dataset.as_numpy_iterator():
        for raw in batch:
            number += 1
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{name}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from None
            if line:
                found = True
                yield line
    if not found:
        raise ValueError(f"{name} in {builder.data_dir}: the corpus is empty (no non-empty line)")
