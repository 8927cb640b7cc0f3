"""Word vocabularies, language-model windows and per-word perplexity."""

import collections
import json
import math

import numpy as np
import tensorflow as tf

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


class WordVocabulary:
    """Word-level vocabulary: id 0 padding, 1 `<unk>`, 2 `<eos>`, then by frequency.

    Args:
        words: list of words in id order (the first three must be
            `<pad>`, `<unk>`, `<eos>`).
    """

    def __init__(self, words):
        if list(words[:3]) != [PAD, UNK, EOS]:
            raise ValueError(f"a vocabulary must start with {PAD}, {UNK}, {EOS}; got {words[:3]}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, tokenized_lines, max_size=10000, min_count=1):
        """Most frequent words (ties broken alphabetically, so builds are stable)."""
        counts = collections.Counter(t for line in tokenized_lines for t in line)
        for special in (PAD, UNK, EOS):
            counts.pop(special, None)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        kept = [w for w, c in ranked if c >= min_count][: max(0, max_size - 3)]
        return cls([PAD, UNK, EOS] + kept)

    def __len__(self):
        return len(self.words)

    def encode(self, tokens):
        """Ids of `tokens` followed by `<eos>` (the benchmark's convention)."""
        unk = self.index[UNK]
        return [self.index.get(t, unk) for t in tokens] + [self.index[EOS]]

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.words, f, ensure_ascii=False)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))


def stream_windows(id_lines, length):
    """Cut the concatenated id stream into `[n, length]` inputs and targets.

    The stream is every line's ids (each ending in `<eos>`) one after the
    other; targets are the next token. The last window is padded with id 0
    and weight 0, so every token of the stream after the first is predicted
    exactly once.

    Returns:
        `(inputs, targets, weights)` as NumPy arrays of shape `[n, length]`.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"`length` must be an integer >= 1. Received: length={length!r}")
    stream = np.fromiter((i for ids in id_lines for i in ids), dtype=np.int32)
    if stream.size < 2:
        raise ValueError("the corpus has fewer than two tokens")
    inputs_flat, targets_flat = stream[:-1], stream[1:]
    n = math.ceil(inputs_flat.size / length)
    pad = n * length - inputs_flat.size
    inputs = np.concatenate([inputs_flat, np.zeros(pad, np.int32)]).reshape(n, length)
    targets = np.concatenate([targets_flat, np.zeros(pad, np.int32)]).reshape(n, length)
    weights = np.concatenate([np.ones(inputs_flat.size, np.float32), np.zeros(pad, np.float32)])
    return inputs, targets, weights.reshape(n, length)


def perplexity(model, inputs, targets, weights, batch_size=64, words=None):
    """Perplexity over a whole evaluation set: `exp(sum NLL / count)`.

    The negative log-likelihood is summed over every weighted token and
    divided once, so batches of unequal size do not bias the result (as an
    average of per-batch perplexities would).

    Args:
        model: maps ids `[b, t]` to logits `[b, t, V]`.
        inputs, targets, weights: arrays from `stream_windows`.
        batch_size: int.
        words: optional number of words to normalise by instead of the
            number of predicted tokens (for sub-word vocabularies).

    Returns:
        dict with `perplexity`, `loss` (mean NLL per normalising unit, nats),
        `tokens` (predicted tokens, `<eos>` included) and `words`.
    """
    total = 0.0
    count = 0.0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size], training=False)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets[start : start + batch_size], logits=tf.cast(logits, tf.float32)
        )
        w = weights[start : start + batch_size]
        total += float(tf.reduce_sum(nll * w))
        count += float(w.sum())
    units = float(words) if words else count
    loss = total / units
    return {
        "perplexity": math.exp(loss),
        "loss": loss,
        "tokens": int(count),
        "words": int(units),
        "convention": "per token of the vocabulary, <eos> counted, whole set, exp(sum NLL / count)",
    }
