"""Cleaning parallel pairs: whitespace normalised, empty, overlong and badly matched pairs dropped.

`clean_pairs` is the last step of every translation corpus
(`keras_moe.pipelines.data.parallel_corpora` reads the pairs); it counts each
reason a pair was dropped in a `CleaningCounts`, which the pipeline writes
to `run_dir/cleaning.json`. Both names are also importable from
`parallel_corpora`.
"""

import dataclasses

from keras_moe.pipelines import progress


@dataclasses.dataclass
class CleaningCounts:
    """Pairs seen by `clean_pairs`, kept, and dropped for each reason.

    Every pair read is either kept or counted under exactly one reason, so
    `read == kept + empty + too_long + bad_ratio`.

    Example:

    >>> CleaningCounts(read=10, kept=6, empty=2, too_long=1, bad_ratio=1).summary()
    'read 10 pairs, kept 6 (60.0%), dropped 2 empty, 1 too long, 1 with a bad length ratio'
    """

    read: int = 0
    kept: int = 0
    empty: int = 0
    too_long: int = 0
    bad_ratio: int = 0

    def summary(self):
        """One line for a log: what was read, kept and dropped."""
        kept = f"{100.0 * self.kept / self.read:.1f}%" if self.read else "-"
        return (
            f"read {self.read} pairs, kept {self.kept} ({kept}), dropped {self.empty} empty, "
            f"{self.too_long} too long, {self.bad_ratio} with a bad length ratio"
        )


def clean_pairs(pairs, counts=None, *, max_length=250, max_ratio=3.0):
    """Normalise whitespace and drop unusable pairs, counting each reason.

    Runs of whitespace become one space. A pair is dropped, and counted
    under the first reason that applies, when it is `empty` (a side has no
    word), `too_long` (a side has more than `max_length` words) or
    `bad_ratio` (the longer side has more than `max_ratio` times the words
    of the shorter). Words are whitespace-separated tokens.

    Args:
        pairs: an iterable of `(source, target)` strings.
        counts: a `CleaningCounts` to add to, to read after the generator
            is consumed; `None` makes a fresh one.
        max_length: the most words a side may have; `None` for no limit.
        max_ratio: the largest ratio of word counts (>= 1); `None` for none.

    Returns:
        A generator of the kept `(source, target)` pairs, normalised.

    Raises:
        ValueError: at the call, naming a bad argument and its value.

    Example:

    >>> counts = CleaningCounts()
    >>> list(clean_pairs([(" a  b ", "c d"), ("", "x"), ("a", "b c d e")], counts))
    [('a b', 'c d')]
    >>> counts
    CleaningCounts(read=3, kept=1, empty=1, too_long=0, bad_ratio=1)
    """
    # A caller that keeps the counts reports them: that pass (the pipeline's
    # check of its inputs) prints progress lines. Training's own passes,
    # which read the corpus again in the background, stay silent.
    report = counts is not None
    if counts is None:
        counts = CleaningCounts()
    elif not isinstance(counts, CleaningCounts):
        raise ValueError(f"`counts` must be a CleaningCounts or None. Received: counts={counts!r}")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(
            f"`max_length` must be an integer >= 1 (or None for no limit). "
            f"Received: max_length={max_length!r}"
        )
    number = isinstance(max_ratio, (int, float)) and not isinstance(max_ratio, bool)
    if max_ratio is not None and not (number and max_ratio >= 1):
        raise ValueError(
            f"`max_ratio` must be a number >= 1 (or None for no limit). "
            f"Received: max_ratio={max_ratio!r}"
        )
    return _clean(pairs, counts, max_length, max_ratio, report)


def _clean(pairs, counts, max_length, max_ratio, report):
    # Reading a large corpus takes minutes: progress lines while it does.
    meter = progress.Progress("read and clean pairs", "pairs", stream=None if report else False)
    for source, target in pairs:
        meter.update(1, kept=0)
        counts.read += 1
        source_words = source.split()
        target_words = target.split()
        shorter, longer = sorted((len(source_words), len(target_words)))
        if not shorter:
            counts.empty += 1
        elif max_length is not None and longer > max_length:
            counts.too_long += 1
        elif max_ratio is not None and longer / shorter > max_ratio:
            counts.bad_ratio += 1
        else:
            counts.kept += 1
            meter.extra["kept"] += 1
            yield " ".join(source_words), " ".join(target_words)
    meter.done(f"; {counts.summary()}")
