"""Streaming `tf.data` input for language models, and exact whole-set perplexity.

Text is read line by line and encoded in chunks, so a corpus never has to fit
in memory. Two ways to cut it into rows:

- `stream`: the corpus is one token stream (every line ends in `<eos>`, and
  an `<eos>` is put in front of the first line so the first word is
  predicted too); rows are fixed windows of `seq_len` inputs and their
  next-token targets. Each pass over the training data starts at a random
  offset, so window boundaries move between passes. This is the usual
  Penn Treebank setup. With `data.document_rows`, blank lines separate
  documents instead: each document is its own stream and no window crosses
  two (`document_windows`), so a row is one document's text.
- `sentences`: every line is its own row, `<eos>` in front as the start
  symbol and `<eos>` as the last target (the 1B Word setup, whose lines are
  shuffled sentences). Rows are grouped by length and batched so that a
  batch holds about `batch_tokens` tokens.

Every row comes with weights: 1 for a real target, 0 for padding. Every
token of an evaluation file is predicted exactly once, and perplexity is
`exp(sum NLL / count)` over the whole file.
"""

import itertools
import math

import keras
import numpy as np
import tensorflow as tf

CHUNK_LINES = 512


def encoded_lines(lines, vocab):
    """Ids of every line (each ending in `<eos>`), encoded `CHUNK_LINES` at a time."""
    lines = iter(lines)
    while chunk := list(itertools.islice(lines, CHUNK_LINES)):
        yield from vocab.encode_lines(chunk)


def _eos_id(vocab):
    return vocab.encode_lines([""])[0][-1]


def stream_windows(lines, vocab, seq_len, offset=0):
    """`(inputs, targets, weights)` windows of `seq_len` over the token stream.

    An `<eos>` is put in front of the first line, so its first word is
    predicted too. The last window is padded with id 0 and weight 0.
    `offset` tokens at the start of the stream are skipped (used to move
    window boundaries).
    """
    return id_windows(encoded_lines(lines, vocab), seq_len, offset, start=(_eos_id(vocab),))


def document_id_lines(lines, vocab):
    """Each non-blank line's ids (ending in `<eos>`), and `None` for each blank line.

    Blank lines (whitespace only) are document boundaries, not tokens:
    they are never encoded. Lines are encoded `CHUNK_LINES` at a time.
    """
    lines = iter(lines)
    while chunk := list(itertools.islice(lines, CHUNK_LINES)):
        text = [line for line in chunk if line.strip()]
        encoded = iter(vocab.encode_lines(text) if text else ())
        for line in chunk:
            yield next(encoded) if line.strip() else None


def document_windows(lines, vocab, seq_len):
    """`(inputs, targets, weights)` windows of `seq_len` that never cross a document.

    `data.document_rows: true`. Blank lines separate documents and are not
    tokens. Each document is its own token stream (`id_windows` with an
    `<eos>` in front as the start symbol, every line ending in `<eos>`), so
    every token of a document is predicted exactly once, from its own
    document only; a document's last window is padded with id 0 and weight
    0. Windows start at each document's start. A document is streamed,
    never held whole.

    Example (ids: a=3, b=4, `<eos>`=2; documents "a b" and "b"):

        stream 1: <eos> a b <eos>  -> inputs [2 3 4], targets [3 4 2]
        stream 2: <eos> b <eos>    -> inputs [2 4 0], targets [4 2 0], weights [1 1 0]
    """
    start = (_eos_id(vocab),)
    items = document_id_lines(lines, vocab)
    more = [True]

    def one_document():
        for ids in items:
            if ids is None:
                return
            yield ids
        more[0] = False

    while more[0]:
        # `id_windows` reads its document to the end before the next one starts.
        yield from id_windows(one_document(), seq_len, start=start)


def id_windows(id_lines, seq_len, offset=0, start=()):
    """`(inputs, targets, weights)` windows of `seq_len` over concatenated ids.

    The stream is `start` followed by every line's ids, one after the
    other; targets are the next token, so every token of the stream after
    its first is predicted exactly once. The last window is padded with id
    0 and weight 0. `offset` tokens at the start of the stream are skipped.
    """
    buffer = list(start)
    skip = offset
    for ids in id_lines:
        buffer.extend(ids)
        if skip:
            dropped = min(skip, len(buffer) - 1)
            del buffer[:dropped]
            skip -= dropped
        while len(buffer) > seq_len:
            window = np.asarray(buffer[: seq_len + 1], np.int32)
            yield window[:-1], window[1:], np.ones(seq_len, np.float32)
            del buffer[:seq_len]
    if len(buffer) > 1:
        n = len(buffer) - 1
        inputs, targets = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
        inputs[:n], targets[:n] = buffer[:-1], buffer[1:]
        weights = np.zeros(seq_len, np.float32)
        weights[:n] = 1.0
        yield inputs, targets, weights


