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

`--gutenberg` measures every preset of the one-pass Gutenberg experiment
(`presets.GUTENBERG_MATCHED` and the floor `gutenberg-2xlstm`) with the
batch, window, vocabulary size and sampled softmax of
`pipelines/configs/lm/gutenberg-dense.yaml`, each in its own process (so
that its peak memory is its own): tokens/s, wall and CPU (`process_time`,
both cores) seconds per step, the step-time ratio to `gutenberg-dense`
(target 1.3 at most), and the peak resident memory (target under 8 GB).
`--data-pipeline` also measures the memory the Gutenberg input pipeline
holds (shard interleave buffer, window shuffle buffer) while it yields
`--data-batches` batches. The load average is recorded with each figure:
other work on the machine slows wall time, `process_time` much less.

    python benchmarks/lm_throughput.py --gutenberg [--data-pipeline] [--steps 20]
        [--out benchmarks/results/lm_throughput_gutenberg.json]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
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

from keras_moe.models import presets  # noqa: E402
from keras_moe.models.training import WarmupInverseSqrt  # noqa: E402

DEFAULT_PAIRS = ("cpu-moe-32:cpu-dense", "cpu-moe-32-h:cpu-dense")


GUTENBERG_CONFIG = os.path.join("pipelines", "configs", "lm", "gutenberg-dense.yaml")


def rss_bytes():
    """The process's resident memory now (Linux `/proc/self/status`), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes():
    """The process's peak resident memory so far (`ru_maxrss`, KiB on Linux), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    model.fit(ds.take(2), epochs=1, verbose=0, shuffle=False)  # trace and warm up
    times, cpu = [], []
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.fit(ds, epochs=1, verbose=0, shuffle=False)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    seconds = statistics.median(times)
    costs = presets.costs(model.get_config())
    return {
        "preset": preset,
        "tokens_per_second": shape[0] * shape[1] / seconds,
        "step_seconds": seconds / args.steps,
        "cpu_seconds_per_step": statistics.median(cpu) / args.steps,
        "ops_per_timestep": costs["ops_per_timestep"],
        "params": costs["params"],
        "steps_trained": 2 + args.repeats * args.steps,
        "rss_gb": rss_bytes() / 1e9,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def gutenberg_settings():
    """Batch, window, vocabulary size and model overrides of the Gutenberg configs."""
    from keras_moe.pipelines.config import load_config
    from keras_moe.pipelines.lm.config import LMConfig

    config = load_config(LMConfig, GUTENBERG_CONFIG)
    return config, {k: v for k, v in config.model.overrides().items()
                    if k in ("num_sampled", "unroll", "dropout")}


def measure_in_subprocess(preset, args):
    """`measure(preset)` in a fresh process (its own peak memory), as a dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", preset,
           "--steps", str(args.steps), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{preset}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def data_pipeline_memory(args):
    """RSS growth while the Gutenberg input pipeline yields `args.data_batches` batches."""
    from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary
    from keras_moe.pipelines.lm import inputs as lm_input
    from keras_moe.pipelines.lm import train as lm_train

    config, _ = gutenberg_settings()
    # A small vocabulary learned from the validation file: the pipeline's
    # memory is its buffers, not the vocabulary's size.
    valid = lm_train.lines_factory(config.data, "valid")()
    lines = (line for _, line in zip(range(20_000), valid, strict=False))
    vocab = WordPieceVocabulary.learn(lines, 8000, learner="tokenizers")
    before = rss_bytes()
    ds = lm_input.training_dataset(
        lm_train.lines_factory(config.data, "train", seed=1), vocab, config.data, seed=1,
        repeat=False,
    )
    start = time.perf_counter()
    for _ in ds.take(args.data_batches):
        pass
    seconds = time.perf_counter() - start
    return {
        "batches": args.data_batches,
        "tokens": args.data_batches * config.data.batch_size * config.data.seq_len,
        "interleave_buffer_lines": config.data.interleave_buffer_lines,
        "shuffle_buffer_windows": config.data.shuffle_buffer,
        "rss_before_gb": before / 1e9, "rss_after_gb": rss_bytes() / 1e9,
        "pipeline_gb": (rss_bytes() - before) / 1e9,
        "input_tokens_per_second": args.data_batches * config.data.batch_size
        * config.data.seq_len / seconds,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def gutenberg_table(rows, baseline):
    base = next(r for r in rows if r["preset"] == baseline)
    lines = [
        "| preset | Mops/token | params | tokens/s | s/step | CPU s/step | step / dense | "
        "peak RSS GB | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        r["step_ratio_to_dense"] = r["step_seconds"] / base["step_seconds"]
        r["cpu_ratio_to_dense"] = r["cpu_seconds_per_step"] / base["cpu_seconds_per_step"]
        lines.append(
            f"| {r['preset']} | {r['ops_per_timestep'] / 1e6:.3f} | {r['params'] / 1e6:.1f}M | "
            f"{r['tokens_per_second']:.0f} | {r['step_seconds']:.3f} | "
            f"{r['cpu_seconds_per_step']:.3f} | {r['step_ratio_to_dense']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {r['load_average_1min'][0]:.1f} |"
        )
    return "\n".join(lines)


def main_gutenberg(args):
    config, _ = gutenberg_settings()
    names = list(args.presets or (*presets.GUTENBERG_MATCHED, "gutenberg-2xlstm"))
    rows = []
    for name in names:
        rows.append(measure_in_subprocess(name, args))
        print(f"{name}: {rows[-1]['tokens_per_second']:.0f} tokens/s", flush=True)
    print(gutenberg_table(rows, "gutenberg-dense" if "gutenberg-dense" in names else names[0]))
    result = {
        "benchmark": "lm_throughput_gutenberg", "config": GUTENBERG_CONFIG,
        "vocab_size": config.data.vocab_size, "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len, "num_sampled": config.model.num_sampled,
        "steps": args.steps, "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "rows": rows,
    }
    if args.data_pipeline:
        result["data_pipeline"] = data_pipeline_memory(args)
        print("data pipeline:", json.dumps(result["data_pipeline"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


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
    parser.add_argument("--gutenberg", action="store_true",
                        help="every Gutenberg preset, each in its own process")
    parser.add_argument("--presets", nargs="+", help="with --gutenberg: these presets only")
    parser.add_argument("--data-pipeline", action="store_true",
                        help="with --gutenberg: the input pipeline's memory")
    parser.add_argument("--data-batches", type=int, default=300)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one Gutenberg preset, JSON out
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.one:
        config, overrides = gutenberg_settings()
        args.vocab_size = config.data.vocab_size
        args.batch_size, args.seq_len = config.data.batch_size, config.data.seq_len
        print(json.dumps(measure(args.one, args, overrides)))
        return None
    if args.gutenberg:
        args.out = args.out or os.path.join("benchmarks", "results",
                                            "lm_throughput_gutenberg.json")
        return main_gutenberg(args)
    args.out = args.out or os.path.join("benchmarks", "results", "lm_throughput.json")
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
    # Later harmless native lines too (the LSTM mask's oneDNN notice): as the CLI.
    from keras_moe.pipelines.command import filter_native_log

    filter_native_log()
    main(sys.argv[1:])
