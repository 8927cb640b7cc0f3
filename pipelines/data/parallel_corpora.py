"""Parallel corpora for translation: aligned text files, TSV, WMT `.sgm` and TFDS.

Every reader yields `(source, target)` string pairs:

- Aligned text files (Europarl, the WMT training sets): line `i` of one
  UTF-8 file translates line `i` of the other (`read_parallel_files`);
  `.gz` is decompressed. Lines split on `\\n` only (a stray `\\r` or
  Unicode line separator never splits a sentence and misaligns the sides)
  and blank lines are kept as `""`, for `clean_pairs` to count.
- Tab-separated files (Tatoeba, WikiMatrix): columns chosen by index
  (`read_tsv`); no quoting is interpreted.
- WMT SGML test sets: `<seg id="N">...</seg>` elements inside `<doc>`s
  inside `<srcset>`/`<refset>`, one file per side (`read_parallel_sgm`).
- TFDS translation datasets (`wmt14_translate/de-en`): examples keyed by
  language code (`tfds_pairs`). Never downloads: prepare them first.

`iter_pairs` reads a list of these, described by small mappings, one after
another; `clean_pairs` normalises whitespace and drops empty, overlong and
badly length-matched pairs, counting each reason in a `CleaningCounts`.
Text readers stream one line at a time, so a 4.5-million-pair training set
never sits in memory (`.sgm` test sets are read whole). Bad data raises
`ParallelDataError` (a `ValueError`) naming the file and line, or both files
and both counts when the sides differ.
"""

import os
import re
from collections.abc import Mapping

from keras_moe.pipelines.data import corpora

# Pairs read from TFDS per tf.data batch: one Python round trip per batch.
_TFDS_BATCH = 1024

_SEG = re.compile(r"<seg(?:\s[^>]*)?>(.*?)</seg\s*>", re.IGNORECASE | re.DOTALL)
# XML's five named entities and numeric character references; anything else
# that starts with `&` (for example "AT&T" in a sloppy file) is left as is.
_ENTITY = re.compile(r"&(?:(amp|lt|gt|quot|apos)|#([0-9]+)|#[xX]([0-9a-fA-F]+));")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}

# The keys each kind of `iter_pairs` mapping accepts, required ones first.
_SPEC_KEYS = {
    "files": (("source", "target"), ()),
    "tsv": (("tsv",), ("source_column", "target_column")),
    "tfds": (("tfds", "split", "source_language", "target_language"), ("data_dir",)),
}
# The key that tells a mapping's kind.
_KIND_OF_KEY = {"source": "files", "target": "files", "tsv": "tsv", "tfds": "tfds"}


class ParallelDataError(ValueError):
    """A parallel corpus that cannot be read: bad bytes, misaligned sides, bad spec."""


def _check_file(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"parallel corpus file not found: {path}")
    return path


def _numbered_lines(path):
    """`(number, line)` of a file, decoded, the line ending removed."""
    return corpora.numbered_lines(path, ParallelDataError)


def _plural(count, unit):
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def _count_mismatch(source_path, source_count, target_path, target_count, unit):
    return ParallelDataError(
        f"{source_path} has {_plural(source_count, unit)} but {target_path} has "
        f"{_plural(target_count, unit)}: the two sides of a parallel corpus must align"
    )


def read_parallel_files(source_path, target_path):
    """Stream the aligned lines of two text files as `(source, target)` pairs.

    The files are checked at the call and read lazily, one line at a time.
    Lines are stripped; blank lines are kept as `""`; `.gz` is decompressed.

    Args:
        source_path: the source-language file (`str` or `os.PathLike`).
        target_path: the target-language file, line for line.

    Returns:
        A generator of `(source_line, target_line)` pairs of `str`.

    Raises:
        FileNotFoundError: naming a missing file (at the call).
        ParallelDataError: while iterating, naming `file:line` of bytes that
            are not UTF-8, a `.gz` file that is not gzip, or, when one file
            ends first, both files and both line counts.
    """
    source_path = _check_file(source_path)
    target_path = _check_file(target_path)
    return _aligned_lines(source_path, target_path)


