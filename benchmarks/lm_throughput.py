"""Training throughput of a language-model preset against its dense baseline.

For each pair (an MoE preset and its compute-matched dense baseline) the
script trains both in the same process, on the same synthetic token batches
(throughput does not depend on what the words are), with the pipeline's own
optimiser, schedule and loss, and reports training tokens per second (the
median over several timed `fit` calls after a warm-up) and the ratio
dense / MoE (how many times slower the MoE is per token). The target
(issue 3) is a ratio within 1.3.

Usage:
    python benchmarks/lm_throughput.py [--quick] [--pairs cpu-moe-32:cpu-dense ...]
        [--vocab-size 10002] [--batch-size 64] [--seq-len 35] [--steps 20]
        [--out benchmarks/results/lm_throughput.json]

`--quick` uses a tiny width and few steps (a smoke test). Results print as a
table and are written as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Kept, not handed back to the OS: see docs/performance.md.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_moe.models import presets  # noqa: E402
from keras_moe.models.training import WarmupInverseSqrt  # noqa: E402

DEFAULT_PAIRS = ("cpu-moe-32:cpu-dense", "cpu-moe-32-h:cpu-dense")


def measure(preset, args, overrides):
    """Median training tokens per second of `preset` over `args.repeats` fits."""
    keras.utils.set_random_seed(0)
    model = presets.build_language_model(preset, args.vocab_size, **overrides)
    model.compile(
        optimizer=keras.optimizers.Adam(WarmupInverseSqrt(1e-3, 100), clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
    )
    rng = np.random.default_rng(0)
    shape = (args.batch_size * args.steps, args.seq_len)
    tokens = rng.integers(3, args.vocab_size, size=shape).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    weights = np.ones(shape, np.float32)
    ds = tf.data.Dataset.from_tensor_slices((tokens, targets, weights))
    ds = ds.batch(args.batch_size, drop_remainder=True).cache()
    model.fit(ds.take(2), epochs=1, verbose=0)  # trace and warm up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    costs = presets.costs(model.get_config())
    return {
        "preset": preset,
        "tokens_per_second": shape[0] * shape[1] / seconds,
        "step_seconds": seconds / args.steps,
        "ops_per_timestep": costs["ops_per_timestep"],
        "params": costs["params"],
    }


def markdown_table(rows):
    lines = [
        "| MoE preset | dense preset | MoE tokens/s | dense tokens/s | dense/MoE | "
        "MoE Mops/token | dense Mops/token |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['moe']['preset']} | {r['dense']['preset']} | "
            f"{r['moe']['tokens_per_second']:.0f} | {r['dense']['tokens_per_second']:.0f} | "
            f"{r['ratio']:.2f} | {r['moe']['ops_per_timestep'] / 1e6:.2f} | "
            f"{r['dense']['ops_per_timestep'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS),
                        help="MOE:DENSE preset pairs")
    parser.add_argument("--vocab-size", type=int, default=10002)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=35)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unroll", action="store_true", help="unroll the LSTMs")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                      "lm_throughput.json"))
    args = parser.parse_args(argv)
    overrides = {"unroll": args.unroll}
    if args.quick:
        args.vocab_size, args.batch_size, args.seq_len, args.steps = 50, 4, 6, 2
        # ffn_hidden_dim = k * expert_hidden_dim keeps the dense baseline matched.
        overrides.update(model_dim=16, expert_hidden_dim=8, ffn_hidden_dim=32)
    rows = []
    for pair in args.pairs:
        moe_name, sep, dense_name = pair.partition(":")
        if not sep:
            parser.error(f"--pairs takes MOE:DENSE, got {pair!r}")
        moe, dense = measure(moe_name, args, overrides), measure(dense_name, args, overrides)
        rows.append({"moe": moe, "dense": dense,
                     "ratio": dense["tokens_per_second"] / moe["tokens_per_second"]})
    table = markdown_table(rows)
    print(table)
    result = {
        "benchmark": "lm_throughput",
        "vocab_size": args.vocab_size, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "steps": args.steps, "repeats": args.repeats, "unroll": args.unroll,
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
    main(sys.argv[1:])
