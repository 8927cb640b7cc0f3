"""Learn a WordPiece vocabulary with a compiled learner (HuggingFace `tokenizers`).

TensorFlow Text's own learner (`wordpiece_tokenizer_learner_lib`) is pure
Python: on 100k Gutenberg paragraphs it ran for more than 17 minutes without
finishing. `tokenizers` counts words and learns the pieces in Rust, on every
core, so a 32k vocabulary from a million paragraphs takes a minute or two
(`benchmarks/vocab_learning.py`).

Only the *learning* moves to `tokenizers`. The vocabulary is then a plain
token list that `WordPieceVocabulary` applies in the TensorFlow graph with
`tensorflow_text` (longest match first, `##` on every piece after the
first), so a SavedModel export stays strings in, strings out, and the
`wordpiece.txt` file format is unchanged. The two agree on the split of a
word because both apply WordPiece's greedy longest-match rule to the same
token list, with the words cut at whitespace only (`WhitespaceSplit`: PTB's
`<unk>` or `u.s.` stay one word, as `WordVocabulary` has them).

The trainer builds the pieces by merging (the BPE-style WordPiece learner
of `tokenizers`); every character is in the vocabulary as it occurs in the
training words (alone where it starts a word, as `##c` where it continues
one), so a training word never becomes `<unk>` unless it holds a character
outside `limit_alphabet`.
"""

import itertools
import sys
import time

# Lines handed to the Rust side at once: large enough that Python's share
# is small, small enough that progress is shown often.
BATCH_LINES = 10_000


class _Progress:
    """Counts lines as they stream past and prints a line every `every` seconds."""

    def __init__(self, stream, every, clock=time.monotonic):
        self.stream = stream
        self.every = every
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.lines = 0

    def batches(self, lines):
        iterator = iter(lines)
        while batch := list(itertools.islice(iterator, BATCH_LINES)):
            self.lines += len(batch)
            now = self.clock()
            if self.stream is not None and now - self.last >= self.every:
                self.last = now
                rate = self.lines / max(now - self.start, 1e-9)
                print(f"vocabulary: read {self.lines:,} lines ({rate:,.0f} lines/s)",
                      file=self.stream, flush=True)
            yield batch


def learn_tokens(lines, vocab_size, reserved, *, max_lines=1_000_000, min_frequency=2,
                 limit_alphabet=1000, joiner="##", progress=sys.stderr, progress_every=10.0):
    """The tokens of a WordPiece vocabulary learned from `lines`, in id order.

    Args:
        lines: iterable of text lines; read lazily, at most `max_lines`.
        vocab_size: the vocabulary's size, `reserved` included. The learner
            stops merging when it reaches it, or when no pair of pieces is
            seen `min_frequency` times (then the vocabulary is smaller).
        reserved: tokens given the first ids, in order (e.g. `<pad>`,
            `<unk>`, `<eos>`); the second is the unknown token.
        max_lines: cap on the lines read.
        min_frequency: pieces merged from pairs seen fewer times are not learned.
        limit_alphabet: keep at most this many distinct characters (the
            most frequent); words with another character become `<unk>`.
        joiner: the prefix of pieces that continue a word.
        progress: a text stream for progress lines (None: silent).
        progress_every: seconds between progress lines.

    Returns:
        list of str: `reserved`, then the alphabet and the learned pieces.

    Raises:
        ValueError: for a bad argument, or when the lines hold no word.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    reserved = list(reserved)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) \
            or vocab_size <= len(reserved):
        raise ValueError(
            f"`vocab_size` must be an integer > {len(reserved)}. Received: vocab_size={vocab_size!r}"
        )
    if not isinstance(max_lines, int) or max_lines < 1:
        raise ValueError(f"`max_lines` must be an integer >= 1. Received: max_lines={max_lines!r}")
    if len(reserved) < 2:
        raise ValueError(f"`reserved` must hold at least padding and unknown. Received: {reserved}")
    tokenizer = Tokenizer(models.WordPiece(unk_token=reserved[1],
                                           continuing_subword_prefix=joiner))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=reserved,
        limit_alphabet=limit_alphabet, continuing_subword_prefix=joiner, show_progress=False,
    )
    counter = _Progress(progress, progress_every)
    tokenizer.train_from_iterator(
        counter.batches(itertools.islice(iter(lines), max_lines)), trainer=trainer
    )
    vocab = tokenizer.get_vocab()
    learned = sorted(vocab, key=vocab.get)
    if learned[: len(reserved)] != reserved or len(learned) == len(reserved):
        raise ValueError("no word to learn a WordPiece vocabulary from")
    # The trainer numbers tokens of equal standing in the order of a Rust hash
    # map, which changes from process to process (the set it learns does not:
    # checked on 20k Gutenberg paragraphs, 3k tokens, across processes). The
    # ids are put in a canonical order, so that every worker of a multi-worker
    # run, or a rerun, gets the same vocabulary file; WordPiece's longest-match
    # split does not depend on the order.
    tokens = reserved + sorted(learned[len(reserved):])
    if progress is not None:
        seconds = time.monotonic() - counter.start
        print(f"vocabulary: {len(tokens):,} tokens from {counter.lines:,} lines "
              f"in {seconds:.1f} s", file=progress, flush=True)
    return tokens
