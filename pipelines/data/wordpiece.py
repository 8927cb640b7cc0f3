"""WordPiece sub-word vocabularies, learned and applied with TensorFlow Text.

Words are whitespace tokens, exactly as for `WordVocabulary`: the corpora are
tokenized already, so a word such as PTB's `<unk>`, `'s` or `u.s.` stays one
word and is never cut at its punctuation. That is why learning calls the two
halves of TensorFlow Text's `bert_vocab_from_dataset` (`count_words` over a
`tf.data` dataset, then `learn`) on whitespace-split lines instead of calling
it whole: it would first split words with BERT's `BasicTokenizer`, which cuts
`<unk>` into `<`, `unk`, `>`, and the vocabulary would then not fit the words
it is applied to.
"""

import itertools
import os
import time
import warnings

import numpy as np
import tensorflow as tf

from keras_moe.pipelines import progress
from keras_moe.pipelines.config import VOCAB_LEARNERS, check_learner
from keras_moe.pipelines.data import wordpiece_learner
from keras_moe.pipelines.data.lm_corpora import count_words
from keras_moe.pipelines.data.vocabulary import EOS, PAD, UNK

FILENAME = "wordpiece.txt"
# The learners `WordPieceVocabulary.learn` can use.
LEARNERS = VOCAB_LEARNERS
RESERVED = (PAD, UNK, EOS)
JOINER = "##"
# Lines read for learning. The 1B Word training shards are shuffled already,
# so their first million lines (about 25M words) are a fair sample; PTB and
# WikiText-103 fit whole. Counting is cheap; the learner's time grows with
# the number of distinct words.
DEFAULT_MAX_LINES = 1_000_000
# Longer words become one `<unk>` (TensorFlow Text's default limit).
MAX_BYTES_PER_WORD = 100
_CHUNK_LINES = 4096


