"""Word vocabularies, language-model windows and per-word perplexity."""

import collections
import json
import math
import os

import numpy as np

from keras_moe.pipelines.data.lm_corpora import count_words

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
FILENAME = "vocab.json"


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

    def encode_line(self, line):
        """Ids of a line's whitespace words followed by `<eos>`."""
        return self.encode(line.split())

    def encode_lines(self, lines):
        """`encode_line` of each line: a list of `list[int]`."""
        return [self.encode(line.split()) for line in lines]

    def words_in(self, line):
        """Words of a line for per-word perplexity (`<eos>` counted)."""
        return count_words(line)

    def decode(self, ids):
        """Text of ids: words joined by spaces, `<eos>` ends a line, `<pad>` skipped."""
        lines, words = [], []
        for i in ids:
            word = self.words[int(i)]
            if word == EOS:
                lines.append(" ".join(words))
                words = []
            elif word != PAD:
                words.append(word)
        if words:
            lines.append(" ".join(words))
        return "\n".join(lines)

    def __eq__(self, other):
        return isinstance(other, WordVocabulary) and self.words == other.words

    __hash__ = None

    def save(self, path):
        """Write the words in id order to `path` as a JSON list."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.words, f, ensure_ascii=False)

    def save_to(self, run_dir):
        """Write `run_dir/vocab.json` (creating `run_dir`); returns its path."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, FILENAME)
        self.save(path)
        return path

    @classmethod
    def load(cls, path):
        """Read a file written by `save`.

        Raises:
            FileNotFoundError: naming the file.
            ValueError: naming the file when it is not a vocabulary.
        """
        try:
            with open(path, encoding="utf-8") as f:
                words = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a vocabulary file ({error})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{path}: not a vocabulary file (expected a JSON list of strings)")
        try:
            return cls(words)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def load_vocabulary(run_dir):
    """The vocabulary saved in a run directory, whichever kind it is.

    `vocab.json` gives a `WordVocabulary`, `wordpiece.txt` a
    `WordPieceVocabulary`; both share `encode_line`, `encode_lines`,
    `words_in`, `decode` and `len`.

    Raises:
        FileNotFoundError: naming `run_dir` when it holds neither file.
        ValueError: naming `run_dir` when it holds both (which one the
            model was trained with cannot be told).
    """
    from keras_moe.pipelines.data import wordpiece

    word_path = os.path.join(run_dir, FILENAME)
    piece_path = os.path.join(run_dir, wordpiece.FILENAME)
    found = [p for p in (word_path, piece_path) if os.path.isfile(p)]
    if len(found) == 2:
        raise ValueError(f"{run_dir}: holds both {FILENAME} and {wordpiece.FILENAME}; keep one")
    if not found:
        raise FileNotFoundError(
            f"no vocabulary in {run_dir} (expected {FILENAME} or {wordpiece.FILENAME})"
        )
    if found[0] == word_path:
        return WordVocabulary.load(word_path)
    return wordpiece.WordPieceVocabulary.load(piece_path)


def check_vocabulary_matches(vocab, vocab_size, source):
    """Raise unless `vocab` has exactly `vocab_size` entries; returns `vocab`.

    Args:
        vocab: any vocabulary with `len`.
        vocab_size: the model's vocabulary size (its embedding rows).
        source: what to name in the error: the vocabulary file or run.

    Raises:
        ValueError: "<source>: the vocabulary has N entries but the model
            expects M".

    Example:

    >>> check_vocabulary_matches(WordVocabulary([PAD, UNK, EOS, "a"]), 5, "run/vocab.json")
    Traceback (most recent call last):
    ...
    ValueError: run/vocab.json: the vocabulary has 4 entries but the model expects 5
    """
    if len(vocab) != vocab_size:
        raise ValueError(
            f"{source}: the vocabulary has {len(vocab)} entries but the model expects {vocab_size}"
        )
    return vocab


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
    from keras_moe.pipelines.lm.inputs import perplexity_from_batches

    batches = (
        (inputs[i : i + batch_size], targets[i : i + batch_size], weights[i : i + batch_size])
        for i in range(0, len(inputs), batch_size)
    )
    return perplexity_from_batches(model, batches, words=words)
