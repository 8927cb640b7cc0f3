"""Benchmark of the MoE layer against the ideal dense computation.

For each (E, k, T) the script times one forward pass and one forward +
backward pass of `keras_moe.MoE` (training mode, noisy top-k gating, d=512,
h=1024 as the paper's language-model experts) and, in the same run, the
*ideal*: the same useful FLOPs as one dense GEMM pair on `T * k` rows,
`relu(X W1) W2` with `X: [T*k, d]`. The ratio MoE / ideal says how much the
routing, dispatch and per-expert loop cost on top of the arithmetic that
cannot be avoided. The process's resident
set is not used (the BFC allocator keeps memory it freed): peak memory is
the peak of TensorFlow's own CPU allocator during the step, above what was
held before it (`tf.config.experimental.get_memory_info`).

Usage:
    python benchmarks/moe_layer.py [--quick] [--out benchmarks/results/moe_layer.json]

`--quick` runs a reduced grid (for smoke tests). Results print as a table
and are written as JSON.
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
# TensorFlow's default CPU allocator hands large buffers back to the OS, so
# every step pays page faults on fresh gigabytes of expert gradients (measured
# here: 1.16 s vs 0.24 s to write 1 GiB). The BFC allocator keeps them.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras_moe  # noqa: E402, I001 (before keras: with the variable set, TensorFlow starts quietly)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402



def tf_memory():
    """(current, peak) bytes held by TensorFlow's CPU allocator (BFC only)."""
    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
        return info["current"], info["peak"]
    except (ValueError, RuntimeError):
        return 0, 0


def timed(fn, repeats):
    fn()  # trace + first run
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(step_fn, repeats):
    """Median seconds of `step_fn` and its peak memory above what was held before (MiB)."""
    step_fn()
    base, _ = tf_memory()
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError):
        pass
    seconds = timed(step_fn, repeats)
    _, peak = tf_memory()
    return seconds, max(0.0, (peak - base) / 2**20)


def moe_steps(layer, x):
    @tf.function
    def forward():
        return tf.reduce_sum(layer(x, training=True))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True)) + tf.add_n(layer.losses)
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        return [tf.reduce_sum(g) for g in grads if g is not None]

    return (lambda: forward().numpy()), (lambda: [g.numpy() for g in forward_backward()])


def ideal_steps(rows, d, h, out):
    x = tf.random.normal([rows, d])
    w1 = tf.Variable(tf.random.normal([d, h], stddev=d**-0.5))
    w2 = tf.Variable(tf.random.normal([h, out], stddev=h**-0.5))

    @tf.function
    def forward():
        return tf.reduce_sum(tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2))
        return [tf.reduce_sum(g) for g in tape.gradient(loss, [x, w1, w2])]

    return (lambda: forward().numpy()), (lambda: [g.numpy() for g in forward_backward()])


def read_bandwidth_gib_s(repeats):
    """Measured rate of reading memory (GiB/s): a reduction over 1 GiB."""
    block = tf.random.normal([256, 1024, 1024])

    @tf.function
    def read():
        return tf.reduce_sum(block)

    seconds = timed(lambda: read().numpy(), repeats)
    return 1.0 / seconds


def run_case(kind, num_experts, k, tokens, d, h, repeats, groups=None, bandwidth=None):
    keras.utils.set_random_seed(0)
    x = tf.random.normal([tokens, d])
    if kind == "flat":
        layer = keras_moe.MoE(num_experts, h, k=k, name="moe")
        layer.build((None, d))
        # Random gate weights so that routing is spread as after training
        # (with the zero init, inference would send everything to k experts).
        layer.gating.w_gate.assign(np.random.normal(0, 1, (d, num_experts)) / np.sqrt(d))
        k_total = k
    else:
        per_group = num_experts // groups
        layer = keras_moe.HierarchicalMoE(groups, per_group, h, k_primary=k, k_secondary=k)
        layer.build((None, d))
        layer.gating.primary.w_gate.assign(np.random.normal(0, 1, (d, groups)) / np.sqrt(d))
        layer.gating.w_gate.assign(
            np.random.normal(0, 1, (groups, d, per_group)) / np.sqrt(d)
        )
        k_total = k * k
    build_start = time.perf_counter()
    fwd, fwd_bwd = moe_steps(layer, x)
    fwd()
    trace_seconds = time.perf_counter() - build_start
    t_fwd, mem_fwd = measure(fwd, repeats)
    t_fb, mem_fb = measure(fwd_bwd, repeats)
    ideal_fwd, ideal_fb = ideal_steps(tokens * k_total, d, h, d)
    i_fwd, _ = measure(ideal_fwd, repeats)
    i_fb, _ = measure(ideal_fb, repeats)
    params = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
    flops_fwd = 2 * 2 * tokens * k_total * d * h
    # Every expert that receives a token must have its weights read once in
    # the forward pass: a floor no implementation can beat on this machine.
    experts_used = min(num_experts, tokens * k_total)
    weight_gib = experts_used * (2 * d * h) * 4 / 2**30
    weight_floor = weight_gib / bandwidth if bandwidth else 0.0
    row = dict(
        kind=kind, num_experts=num_experts, k=k_total, tokens=tokens, d=d, h=h,
        groups=groups, params=params, param_mib=params * 4 / 2**20,
        dense_te_d_buffer_mib=tokens * num_experts * d * 4 / 2**20,
        forward_s=t_fwd, forward_backward_s=t_fb,
        ideal_forward_s=i_fwd, ideal_forward_backward_s=i_fb,
        ratio_forward=t_fwd / i_fwd, ratio_forward_backward=t_fb / i_fb,
        gflops_forward=flops_fwd / t_fwd / 1e9,
        peak_mib_forward=mem_fwd, peak_mib_forward_backward=mem_fb,
        first_call_s=trace_seconds,
        weight_read_floor_s=weight_floor,
        ratio_forward_to_floor=t_fwd / max(i_fwd, weight_floor),
        # Other jobs may share the machine: their load is part of the record.
        loadavg=os.getloadavg(),
    )
    del layer, fwd, fwd_bwd
    return row


