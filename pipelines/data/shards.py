"""One pass over a sharded corpus, with books mixed: seeded shard interleaving and a shuffle buffer.

Large corpora come as shards of whole documents: `gutenberg/train-000NN.txt.gz`
holds one paragraph per line, books one after another. Read in order, a
model trained for one pass would see one book for thousands of steps, then
the next: its validation curve would follow the books, not the training.
`interleaved_lines` reads every shard at once and mixes on two levels:

1. Blocks of `block_lines` consecutive lines are taken from the shards in a
   seeded random order (each step picks one of the shards not yet finished,
   uniformly), so at any time every shard's current book is in play.
2. A shuffle buffer of `buffer_lines` lines (a reservoir: each new line
   takes the place of one drawn at random, which is emitted) mixes the
   blocks, so neighbouring lines come from many books.

Every line of every shard is emitted exactly once, and never again: the
generator ends after one pass. The order is a function of the seed and the
files alone, so a resumed run can skip the lines it has already trained on
and see the rest in the same order.

Example:

>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> for name, book in (("a.txt", "a1 a2 a3 a4"), ("b.txt", "b1 b2 b3 b4")):
...     with open(os.path.join(folder, name), "w") as f:
...         _ = f.write(book.replace(" ", "\\n") + "\\n")
>>> lines = list(interleaved_lines([os.path.join(folder, n) for n in ("a.txt", "b.txt")],
...                                seed=0, block_lines=2, buffer_lines=1))
>>> sorted(lines)
['a1', 'a2', 'a3', 'a4', 'b1', 'b2', 'b3', 'b4']
"""

import itertools

import numpy as np

from keras_moe.pipelines.data.corpora import numbered_lines


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}. Received: {name}={value!r}")


def _stripped(path):
    # numbered_lines decompresses .gz and names the file and line of a bad byte.
    for _, line in numbered_lines(path):
        yield line.strip()


def interleaved_lines(paths, *, seed=0, block_lines=64, buffer_lines=100_000, skip_blank=True):
    """Yield the lines of all `paths` once, shards interleaved and shuffled.

    Args:
        paths: the shard files (text or `.gz`), in a fixed order (sorted, say).
        seed: the order of blocks and the shuffle buffer's draws.
        block_lines: consecutive lines taken from one shard at a time.
        buffer_lines: the shuffle buffer's size, in lines (1: no shuffling
            beyond the block order).
        skip_blank: leave out empty lines.

    Yields:
        str: a stripped line.

    Raises:
        ValueError: for an empty `paths` or a bad size; the file's own error
            (naming it, and the line for bad UTF-8) when a shard cannot be read.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("`paths` must name at least one shard. Received: paths=[]")
    _check_int("block_lines", block_lines, 1)
    _check_int("buffer_lines", buffer_lines, 1)
    rng = np.random.default_rng(seed)
    readers = [_stripped(p) for p in paths]
    if skip_blank:
        readers = [(line for line in reader if line) for reader in readers]
    active = list(range(len(readers)))
    buffer = []
    while active:
        pick = int(rng.integers(len(active)))
        block = list(itertools.islice(readers[active[pick]], block_lines))
        if len(block) < block_lines:
            del active[pick]  # this shard is finished
        for line in block:
            if len(buffer) < buffer_lines:
                buffer.append(line)
                continue
            slot = int(rng.integers(buffer_lines))
            yield buffer[slot]
            buffer[slot] = line
    # The buffer's last lines, in a seeded random order too.
    for index in rng.permutation(len(buffer)):
        yield buffer[int(index)]


def mixing_report(lines_with_source, window=1000):
    """How mixed a stream is: the mean number of distinct sources per window of lines.

    Args:
        lines_with_source: iterable of `(source, line)`, e.g. a book id per line.
        window: lines per window.

    Returns:
        float: the mean over full windows of the number of distinct sources.
    """
    counts, seen, n = [], set(), 0
    for source, _ in lines_with_source:
        seen.add(source)
        n += 1
        if n == window:
            counts.append(len(seen))
            seen, n = set(), 0
    return float(np.mean(counts)) if counts else 0.0
