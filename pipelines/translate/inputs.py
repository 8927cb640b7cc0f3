"""Parallel text for translation: corpus parts, cleaning, encoding and `tf.data` batches.

Pairs are read part by part (`parallel_corpora.iter_pairs`, or the
machine's gettext catalogues), never held whole in memory for training:
each pass over the training data re-reads the files. Training pairs are
cleaned with counts (`parallel_corpora.clean_pairs`); evaluation pairs are
kept as they are, so that a score covers the whole set.

Ids follow one convention, shared with decoding and export: a sentence is
its WordPiece ids followed by `<eos>`; the decoder's input is the target
shifted right with `<eos>` as the start symbol (`target_in = [<eos>] +
target[:-1]`), and `<pad>` = 0 is masked everywhere.

Training batches are bucketed by length (the longer side of a pair) and
sized so that each holds about `batch_tokens` tokens per side, padding
included: short sentences come in big batches, long ones in small batches.
"""

import itertools

import numpy as np
import tensorflow as tf

from keras_moe.pipelines.data import corpora, parallel_corpora

CHUNK_PAIRS = 512


def eos_id(vocab):
    """The id of `<eos>` (also the decoder's start symbol)."""
    return vocab.encode_lines([""])[0][-1]


def _part_pairs(part, source_language, target_language):
    if part.gettext:
        pairs, _ = corpora.gettext_pairs(part.gettext, part.gettext_root)
        if not pairs:
            raise FileNotFoundError(
                f"no gettext catalogues with messages under "
                f"{part.gettext_root}/{part.gettext}/LC_MESSAGES/*.mo"
            )
        train, valid, test = corpora.split_deterministic(pairs)
        chosen = {"train": train, "valid": valid, "test": test}[part.split]
        # Catalogues pair English message ids with their translations.
        if source_language != "en" and target_language == "en":
            chosen = [(t, s) for s, t in chosen]
        # Messages may span lines; a sentence pair is one line per side.
        return ((" ".join(s.split()), " ".join(t.split())) for s, t in chosen)
    if part.tfds:
        spec = {"tfds": part.tfds, "split": part.split, "source_language": source_language,
                "target_language": target_language}
        if part.data_dir:
            spec["data_dir"] = part.data_dir
    elif part.tsv:
        spec = {"tsv": part.tsv, "source_column": part.source_column,
                "target_column": part.target_column}
    else:
        spec = {"source": part.source, "target": part.target}
    return parallel_corpora.iter_pairs(spec)


def pairs_factory(data_config, split, counts=None):
    """A callable returning a fresh iterator over the pairs of `split`.

    Args:
        data_config: a `translate_config.DataConfig`.
        split: `"train"`, `"valid"` or `"test"`; training pairs are cleaned.
        counts: optional `parallel_corpora.CleaningCounts`, filled by each
            pass over the training pairs (reset at the start of a pass).

    Raises:
        ValueError: when `data.<split>` names no corpus.
    """
    parts = getattr(data_config, split)
    if not parts:
        raise ValueError(f"`data.{split}` is empty: name at least one corpus part")
    c = data_config

    def factory():
        pairs = itertools.chain.from_iterable(
            _part_pairs(part, c.source_language, c.target_language) for part in parts
        )
        if split != "train":
            return pairs
        if counts is not None:
            for field in ("read", "kept", "empty", "too_long", "bad_ratio"):
                setattr(counts, field, 0)
        return parallel_corpora.clean_pairs(
            pairs, counts, max_length=c.max_length, max_ratio=c.max_ratio
        )

    return factory


def encoded_pairs(pairs, vocab):
    """`(source_ids, target_ids)` lists, each ending in `<eos>`, encoded in chunks."""
    pairs = iter(pairs)
    while chunk := list(itertools.islice(pairs, CHUNK_PAIRS)):
        sources = vocab.encode_lines([s for s, _ in chunk])
        targets = vocab.encode_lines([t for _, t in chunk])
        yield from zip(sources, targets, strict=True)


def bucket_boundaries(max_pieces):
    """Length bucket bounds: steps of 8 up to 64, then of 16, up to `max_pieces`."""
    bounds = list(range(8, min(max_pieces, 64) + 1, 8))
    bounds += list(range(80, max_pieces + 1, 16))
    if not bounds or bounds[-1] < max_pieces:
        bounds.append(max_pieces)
    # `bucket_by_sequence_length` buckets are [b_i, b_{i+1}): lengths < bound.
    return [b + 1 for b in bounds]


def _example(source, target, start):
    target_in = tf.concat([[start], target[:-1]], axis=0)
    return source, target_in, target


def _batch_layout(source, target_in, target_out):
    weights = tf.cast(tf.not_equal(target_out, 0), tf.float32)
    return {"source": source, "target_in": target_in}, target_out, weights


def training_dataset(pairs_factory_, vocab, data_config, seed=0, repeat=True):
    """Shuffled, length-bucketed training batches `(inputs, target_out, weights)`.

    `inputs` is `{"source": [b, s], "target_in": [b, t]}` (int32, 0-padded);
    weights are 1 at real target tokens. Pairs with more than `max_pieces`
    pieces on a side are skipped. A batch of bucket bound `L` holds
    `batch_tokens // L` pairs.
    """
    c = data_config
    start = eos_id(vocab)

    def generate():
        for source, target in encoded_pairs(pairs_factory_(), vocab):
            if len(source) <= c.max_pieces and len(target) <= c.max_pieces:
                yield np.asarray(source, np.int32), np.asarray(target, np.int32)

    spec = tf.TensorSpec([None], tf.int32)
    ds = tf.data.Dataset.from_generator(generate, output_signature=(spec, spec))
    if repeat:
        ds = ds.repeat()
    ds = ds.shuffle(c.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda s, t: _example(s, t, start))
    bounds = bucket_boundaries(c.max_pieces)
    sizes = [max(1, c.batch_tokens // (b - 1)) for b in bounds]
    ds = ds.bucket_by_sequence_length(
        lambda s, ti, to: tf.maximum(tf.shape(s)[0], tf.shape(to)[0]),
        bucket_boundaries=bounds[:-1],
        bucket_batch_sizes=sizes,
    )
    return ds.map(_batch_layout).prefetch(tf.data.AUTOTUNE)


def pad(rows):
    """Rows of ids as one 0-padded int32 `[len(rows), longest]` array."""
    width = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def evaluation_batches(pairs, vocab, batch_size):
    """Every pair once, in order: `(inputs, target_out, weights)` NumPy batches."""
    start = eos_id(vocab)
    encoded = encoded_pairs(pairs, vocab)
    while chunk := list(itertools.islice(encoded, batch_size)):
        sources = pad([s for s, _ in chunk])
        target_out = pad([t for _, t in chunk])
        target_in = pad([[start] + t[:-1] for _, t in chunk])
        weights = (target_out != 0).astype(np.float32)
        yield {"source": sources, "target_in": target_in}, target_out, weights


def length_sorted_batches(rows, batch_size):
    """`(indices, padded)` batches of `rows` taken in order of length.

    Decoding pads every sentence of a batch to its longest one; sorting
    first keeps the padding (and wasted decoder steps) small. The indices
    put the outputs back in the original order.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for begin in range(0, len(order), batch_size):
        indices = order[begin : begin + batch_size]
        yield indices, pad([rows[i] for i in indices])