def flat_layer(num_experts, k, d, h):
    keras.utils.set_random_seed(0)
    layer = keras_moe.MoE(num_experts, h, k=k, name=f"moe{num_experts}")
    layer.build((None, d))
    layer.gating.w_gate.assign(np.random.normal(0, 1, (d, num_experts)) / np.sqrt(d))
    return layer


def run_pair(experts_a, experts_b, k, tokens, d, h, rounds):
    """Forward+backward of two flat layers, calls alternated round by round.

    Under a varying load (other jobs on the machine) two cases timed one
    after the other see different machines; alternating their calls makes
    the ratio of their times a fair comparison. Reports each case's median
    and minimum over `rounds` and the ratio of medians.
    """
    x = tf.random.normal([tokens, d])
    steps = {}
    for e in (experts_a, experts_b):
        _, fwd_bwd = moe_steps(flat_layer(e, k, d, h), x)
        fwd_bwd()
        fwd_bwd()
        steps[e] = fwd_bwd
    times = {e: [] for e in steps}
    for _ in range(rounds):
        for e, step in steps.items():
            start = time.perf_counter()
            step()
            times[e].append(time.perf_counter() - start)
    a, b = (statistics.median(times[e]) for e in (experts_a, experts_b))
    return dict(
        experts=[experts_a, experts_b], k=k, tokens=tokens, d=d, h=h, rounds=rounds,
        forward_backward_s={str(e): times[e] for e in times},
        median_s=[a, b], min_s=[min(times[experts_a]), min(times[experts_b])],
        ratio_of_medians=b / a,
        ratio_of_minima=min(times[experts_b]) / min(times[experts_a]),
        loadavg=os.getloadavg(),
    )


def print_table(rows):
    header = (
        f"{'kind':5} {'E':>5} {'k':>2} {'T':>5} {'h':>5} {'fwd s':>7} {'ideal':>7} "
        f"{'ratio':>5} {'f+b s':>7} {'ideal':>7} {'ratio':>5} {'GF/s':>6} {'peakMiB':>8} "
        f"{'paramMiB':>8} {'TEd MiB':>8} {'floor':>6} {'r/flr':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['kind']:5} {r['num_experts']:>5} {r['k']:>2} {r['tokens']:>5} {r['h']:>5} "
            f"{r['forward_s']:7.3f} {r['ideal_forward_s']:7.3f} {r['ratio_forward']:5.2f} "
            f"{r['forward_backward_s']:7.3f} {r['ideal_forward_backward_s']:7.3f} "
            f"{r['ratio_forward_backward']:5.2f} {r['gflops_forward']:6.1f} "
            f"{r['peak_mib_forward_backward']:8.0f} {r['param_mib']:8.0f} "
            f"{r['dense_te_d_buffer_mib']:8.0f} {r['weight_read_floor_s']:6.3f} "
            f"{r['ratio_forward_to_floor']:5.2f}",
            flush=True,
        )


