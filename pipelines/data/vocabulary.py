"""Word-level vocabularies: the words of a corpus, by frequency, as ids.

The sub-word kind is `keras_moe.pipelines.data.wordpiece` (which takes its
reserved tokens from here); a run directory's vocabulary, whichever kind,
is read by `keras_moe.pipelines.training.rundir.RunDir.load_vocabulary`.
"""

import collections
import json
import os

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
