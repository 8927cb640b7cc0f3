"""Training and decoding throughput of a translation preset against its dense baseline.

For each pair (an MoE preset and its compute-matched dense baseline) the
script builds both in the same process, with the same vocabulary, and runs
them on the same synthetic sentence pairs (throughput does not depend on
what the words are, only on how many there are): source lengths uniform in
`[--min-len, --max-len]` tokens, `<eos>` included, and each target
`0.8` to `1.3` times its source, padded per batch. It reports

- training target tokens per second: real (non-padding) target tokens of
  one `fit` over `--steps` batches, median over `--repeats` fits after a
  warm-up, compiled as the language-model pipeline compiles (Adam with the
  warm-up schedule and clipping, sparse cross-entropy weighted by the
  target mask, so padding carries no loss);
- decoding sentences per second, greedy and beam search (`--beam-width`,
  GNMT's alpha 0.6 and beta 0.2), over `--decode-sentences` sources in
  batches of `--batch-size`, median over `--repeats` passes after a warm-up.

Decoding is timed before training, with the initial weights: after even
a few training steps on random words a model learns that `<eos>` is the
most frequent token and stops every hypothesis at once. An untrained
model rarely produces `<eos>`, so nearly every hypothesis runs to its
length limit, `floor(--decode-length-ratio * source length)` tokens
(`min_extra=0`); `*_mean_output_tokens` shows how close. The default
ratio 1.2 is about the length of a real translation, so the decoding
speeds are those of outputs of realistic length, and the MoE and dense
models decode (nearly) the same number of steps. Ratios are MoE / dense
(below 1: the MoE is slower).

Usage:
    python benchmarks/translate_throughput.py [--quick]
        [--pairs cpu-gnmt-moe-16:cpu-gnmt-dense ...] [--vocab-size 8192]
        [--batch-size 64] [--min-len 10] [--max-len 30] [--steps 10]
        [--repeats 3] [--decode-sentences 128] [--beam-width 4]
        [--out benchmarks/results/translate_throughput.json]

`--quick` uses a tiny width, short sentences and few steps (a smoke test).
Results print as a table and are written as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_MOE_QUIET_START", "1")  # no C++ start-up lines (keras_moe/_startup.py)
# Kept, not handed back to the OS: see docs/performance.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras_moe  # noqa: E402, F401, I001 (before keras: with the variable set, it starts TensorFlow quietly)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_moe.models import translation_presets  # noqa: E402
from keras_moe.models.decoding import beam_search, greedy_decode  # noqa: E402
from keras_moe.models.training import WarmupInverseSqrt  # noqa: E402

DEFAULT_PAIRS = ("cpu-gnmt-moe-16:cpu-gnmt-dense",)
# The shared vocabulary's <bos> and <eos> are one id (the target input
# starts with <eos>, as in the language-model data).
BOS_ID = EOS_ID = 2
FIRST_WORD_ID = 3  # 0 padding, 1 <unk>, 2 <eos>


def synthetic_batches(args, sentences, seed):
    """`sentences // batch_size` batches `(source, target_in, target_out)`, int32, padded.

    Every token is a random word id; a sentence of `n` tokens is `n - 1`
    words and `<eos>`. `target_in` is `<bos>` then the target's words,
    `target_out` its words then `<eos>`.
    """
    rng = np.random.default_rng(seed)
    source_lengths = rng.integers(args.min_len, args.max_len + 1, size=sentences)
    target_lengths = np.maximum(
        np.rint(source_lengths * rng.uniform(0.8, 1.3, size=sentences)), 2
    ).astype(int)

    def words(n):
        return rng.integers(FIRST_WORD_ID, args.vocab_size, size=n - 1).tolist()

    sources, targets_in, targets_out = [], [], []
    for s, t in zip(source_lengths, target_lengths, strict=True):
        sources.append(words(s) + [EOS_ID])
        target = words(t)
        targets_in.append([BOS_ID] + target)
        targets_out.append(target + [EOS_ID])
    ds = tf.data.Dataset.from_tensor_slices(
        tuple(tf.ragged.constant(x, dtype=tf.int32) for x in (sources, targets_in, targets_out))
    )
    ds = ds.batch(args.batch_size, drop_remainder=True)
    return ds.map(lambda *parts: tuple(p.to_tensor() for p in parts)).cache()


def measure_training(model, args):
    """Median training target tokens per second over `args.repeats` fits."""
    model.compile(
        optimizer=keras.optimizers.Adam(WarmupInverseSqrt(1e-3, 100), clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
    )
    batches = synthetic_batches(args, args.batch_size * args.steps, seed=0)
    ds = batches.map(lambda s, t_in, t_out: (
        (s, t_in), t_out, tf.cast(tf.not_equal(t_out, 0), tf.float32)
    ))
    tokens = sum(int(np.count_nonzero(t_out)) for _, _, t_out in batches)  # fills the cache
    model.fit(ds.take(2), epochs=1, verbose=0, shuffle=False)  # trace and warm up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0, shuffle=False)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "train_tokens_per_second": tokens / seconds,
        "train_step_seconds": seconds / args.steps,
        "train_target_tokens": tokens,
    }


def measure_decoding(model, args, decode, **options):
    """Median sentences and output tokens per second of `decode` over `args.repeats` passes."""
    sources = [s for s, _, _ in synthetic_batches(args, args.decode_sentences, seed=1)]
    sentences = len(sources) * args.batch_size

    def run_all():
        generated = 0
        for source in sources:
            ids, _ = decode(model, source, bos_id=BOS_ID, eos_id=EOS_ID,
                            max_length_ratio=args.decode_length_ratio, min_extra=0, **options)
            generated += int(np.count_nonzero(ids.numpy()))
        return generated

    # Trace, then retrace once for a second source width (the decoders
    # relax their shapes after it).
    for source in sources[:2]:
        decode(model, source, bos_id=BOS_ID, eos_id=EOS_ID,
               max_length_ratio=args.decode_length_ratio, min_extra=0, **options)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generated = run_all()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "sentences_per_second": sentences / seconds,
        "tokens_per_second": generated / seconds,
        "mean_output_tokens": generated / sentences,
    }


def measure(preset, args, overrides):
    """Training and decoding throughput of `preset`, with its costs."""
    keras.utils.set_random_seed(0)
    model = translation_presets.build_translation_model(preset, args.vocab_size, **overrides)
    result = {"preset": preset}
    # Decoding first, with the initial weights: a few steps of training on
    # random words teach that <eos> is the most frequent token, and every
    # hypothesis would stop after one step.
    for name, decode, options in (
        ("greedy", greedy_decode, {}),
        ("beam", beam_search, {"beam_width": args.beam_width}),
    ):
        for key, value in measure_decoding(model, args, decode, **options).items():
            result[f"{name}_{key}"] = value
    result.update(measure_training(model, args))
    costs = translation_presets.costs(model.get_config())
    result["ops_per_timestep"] = costs["ops_per_timestep"]
    result["params"] = costs["params"]
    return result


RATIO_KEYS = (
    "train_tokens_per_second", "greedy_sentences_per_second", "beam_sentences_per_second",
)


def markdown_table(rows, beam_width):
    lines = [
        f"| preset | train tokens/s | greedy sent/s | beam-{beam_width} sent/s | Mops/timestep |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        for side in ("moe", "dense"):
            m = r[side]
            lines.append(
                f"| {m['preset']} | {m['train_tokens_per_second']:.0f} | "
                f"{m['greedy_sentences_per_second']:.1f} | "
                f"{m['beam_sentences_per_second']:.1f} | {m['ops_per_timestep'] / 1e6:.2f} |"
            )
        q = r["ratios_moe_over_dense"]
        lines.append(
            f"| MoE/dense | {q['train_tokens_per_second']:.2f} | "
            f"{q['greedy_sentences_per_second']:.2f} | {q['beam_sentences_per_second']:.2f} | "
            f"{r['moe']['ops_per_timestep'] / r['dense']['ops_per_timestep']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS),
                        help="MOE:DENSE preset pairs")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=10, help="shortest source, with <eos>")
    parser.add_argument("--max-len", type=int, default=30, help="longest source, with <eos>")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-sentences", type=int, default=128,
                        help="sentences per timed decoding pass")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--decode-length-ratio", type=float, default=1.2,
                        help="output length limit per source token (untrained models "
                             "decode to the limit)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                      "translate_throughput.json"))
    args = parser.parse_args(argv)
    overrides = {}
    if args.quick:
        args.vocab_size, args.batch_size, args.steps = 50, 4, 2
        args.min_len, args.max_len, args.decode_sentences = 3, 6, 8
        # ffn_hidden_dim = k * expert_hidden_dim keeps the dense baseline matched.
        overrides.update(model_dim=16, expert_hidden_dim=8, ffn_hidden_dim=32)
    if not 2 <= args.min_len <= args.max_len:
        parser.error(f"need 2 <= --min-len <= --max-len, got {args.min_len}, {args.max_len}")
    if args.decode_sentences < args.batch_size:
        parser.error(f"--decode-sentences ({args.decode_sentences}) must be at least "
                     f"--batch-size ({args.batch_size})")
    rows = []
    for pair in args.pairs:
        moe_name, sep, dense_name = pair.partition(":")
        if not sep:
            parser.error(f"--pairs takes MOE:DENSE, got {pair!r}")
        moe, dense = measure(moe_name, args, overrides), measure(dense_name, args, overrides)
        rows.append({"moe": moe, "dense": dense, "ratios_moe_over_dense": {
            key: moe[key] / dense[key] for key in RATIO_KEYS
        }})
    table = markdown_table(rows, args.beam_width)
    print(table)
    result = {
        "benchmark": "translate_throughput",
        "vocab_size": args.vocab_size, "batch_size": args.batch_size,
        "min_len": args.min_len, "max_len": args.max_len, "steps": args.steps,
        "repeats": args.repeats, "decode_sentences": args.decode_sentences,
        "beam_width": args.beam_width, "decode_length_ratio": args.decode_length_ratio,
        "quick": args.quick, "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    # Later harmless native lines too (the LSTM mask's oneDNN notice): as the CLI.
    from keras_moe.pipelines.command import filter_native_log

    filter_native_log()
    main(sys.argv[1:])