class WordPieceVocabulary:
    """WordPiece vocabulary: id 0 `<pad>`, 1 `<unk>`, 2 `<eos>`, then sub-words.

    A word is split greedily into the longest pieces in the vocabulary
    (WordPiece's longest-match-first); pieces after the first carry the
    `##` prefix. A word that cannot be split (a character outside the
    learned alphabet, or longer than 100 bytes) becomes one `<unk>`.
    Applied with `tensorflow_text.FastWordpieceTokenizer`; should that fail
    to build on a vocabulary, `tensorflow_text.WordpieceTokenizer` (same
    algorithm, same ids) is used and a warning says so. `tokenizer_name`
    tells which one is in use once something was encoded.

    Args:
        tokens: the tokens in id order; the first three must be `<pad>`,
            `<unk>`, `<eos>`; no duplicates, no empty token, no whitespace.

    Example:

    >>> vocab = WordPieceVocabulary(["<pad>", "<unk>", "<eos>", "c", "a", "t", "##a", "##t"])
    >>> vocab.encode_line("cat")
    [3, 6, 7, 2]
    >>> vocab.decode([3, 6, 7, 2])
    'cat'
    """

    def __init__(self, tokens):
        tokens = list(tokens)
        if tokens[:3] != list(RESERVED):
            raise ValueError(
                f"a vocabulary must start with {PAD}, {UNK}, {EOS}; got {tokens[:3]}"
            )
        for token in tokens:
            if not token or token != "".join(token.split()):
                raise ValueError(f"a WordPiece token must be non-empty without spaces: {token!r}")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        if len(self.index) != len(tokens):
            seen = set()
            duplicate = next(t for t in tokens if t in seen or seen.add(t))
            raise ValueError(f"the vocabulary holds {duplicate!r} twice")
        self.tokenizer_name = None
        self._tokenizer = None

    @classmethod
    def learn(cls, lines, vocab_size, max_lines=DEFAULT_MAX_LINES, learner="tensorflow_text",
              **learn_params):
        """Learn a vocabulary of at most `vocab_size` tokens from text lines.

        Streams: only the first `max_lines` lines are read (a generator is
        consumed no further), in chunks, into word counts; the learner then
        works on the counts of distinct words.

        Args:
            lines: iterable of text lines (e.g. `lm_corpora.iter_lines`).
            vocab_size: the largest vocabulary wanted, the three reserved
                tokens included. The learner aims for 95-100% of it; when
                its search overshoots, the rarest multi-character tokens
                are dropped (never a reserved or single-character one).
            max_lines: cap on the lines sampled for learning.
            learner: `"tensorflow_text"` (TensorFlow Text's Python learner)
                or `"tokenizers"` (HuggingFace's compiled learner, many
                times faster on large text: `wordpiece_learner`). Either
                way the vocabulary is applied with tensorflow-text.
            **learn_params: passed to the learner: for TensorFlow Text's
                `wordpiece_tokenizer_learner_lib.learn`, e.g.
                `lower_thresh` (default 10: pieces seen fewer times are
                never kept whole), `num_iterations`, `max_unique_chars`.

        Returns:
            A `WordPieceVocabulary`.

        Raises:
            ValueError: for a bad `vocab_size` or `max_lines`, when the lines
                hold no word, or when the reserved tokens and the alphabet
                alone exceed `vocab_size`.
        """
        from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib

        check_learner(learner, "learner")
        if not isinstance(vocab_size, int) or vocab_size <= len(RESERVED):
            raise ValueError(
                f"`vocab_size` must be an integer > 3. Received: vocab_size={vocab_size!r}"
            )
        if not isinstance(max_lines, int) or max_lines < 1:
            raise ValueError(
                f"`max_lines` must be an integer >= 1. Received: max_lines={max_lines!r}"
            )
        if learner == "tokenizers":
            tokens = wordpiece_learner.learn_tokens(
                lines, vocab_size, RESERVED, max_lines=max_lines, **learn_params)
            return cls(tokens)
        sample = itertools.islice(iter(lines), max_lines)
        counting = progress.Progress("vocabulary: count words", "lines")

        def chunks():
            while chunk := list(itertools.islice(sample, _CHUNK_LINES)):
                words = [w for line in chunk for w in line.split()]
                counting.update(len(chunk), words=len(words))
                yield np.array(words, dtype=object)

        dataset = tf.data.Dataset.from_generator(
            chunks, output_signature=tf.TensorSpec([None], tf.string)
        )
        try:
            counts = wordpiece_tokenizer_learner_lib.count_words(dataset)
        except StopIteration:  # the learner's way of saying "no word at all"
            raise ValueError("no word to learn a WordPiece vocabulary from") from None
        counting.done()
        # The learner reports nothing while it works: say what it works on,
        # then how long it took.
        progress.emit(f"[vocabulary: learn pieces] {len(counts):,} distinct words, "
                      f"{vocab_size:,} tokens wanted (tensorflow_text learner)")
        started = time.monotonic()
        learned = wordpiece_tokenizer_learner_lib.learn(
            counts, vocab_size, list(RESERVED), **learn_params
        )
        progress.emit(f"[vocabulary: learn pieces] done in {time.monotonic() - started:.1f} s")
        return cls(_fit_to_size(learned, vocab_size))

    def __len__(self):
        return len(self.tokens)

    def __eq__(self, other):
        return isinstance(other, WordPieceVocabulary) and self.tokens == other.tokens

    __hash__ = None

    def __repr__(self):
        return f"WordPieceVocabulary({len(self)} tokens)"

    def _tokenize(self, words):
        """Ragged `[len(words), pieces]` int32 ids of a 1-D string tensor of words."""
        if self._tokenizer is None:
            self._tokenizer, self.tokenizer_name = self.build_tokenizer()
        return tf.cast(self._tokenizer.tokenize(words), tf.int32)

    def build_tokenizer(self):
        """A new TensorFlow Text tokenizer of this vocabulary, and its class name.

        `FastWordpieceTokenizer` (int32 ids); should it fail to build, the
        reference `WordpieceTokenizer` over a lookup table (int64 ids, the
        same ones) with a warning. `encode_lines` tokenizes with one of
        these; an exported graph that must cut words into the same pieces
        tracks its own (`keras_moe.pipelines.translate.export`).

        Returns:
            `(tokenizer, name)`: a tokenizer whose `tokenize` maps a 1-D
            string tensor of words to ragged piece ids, and
            `"FastWordpieceTokenizer"` or `"WordpieceTokenizer"`.
        """
        import tensorflow_text as text

        try:
            fast = text.FastWordpieceTokenizer(
                vocab=self.tokens,
                suffix_indicator=JOINER,
                max_bytes_per_word=MAX_BYTES_PER_WORD,
                token_out_type=tf.int32,
                unknown_token=UNK,
                no_pretokenization=True,
            )
            return fast, "FastWordpieceTokenizer"
        except Exception as error:  # any failure: fall back to the reference op
            warnings.warn(
                f"FastWordpieceTokenizer failed ({error}); using WordpieceTokenizer",
                stacklevel=3,
            )
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self.tokens, tf.string),
                tf.range(len(self.tokens), dtype=tf.int64),
            ),
            default_value=self.index[UNK],
        )
        slow = text.WordpieceTokenizer(
            table,
            suffix_indicator=JOINER,
            max_bytes_per_word=MAX_BYTES_PER_WORD,
            token_out_type=tf.int64,
            unknown_token=UNK,
        )
        return slow, "WordpieceTokenizer"

    def encode_lines(self, lines, batch_size=_CHUNK_LINES):
        """Ids of each line's whitespace words' pieces, each followed by `<eos>`.

        Lines are tokenized `batch_size` at a time in one TensorFlow call.

        Returns:
            A list with one `list[int]` per line.
        """
        eos = self.index[EOS]
        encoded = []
        lines = iter(lines)
        while batch := list(itertools.islice(lines, batch_size)):
            words = [line.split() for line in batch]
            flat = [w for line_words in words for w in line_words]
            # Piece boundaries per word, then per line through the word offsets.
            pieces = self._tokenize(tf.constant(flat, tf.string, shape=[len(flat)]))
            values = pieces.flat_values.numpy()
            word_starts = pieces.row_splits.numpy()
            line_ends = np.cumsum([len(w) for w in words])
            start = 0
            for end in line_ends:
                encoded.append(values[word_starts[start] : word_starts[end]].tolist() + [eos])
                start = end
        return encoded

    def encode_line(self, line):
        """Ids of one line (see `encode_lines`)."""
        return self.encode_lines([line])[0]

    def encode(self, words):
        """Ids of a list of words followed by `<eos>` (as `WordVocabulary.encode`)."""
        return self.encode_line(" ".join(words))

    def words_in(self, line):
        """Words of a line for per-word perplexity (`count_words`), not pieces."""
        return count_words(line)

    def decode(self, ids):
        """Text of ids: `##` pieces joined to their word, `<eos>` ends a line.

        `<pad>` is skipped and `<unk>` is written as `<unk>`.

        Raises:
            ValueError: for an id outside the vocabulary.
        """
        lines, words = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"id {i} is outside the vocabulary of {len(self.tokens)} tokens")
            token = self.tokens[i]
            if token == PAD:
                continue
            if token == EOS:
                lines.append(" ".join(words))
                words = []
            elif token.startswith(JOINER) and len(token) > len(JOINER) and words:
                words[-1] += token[len(JOINER) :]
            else:
                words.append(token)
        if words:
            lines.append(" ".join(words))
        return "\n".join(lines)

    def save(self, run_dir):
        """Write `run_dir/wordpiece.txt`, one token per line; returns its path."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, FILENAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(token + "\n" for token in self.tokens))
        return path

    save_to = save  # the run-directory name shared with `WordVocabulary.save_to`

    @classmethod
    def load(cls, run_dir):
        """Read `run_dir/wordpiece.txt` (`run_dir` may also be the file itself).

        Raises:
            FileNotFoundError: naming the missing file.
            ValueError: naming the file when it is not UTF-8 or not a
                vocabulary.
        """
        path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"WordPiece vocabulary not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                tokens = f.read().split("\n")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not valid UTF-8 ({error.reason})") from None
        if tokens and tokens[-1] == "":
            tokens.pop()
        try:
            return cls(tokens)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _fit_to_size(tokens, vocab_size):
    """Cut the learner's list to `vocab_size`, dropping its rarest long tokens.

    The learner lists reserved tokens, then single characters, then the
    rest by count; `##c` suffix characters are needed to split any word, so
    only multi-character tokens are dropped, from the rare end.
    """
    if len(tokens) <= vocab_size:
        return tokens
    alphabet = {t for t in tokens if len(t) == 1}
    alphabet |= {JOINER + c for c in alphabet}
    keep = {t for t in tokens if t in RESERVED or t in alphabet}
    if len(keep) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {len(keep)} reserved and single-character "
            "tokens the text needs; raise vocab_size or pass a smaller max_unique_chars"
        )
    others = [t for t in tokens if t not in keep][: vocab_size - len(keep)]
    kept = keep | set(others)
    return [t for t in tokens if t in kept]