def markdown_table(rows):
    """The rows as a Markdown table (for docs/performance.md)."""
    lines = [
        "| kind | E | k | T | h | fwd s | ideal fwd s | fwd ratio | weight-read floor s "
        "| fwd / max(ideal, floor) | fwd+bwd s | ideal fwd+bwd s | fwd+bwd ratio "
        "| peak MiB (step) | params MiB | T·E·d MiB (never built) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['num_experts']} | {r['k']} | {r['tokens']} | {r['h']} "
            f"| {r['forward_s']:.3f} | {r['ideal_forward_s']:.3f} | {r['ratio_forward']:.2f} "
            f"| {r['weight_read_floor_s']:.3f} | {r['ratio_forward_to_floor']:.2f} "
            f"| {r['forward_backward_s']:.3f} | {r['ideal_forward_backward_s']:.3f} "
            f"| {r['ratio_forward_backward']:.2f} | {r['peak_mib_forward_backward']:.0f} "
            f"| {r['param_mib']:.0f} | {r['dense_te_d_buffer_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/moe_layer.json")
    parser.add_argument("--only", choices=["flat", "hier"], default=None)
    parser.add_argument(
        "--strategy", choices=["auto", "unrolled", "loop"], default="auto",
        help="dropless strategy (keras_moe.dispatch.dropless_dispatch); auto chooses by E",
    )
    parser.add_argument(
        "--cases", metavar="E,k,T", nargs="+",
        help="flat cases to run instead of the grid, e.g. 4,2,8192 1024,2,8192",
    )
    parser.add_argument(
        "--pair", metavar="Ea,Eb,k,T",
        help="time two flat layers' forward+backward with alternated calls and print the "
        "ratio (e.g. 4,1024,2,8192); --repeats rounds",
    )
    parser.add_argument("--dims", metavar="d,h", help="expert sizes instead of 512,1024")
    parser.add_argument(
        "--markdown", metavar="JSON", help="print the Markdown table of a results file and exit"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)["rows"]))
        return None

    d, h = 512, 1024
    if args.quick:
        d, h = 64, 128
        flat = [(e, k, t) for e in (4, 64) for k in (1, 2) for t in (256,)]
        hier = [(64, 2, 256, 4)]
    else:
        flat = [(e, k, t) for t in (2048, 8192) for k in (1, 2, 4) for e in (4, 32, 256, 1024)]
        # 4096 experts of h=1024 would hold 17 GB of weights (and as much
        # gradient): more than this 24 GB machine; the hierarchical rows use
        # h=256 so the three sizes fit and compare with each other.
        hier = [(e, 2, 8192, 16) for e in (256, 1024, 4096)]
    if args.strategy != "auto":
        from keras_moe import dispatch

        dispatch.LOOP_MIN_EXPERTS = 1 if args.strategy == "loop" else 10**9
    if args.dims:
        d, h = (int(v) for v in args.dims.split(","))
    if args.cases:
        flat = [tuple(int(v) for v in case.split(",")) for case in args.cases]
        args.only = "flat"
    if args.pair:
        e_a, e_b, k, t = (int(v) for v in args.pair.split(","))
        pair = run_pair(e_a, e_b, k, t, d, h, args.repeats)
        print(
            f"E={e_a} vs E={e_b}, k={k}, T={t}: forward+backward median "
            f"{pair['median_s'][0]:.3f} s vs {pair['median_s'][1]:.3f} s "
            f"(x{pair['ratio_of_medians']:.2f}; minima x{pair['ratio_of_minima']:.2f})"
        )
        result = dict(benchmark="moe_layer_pair", strategy=args.strategy, pair=pair)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
        return result
    bandwidth = read_bandwidth_gib_s(args.repeats)
    print(f"measured memory read bandwidth: {bandwidth:.1f} GiB/s", flush=True)
    rows = []
    if args.only in (None, "flat"):
        for e, k, t in flat:
            rows.append(run_case("flat", e, k, t, d, h, args.repeats, bandwidth=bandwidth))
            print_table(rows[-1:])
    if args.only in (None, "hier"):
        hier_h = h if args.quick else 256
        for e, k, t, g in hier:
            rows.append(
                run_case("hier", e, k, t, d, hier_h, args.repeats, groups=g, bandwidth=bandwidth)
            )
            print_table(rows[-1:])
    print()
    print_table(rows)
    result = dict(
        benchmark="moe_layer",
        machine=dict(
            platform=platform.platform(), processor=platform.processor(),
            cpu_count=os.cpu_count(), python=sys.version.split()[0],
            tensorflow=tf.__version__, keras=keras.__version__,
        ),
        repeats=args.repeats,
        strategy=args.strategy,
        read_bandwidth_gib_s=bandwidth,
        allocator=os.environ.get("TF_CPU_ALLOCATOR_USE_BFC"),
        loadavg_at_end=os.getloadavg(),
        rows=rows,
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
