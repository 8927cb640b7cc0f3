"""How long learning a WordPiece vocabulary takes, compiled learner against TensorFlow Text's.

Reads the first `--lines` paragraphs of the Gutenberg training shards
(`../shared/data/gutenberg/train-*.txt.gz`, in shard order) and learns a
`--vocab-size` vocabulary with `keras_moe.pipelines.data.wordpiece_learner`
(HuggingFace `tokenizers`, Rust). For reference it also times TensorFlow
Text's Python learner on `--reference-lines` paragraphs (it does not finish
on a million: more than 17 minutes on 100k). The time includes reading and
decompressing the text. Then both vocabularies are applied with
`WordPieceVocabulary` (tensorflow-text) to the first 20,000 paragraphs of
`valid.txt.gz`, and the pieces per word and the share of `<unk>` are
reported, so speed is not bought with a worse vocabulary.

Usage:
    python benchmarks/vocab_learning.py [--lines 1000000] [--vocab-size 32000]
        [--reference-lines 20000] [--data ../shared/data/gutenberg]
        [--out benchmarks/results/vocab_learning.json]

The issue's target: 32k tokens from 1M paragraphs in under 2 minutes on 2 cores.
"""

import argparse
import glob
import gzip
import itertools
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_MOE_QUIET_START", "1")  # no C++ start-up lines (keras_moe/_startup.py)

from keras_moe.pipelines.data import wordpiece_learner  # noqa: E402
from keras_moe.pipelines.data.wordpiece import RESERVED, WordPieceVocabulary  # noqa: E402


def paragraphs(data, limit):
    """The first `limit` non-empty lines of the training shards, in shard order."""
    def lines():
        for path in sorted(glob.glob(os.path.join(data, "train-*.txt.gz"))):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line
    return itertools.islice(lines(), limit)


def quality(vocab, data, lines=20_000):
    """Pieces per word and the fraction of `<unk>` pieces on validation paragraphs."""
    words = pieces = unknown = 0
    with gzip.open(os.path.join(data, "valid.txt.gz"), "rt", encoding="utf-8") as f:
        for line in itertools.islice((x for x in f if x.strip()), lines):
            ids = vocab.encode_line(line)[:-1]  # without the end of line
            words += len(line.split())
            pieces += len(ids)
            unknown += sum(1 for i in ids if i == 1)
    return {"pieces_per_word": round(pieces / max(words, 1), 4),
            "unk_fraction": round(unknown / max(pieces, 1), 6), "valid_words": words}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "gutenberg"))
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--reference-lines", type=int, default=20_000,
                        help="paragraphs for TensorFlow Text's learner (0: skip it)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "vocab_learning.json"))
    args = parser.parse_args(argv)
    if not glob.glob(os.path.join(args.data, "train-*.txt.gz")):
        parser.error(f"--data {args.data}: no train-*.txt.gz shards there")
    rows = []

    start = time.monotonic()
    tokens = wordpiece_learner.learn_tokens(
        paragraphs(args.data, args.lines), args.vocab_size, RESERVED, max_lines=args.lines)
    seconds = time.monotonic() - start
    rows.append({"learner": "tokenizers (Rust)", "lines": args.lines, "tokens": len(tokens),
                 "seconds": round(seconds, 1),
                 **quality(WordPieceVocabulary(tokens), args.data)})

    if args.reference_lines:
        start = time.monotonic()
        reference = WordPieceVocabulary.learn(
            paragraphs(args.data, args.reference_lines), args.vocab_size,
            max_lines=args.reference_lines)
        seconds = time.monotonic() - start
        rows.append({"learner": "tensorflow-text (Python)", "lines": args.reference_lines,
                     "tokens": len(reference), "seconds": round(seconds, 1),
                     **quality(reference, args.data)})

    print(f"\n{'learner':<26}{'lines':>11}{'tokens':>8}{'seconds':>9}"
          f"{'pieces/word':>13}{'<unk>':>10}")
    for r in rows:
        print(f"{r['learner']:<26}{r['lines']:>11,}{r['tokens']:>8,}{r['seconds']:>9.1f}"
              f"{r['pieces_per_word']:>13.3f}{r['unk_fraction']:>10.2%}")
    result = {"cores": os.cpu_count(), "platform": platform.platform(),
              "vocab_size": args.vocab_size, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