def stream_arrays(id_lines, length):
    """`id_windows` of already encoded lines, stacked into NumPy arrays.

    The stream is every line's ids (each ending in `<eos>`) one after the
    other, with nothing in front: its first token is not predicted.

    Returns:
        `(inputs, targets, weights)`, each of shape `[n, length]`.

    Raises:
        ValueError: for a bad `length`, or a stream of fewer than two tokens.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"`length` must be an integer >= 1. Received: length={length!r}")
    windows = list(id_windows(id_lines, length))
    if not windows:
        raise ValueError("the corpus has fewer than two tokens")
    return tuple(np.stack(column) for column in zip(*windows, strict=True))


def sentence_rows(lines, vocab, max_len=None):
    """`(inputs, targets, weights)` per line: `<eos>` + ids[:-1] -> ids.

    With `max_len`, a longer line is cut to its first `max_len` targets.
    """
    eos = None
    for ids in encoded_lines(lines, vocab):
        if eos is None:
            eos = ids[-1]
        if max_len:
            ids = ids[:max_len]
        targets = np.asarray(ids, np.int32)
        inputs = np.concatenate([[eos], targets[:-1]]).astype(np.int32)
        yield inputs, targets, np.ones(len(ids), np.float32)


# Sentences-mode evaluation keeps every line whole, one line a row, so one
# pathological line (a 100k-word "sentence") would make a [batch, 100k, vocab]
# logits tensor. Longer lines are evaluated in consecutive segments of this
# many tokens instead: every token is still predicted and counted once; each
# segment starts from the token before it, with a fresh LSTM state.
MAX_EVAL_SENTENCE_TOKENS = 1024


def sentence_segments(lines, vocab, max_len=MAX_EVAL_SENTENCE_TOKENS, counts=None):
    """`sentence_rows` with every line of more than `max_len` tokens split into segments.

    `counts["segmented_lines"]` (when `counts` is a dict) counts the lines split.
    """
    for inputs, targets, weights in sentence_rows(lines, vocab):
        if len(targets) <= max_len:
            yield inputs, targets, weights
            continue
        if counts is not None:
            counts["segmented_lines"] = counts.get("segmented_lines", 0) + 1
        for start in range(0, len(targets), max_len):
            end = start + max_len
            yield inputs[start:end], targets[start:end], weights[start:end]


def _bucket_boundaries(max_len):
    bounds, b = [], 8
    while b < max_len:
        bounds.append(b)
        b *= 2
    return bounds


def training_dataset(lines_factory, vocab, data_config, seed=0, repeat=True):
    """The training `tf.data.Dataset` of `(inputs, targets, weights)` batches.

    Args:
        lines_factory: callable returning a fresh iterator of text lines
            (called once per pass over the data).
        vocab: a vocabulary with `encode_lines`.
        data_config: a `DataConfig` (`mode`, `seq_len`, `batch_size`,
            `batch_tokens`, `max_sentence_len`, `shuffle_buffer`).
        seed: int, seeds the shuffle and the window offsets.
        repeat: bool, cycle through the data forever.
    """
    c = data_config
    passes = itertools.count()

    if c.mode == "stream" and c.document_rows:

        def generate():
            yield from document_windows(lines_factory(), vocab, c.seq_len)

        shape = [c.seq_len]
    elif c.mode == "stream":

        def generate():
            rng = np.random.default_rng([seed, next(passes)])
            yield from stream_windows(lines_factory(), vocab, c.seq_len, int(rng.integers(c.seq_len)))

        shape = [c.seq_len]
    else:

        def generate():
            yield from sentence_rows(lines_factory(), vocab, c.max_sentence_len)

        shape = [None]
    spec = (
        tf.TensorSpec(shape, tf.int32),
        tf.TensorSpec(shape, tf.int32),
        tf.TensorSpec(shape, tf.float32),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec)
    if c.shuffle_buffer > 1:
        ds = ds.shuffle(c.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if c.mode == "stream":
        ds = ds.batch(c.batch_size, drop_remainder=repeat)
    else:
        bounds = _bucket_boundaries(c.max_sentence_len)
        sizes = [max(1, c.batch_tokens // b) for b in bounds + [c.max_sentence_len]]
        ds = ds.bucket_by_sequence_length(
            lambda x, y, w: tf.shape(x)[0], bounds, sizes, drop_remainder=False
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def evaluation_batches(lines, vocab, data_config, counts=None):
    """Batches `(inputs, targets, weights)` covering an evaluation text in order.

    Stream mode uses windows of `eval_seq_len` (or `seq_len`), with
    `document_rows` windows inside one document (`document_windows`); sentences mode
    keeps every sentence whole. Every batch has `eval_batch_size` rows (the
    last is padded with weight-0 rows) so a compiled step is traced once per
    row length. Sentences longer than `MAX_EVAL_SENTENCE_TOKENS` are split
    (`sentence_segments`, counted in `counts` when it is a dict).
    """
    c = data_config
    if c.mode == "stream" and c.document_rows:
        rows = document_windows(lines, vocab, c.eval_seq_len or c.seq_len)
    elif c.mode == "stream":
        rows = stream_windows(lines, vocab, c.eval_seq_len or c.seq_len)
    else:
        rows = sentence_segments(lines, vocab, counts=counts)
    while batch := list(itertools.islice(rows, c.eval_batch_size)):
        width = max(len(r[0]) for r in batch)
        out = [np.zeros((c.eval_batch_size, width), dt) for dt in (np.int32, np.int32, np.float32)]
        for i, row in enumerate(batch):
            for array, values in zip(out, row, strict=True):
                array[i, : len(values)] = values
        yield tuple(out)


def batch_nll(model, batches, with_routing=False):
    """Per batch: `(summed weighted NLL, summed weight, routings or None)`.

    The model's forward pass is compiled once per model and per
    `with_routing` (an eager LSTM steps through time in Python) and kept on
    the model, outside Keras's attribute tracking. With `with_routing=True`
    the model must accept `return_routing=True` (as `LanguageModel` does);
    routings is then its dict of MoE block name -> `Routing`, from the same
    forward pass as the likelihood.
    """

    def step(inputs, targets, weights):
        if with_routing:
            logits, routings = model(inputs, training=False, return_routing=True)
        else:
            logits, routings = model(inputs, training=False), None
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets, logits=tf.cast(logits, tf.float32)
        )
        summed = tf.reduce_sum(tf.cast(nll, tf.float64) * tf.cast(weights, tf.float64))
        return summed, routings

    if isinstance(model, keras.Layer):
        steps = model.__dict__.setdefault("_keras_moe_eval_steps", {})
        if with_routing not in steps:
            steps[with_routing] = tf.function(step, reduce_retracing=True)
        step = steps[with_routing]
    for inputs, targets, weights in batches:
        summed, routings = step(inputs, targets, weights)
        yield float(summed), float(np.sum(weights)), routings


def perplexity_result(total, count, words=None):
    """The perplexity dict of a summed NLL `total` over `count` predicted tokens.

    Args:
        total: summed negative log-likelihood (nats).
        count: predicted tokens (weights summed).
        words: optional number of words to normalise by instead of `count`
            (sub-word vocabularies): a per-word perplexity comparable
            across vocabularies.
    """
    if count == 0:
        raise ValueError("the evaluation data has no token to predict")
    units = float(words) if words else count
    loss = total / units
    per = "word" if words else "token"
    # A diverged model's loss overflows exp: its perplexity is infinite (a
    # value the training's divergence guard stops on), not an OverflowError.
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return {
        "perplexity": perplexity,
        "loss": loss,
        "tokens": int(count),
        "words": int(units),
        "convention": f"per {per}, <eos> counted, whole set: exp(sum NLL / {per}s)",
    }


def perplexity_from_batches(model, batches, words=None):
    """Whole-set perplexity `exp(sum NLL / count)` of `model` on `batches`.

    The negative log-likelihood is summed over every weighted target and
    divided once, so batches of unequal fill do not bias the result (as an
    average of per-batch perplexities would).

    Args:
        model: maps ids `[b, t]` to logits `[b, t, V]`.
        batches: iterable of `(inputs, targets, weights)`.
        words: optional number of words to normalise by instead of the
            number of predicted tokens (sub-word vocabularies): the result
            is then a per-word perplexity comparable across vocabularies.

    Returns:
        dict with `perplexity`, `loss` (NLL per normalising unit, nats),
        `tokens` (predicted tokens, `<eos>` included), `words` and
        `convention`.
    """
    total, count = 0.0, 0.0
    for summed, weight, _ in batch_nll(model, batches):
        total += summed
        count += weight
    return perplexity_result(total, count, words)


def array_perplexity(model, inputs, targets, weights, batch_size=64, words=None):
    """`perplexity_from_batches` of whole arrays (`stream_arrays`), `batch_size` rows at a time."""
    batches = (
        (inputs[i : i + batch_size], targets[i : i + batch_size], weights[i : i + batch_size])
        for i in range(0, len(inputs), batch_size)
    )
    return perplexity_from_batches(model, batches, words=words)