def _aligned_lines(source_path, target_path):
    source = (line.strip() for _, line in _numbered_lines(source_path))
    target = (line.strip() for _, line in _numbered_lines(target_path))
    end = object()
    count = 0
    try:
        for source_line in source:
            target_line = next(target, end)
            if target_line is end:
                total = count + 1 + sum(1 for _ in source)
                raise _count_mismatch(source_path, total, target_path, count, "line")
            count += 1
            yield source_line, target_line
        rest = sum(1 for _ in target)
        if rest:
            raise _count_mismatch(source_path, count, target_path, count + rest, "line")
    finally:
        source.close()
        target.close()


def read_sentences(path):
    """One side of a corpus: the lines of a text file (`.gz` too) or the segments of a `.sgm`.

    Lines are decoded and stripped as `read_parallel_files` does, blank
    lines kept (line `i` is sentence `i`).

    Raises:
        FileNotFoundError: naming a missing file.
        ParallelDataError: naming `path:line` for bad bytes.
    """
    if _is_sgm(path):
        return read_sgm(path)
    return [line.strip() for _, line in _numbered_lines(_check_file(path))]


def _check_column(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0. Received: {name}={value!r}")


def read_tsv(path, source_column=0, target_column=1):
    """Stream `(source, target)` pairs from two columns of a tab-separated file.

    Rows are split on tabs and both columns stripped. A blank row gives
    `("", "")` (counted as empty by `clean_pairs`). `.gz` is decompressed.

    Args:
        path: the file (`str` or `os.PathLike`).
        source_column: index of the source column, from 0.
        target_column: index of the target column, from 0.

    Returns:
        A generator of `(source, target)` pairs of `str`.

    Raises:
        FileNotFoundError: naming a missing file (at the call).
        ValueError: for a column index that is not an integer >= 0.
        ParallelDataError: while iterating, naming `file:line` of a row with
            too few columns (and the number found), or of bytes not UTF-8.
    """
    _check_column("source_column", source_column)
    _check_column("target_column", target_column)
    path = _check_file(path)
    return _tsv_pairs(path, source_column, target_column)


def _tsv_pairs(path, source_column, target_column):
    needed = max(source_column, target_column) + 1
    for number, line in _numbered_lines(path):
        if not line.strip():
            yield "", ""
            continue
        columns = line.split("\t")
        if len(columns) < needed:
            raise ParallelDataError(
                f"{path}:{number}: found {_plural(len(columns), 'tab-separated column')}, "
                f"need {needed} (source_column={source_column}, target_column={target_column})"
            )
        yield columns[source_column].strip(), columns[target_column].strip()


def _unescape_entity(match):
    named, decimal, hexadecimal = match.groups()
    if named:
        return _NAMED[named]
    code = int(decimal) if decimal else int(hexadecimal, 16)
    return chr(code) if 0 < code <= 0x10FFFF else match.group(0)


def read_sgm(path):
    """The segments of a WMT `.sgm` file (`.sgm.gz` too), in file order.

    Every `<seg ...>text</seg>` counts, whatever its attributes, several per
    line or one over lines; the text is stripped and XML's entities
    (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`) and numeric references
    (`&#39;`, `&#x27;`) unescaped. `<srcset>` and `<doc>` are not checked.

    Args:
        path: the file (`str` or `os.PathLike`).

    Returns:
        A list of `str`, one per segment.

    Raises:
        FileNotFoundError: naming a missing file.
        ParallelDataError: naming `file:line` of bytes that are not UTF-8,
            or naming the file when it holds no `<seg>`.
    """
    path = _check_file(path)
    text = "\n".join(line for _, line in _numbered_lines(path))
    segments = [_ENTITY.sub(_unescape_entity, seg.strip()) for seg in _SEG.findall(text)]
    if not segments:
        raise ParallelDataError(f"{path}: no <seg> element found (is it a WMT .sgm file?)")
    return segments


def read_parallel_sgm(source_path, target_path):
    """The `(source, target)` pairs of a WMT test set's two `.sgm` files.

    Raises:
        FileNotFoundError: naming a missing file.
        ParallelDataError: as `read_sgm`, or naming both files and both
            segment counts when they differ.
    """
    source = read_sgm(source_path)
    target = read_sgm(target_path)
    if len(source) != len(target):
        raise _count_mismatch(
            os.fspath(source_path), len(source), os.fspath(target_path), len(target), "segment"
        )
    return list(zip(source, target, strict=True))


def _is_sgm(path):
    return os.fspath(path).endswith((".sgm", ".sgm.gz"))


def _lazy(function, *args):
    yield from function(*args)  # called when the first pair is asked for


def tfds_pairs(name, split, source_language, target_language, data_dir=None):
    """Stream `(source, target)` pairs from a prepared TFDS translation dataset.

    Examples must be dicts keyed by language code, as
    `tfds.features.Translation` gives (`wmt14_translate/de-en`,
    `wmt_t2t_translate/de-en`). Nothing is downloaded: prepare the dataset
    first (`tfds build wmt14_translate/de-en --data_dir=DIR`). `name` is
    looked up as TFDS does (a registered builder, or a dataset prepared in
    `data_dir` by unregistered code), or is the directory of a prepared
    dataset (`DIR/wmt14_translate/de-en/1.0.0`; `data_dir` is then ignored).

    Args:
        name: TFDS name, with its config (`"wmt14_translate/de-en"`), or a
            prepared dataset's directory.
        split: a TFDS split or split expression (`"test"`, `"train[:1%]"`).
        source_language: feature key of the source side (`"en"`).
        target_language: feature key of the target side (`"de"`).
        data_dir: TFDS data directory (`None`: TFDS's default).

    Returns:
        A generator of stripped `(source, target)` pairs of `str`.

    Raises:
        ImportError: without `tensorflow-datasets` installed.
        ParallelDataError: at the call, naming the directory looked in (and
            how to prepare the dataset) when it is unknown or not prepared,
            the splits or languages it has for a missing one; while
            iterating, naming `name:split:example` of bytes not UTF-8.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "tfds_pairs needs the tensorflow-datasets package: pip install tensorflow-datasets"
        ) from None
    name = os.fspath(name)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "dataset_info.json")):
            raise ParallelDataError(
                f"{name} is a directory but not a prepared TFDS dataset (no dataset_info.json)"
            )
        builder = tfds.builder_from_directory(name)
    else:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError:
            # TFDS's own message lists every registered dataset: too long to help.
            raise ParallelDataError(
                f"TFDS dataset {name!r} not found: it is no registered TFDS name, no "
                f"dataset prepared in data_dir={data_dir!r} and no dataset directory"
            ) from None
        if not builder.is_prepared():
            raise ParallelDataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} "
                f"(data_dir={data_dir!r}); tfds_pairs never downloads: prepare it first, "
                f"e.g. `tfds build {name} --data_dir=...` or "
                f"`tfds.builder({name!r}, data_dir=...).download_and_prepare()`"
            )
    available = sorted(builder.info.splits.keys())
    # Accept TFDS split expressions such as "train[:1%]" or "validation+test".
    for part in re.sub(r"\[[^\]]*\]", "", split).split("+"):
        if part not in available:
            raise ParallelDataError(
                f"TFDS dataset {name!r} has no split {part!r}; it has {available}"
            )
    features = builder.info.features
    languages = sorted(features.keys()) if hasattr(features, "keys") else []
    for language in (source_language, target_language):
        if language not in languages:
            raise ParallelDataError(
                f"TFDS dataset {name!r} has no language {language!r}; its features are {languages}"
            )
    return _tfds_generator(builder, split, source_language, target_language, f"{name}:{split}")


def _tfds_generator(builder, split, source_language, target_language, label):
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(lambda example: (example[source_language], example[target_language]))
    number = 0
    for sources, targets in dataset.batch(_TFDS_BATCH).as_numpy_iterator():
        for raw_source, raw_target in zip(sources, targets, strict=True):
            number += 1
            try:
                yield raw_source.decode("utf-8").strip(), raw_target.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ParallelDataError(
                    f"{label}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from None


def _spec_kind(mapping):
    if not isinstance(mapping, Mapping):
        raise ParallelDataError(f"a corpus spec must be a mapping. Received: {mapping!r}")
    kinds = [kind for key, kind in _KIND_OF_KEY.items() if key in mapping]
    if not kinds:
        raise ParallelDataError(
            f"missing key 'source' (with 'target'), 'tsv' or 'tfds' in the corpus spec {mapping!r}"
        )
    kind = kinds[0]
    required, optional = _SPEC_KEYS[kind]
    for key in mapping:
        if key not in required + optional:
            raise ParallelDataError(
                f"unknown key {key!r} in the {kind} corpus spec {mapping!r}; it accepts "
                f"{', '.join(repr(k) for k in required + optional)}"
            )
    for key in required:
        if key not in mapping:
            raise ParallelDataError(f"missing key {key!r} in the {kind} corpus spec {mapping!r}")
    return kind


def _spec_pairs(mapping):
    kind = _spec_kind(mapping)
    if kind == "tsv":
        return read_tsv(
            mapping["tsv"], mapping.get("source_column", 0), mapping.get("target_column", 1)
        )
    if kind == "tfds":
        return tfds_pairs(
            mapping["tfds"],
            mapping["split"],
            mapping["source_language"],
            mapping["target_language"],
            data_dir=mapping.get("data_dir"),
        )
    source, target = mapping["source"], mapping["target"]
    if _is_sgm(source) != _is_sgm(target):
        raise ParallelDataError(
            f"the corpus spec {mapping!r} mixes an .sgm file with a text file: "
            "both sides must be .sgm or neither"
        )
    if _is_sgm(source):
        _check_file(source)
        _check_file(target)
        return _lazy(read_parallel_sgm, source, target)
    return read_parallel_files(source, target)


def iter_pairs(spec):
    """Stream the `(source, target)` pairs of one or several corpora, in order.

    Each corpus is a mapping, one of:

    - `{"source": PATH, "target": PATH}`: aligned text files (`.gz` too),
      or `read_parallel_sgm` when both names end in `.sgm`.
    - `{"tsv": PATH}`, optionally `"source_column"`, `"target_column"`.
    - `{"tfds": NAME, "split": SPLIT, "source_language": "en",
      "target_language": "de"}`, optionally `"data_dir"` (`tfds_pairs`).

    Every mapping, file and TFDS dataset is checked at the call; pairs are
    read lazily, one corpus after the other.

    Args:
        spec: one mapping, or a list of mappings to concatenate.

    Returns:
        A generator of `(source, target)` pairs of `str`.

    Raises:
        ParallelDataError: naming the key and the mapping for an unknown or
            a missing key, and as the readers above.
        FileNotFoundError: naming a missing file.

    Example:

    >>> iter_pairs({"source": "train.en", "traget": "train.de"})
    Traceback (most recent call last):
    ...
    keras_moe.pipelines.data.parallel_corpora.ParallelDataError: unknown key 'traget' in the files \
corpus spec {'source': 'train.en', 'traget': 'train.de'}; it accepts 'source', 'target'
    """
    mappings = spec if isinstance(spec, (list, tuple)) else [spec]
    if not mappings:
        raise ParallelDataError("the corpus spec is an empty list: name at least one corpus")
    readers = [_spec_pairs(mapping) for mapping in mappings]
    return (pair for reader in readers for pair in reader)


# Re-exported: cleaning is its own module, and a step every reader's pairs go through.
from keras_moe.pipelines.data.cleaning import CleaningCounts, clean_pairs  # noqa: E402, F401
