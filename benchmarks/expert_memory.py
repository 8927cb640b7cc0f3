"""Memory of the paper's App. D tricks: recomputed expert activations and `FactoredAdam`.

Two measurements:

1. **Recompute.** Peak memory of one forward + backward step of a stack
   of `L` residual `keras_moe.MoE` layers with `recompute_hidden=False`
   and `True`, at a size where the experts' hidden activations
   (`[T * k, h]` per layer) dominate. (With one layer the peak does not
   move: its backward needs the hidden activation at once, recomputed or
   kept; with `L` layers the plain step holds all `L` of them at the start
   of backward, the recomputed one one at a time.) Peak
   memory is that of TensorFlow's own CPU allocator during the step, above
   what was held before it (`tf.config.experimental.get_memory_info`, which
   needs the BFC allocator: this script sets `TF_CPU_ALLOCATOR_USE_BFC=true`).
   The step's time is reported beside it (recomputation adds an expert
   forward pass).
2. **FactoredAdam.** Optimizer state of `keras.optimizers.Adam` and of
   `keras_moe.FactoredAdam` for the experts of the paper's models
   (d=512, h=1024, E from 4 to 131072; counted from the variable shapes,
   nothing is allocated), and, at one size that fits this machine, the
   bytes of the optimizer variables actually built and the allocator's
   growth when they are.

Usage:
    python benchmarks/expert_memory.py [--quick] [--out benchmarks/results/expert_memory.json]
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_MOE_QUIET_START", "1")  # no C++ start-up lines (keras_moe/_startup.py)
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras_moe  # noqa: E402, I001 (before keras: with the variable set, TensorFlow starts quietly)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_moe.optimizers import FactoredAdam  # noqa: E402

MIB = 2**20


def allocator_bytes():
    """(current, peak) bytes of TensorFlow's CPU allocator; (0, 0) if it cannot say."""
    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
        return info["current"], info["peak"]
    except (ValueError, RuntimeError):
        return 0, 0


def reset_peak():
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError):
        pass


def recompute_case(recompute, experts, tokens, k, d, h, capacity_factor, depth, repeats):
    keras.utils.set_random_seed(0)
    layers = []
    for _ in range(depth):
        layer = keras_moe.MoE(experts, h, k=k, gating="top_k", capacity_factor=capacity_factor,
                              recompute_hidden=recompute)
        layer.build((None, d))
        layer.gating.w_gate.assign(np.random.normal(0, 1, (d, experts)) / np.sqrt(d))
        layers.append(layer)
    variables = [v for layer in layers for v in layer.trainable_variables]
    x = tf.random.normal([tokens, d])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = x
            for layer in layers:  # residual MoE blocks, as in a deep model
                y = y + layer(y, training=True)
            loss = tf.reduce_sum(tf.square(y))
        grads = tape.gradient(loss, [x] + variables)
        return [tf.reduce_sum(g) for g in grads if g is not None]

    step()  # trace and first run
    base, _ = allocator_bytes()
    reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [g.numpy() for g in step()]
        times.append(time.perf_counter() - start)
    _, peak = allocator_bytes()
    mode = "dropless" if capacity_factor is None else f"capacity {capacity_factor:g}"
    return dict(
        recompute_hidden=recompute, mode=mode, layers=depth, num_experts=experts,
        tokens=tokens, k=k, d=d, h=h, hidden_mib_per_layer=tokens * k * h * 4 / MIB,
        params_mib=sum(int(np.prod(v.shape)) for v in variables) * 4 / MIB,
        peak_step_mib=max(0, peak - base) / MIB, step_s=float(np.median(times)),
    )


def expert_shapes(num_experts, d, h):
    """The four stacked variables of `FeedForwardExperts(num_experts, h)` on width `d`."""
    return [(num_experts, d, h), (num_experts, h, d), (num_experts, h), (num_experts, d)]


def adam_state(shapes):
    return sum(2 * int(np.prod(s)) for s in shapes)


def factored_state(shapes, min_dim_to_factor=2):
    total = 0
    for s in shapes:
        if len(s) >= 2 and min(s[-2:]) >= min_dim_to_factor:
            total += int(np.prod(s[:-1])) + int(np.prod(s[:-2] + s[-1:]))
        else:
            total += int(np.prod(s))
    return total


def optimizer_table(d, h, counts):
    rows = []
    for e in counts:
        shapes = expert_shapes(e, d, h)
        params = sum(int(np.prod(s)) for s in shapes)
        rows.append(dict(
            num_experts=e, d=d, h=h, params_mib=params * 4 / MIB,
            adam_state_mib=adam_state(shapes) * 4 / MIB,
            factored_state_mib=factored_state(shapes) * 4 / MIB,
            ratio=adam_state(shapes) / factored_state(shapes),
        ))
    return rows


def measured_optimizer_state(num_experts, d, h):
    """Bytes of the optimizer variables built for one MoE layer's experts, per optimizer."""
    layer = keras_moe.FeedForwardExperts(num_experts, h)
    layer.build((d,))
    result = {}
    for name, make in (("adam", keras.optimizers.Adam), ("factored_adam", FactoredAdam)):
        before, _ = allocator_bytes()
        optimizer = make()
        optimizer.build(layer.trainable_variables)
        after, _ = allocator_bytes()
        slots = [v for v in optimizer.variables
                 if v is not optimizer.iterations and "learning_rate" not in v.path]
        result[name] = dict(
            slot_mib=sum(int(np.prod(v.shape)) * 4 for v in slots) / MIB,
            allocator_growth_mib=(after - before) / MIB,
            expected_mib=(adam_state if name == "adam" else factored_state)(
                expert_shapes(num_experts, d, h)) * 4 / MIB,
        )
        del optimizer
    return dict(num_experts=num_experts, d=d, h=h, **result)


def print_tables(result):
    print("recompute_hidden: one forward+backward step of L residual keras_moe.MoE layers "
          "(peak of TensorFlow's CPU allocator above the held memory)")
    header = (f"{'mode':13} {'L':>2} {'E':>5} {'T':>5} {'k':>2} {'d':>4} {'h':>5} "
              f"{'hidden MiB/L':>12} {'params MiB':>10} "
              f"{'recompute':>9} {'peak MiB':>9} {'step s':>7}")
    print(header)
    print("-" * len(header))
    for r in result["recompute"]:
        print(f"{r['mode']:13} {r['layers']:>2} {r['num_experts']:>5} {r['tokens']:>5} "
              f"{r['k']:>2} {r['d']:>4} {r['h']:>5} {r['hidden_mib_per_layer']:12.1f} "
              f"{r['params_mib']:10.1f} {str(r['recompute_hidden']):>9} "
              f"{r['peak_step_mib']:9.1f} {r['step_s']:7.3f}")
    print()
    print("optimizer state of the experts (float32), Adam vs FactoredAdam")
    header = f"{'E':>6} {'d':>4} {'h':>5} {'params MiB':>11} {'Adam MiB':>10} {'Factored MiB':>12} " \
             f"{'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in result["optimizer_state"]:
        print(f"{r['num_experts']:>6} {r['d']:>4} {r['h']:>5} {r['params_mib']:11.1f} "
              f"{r['adam_state_mib']:10.1f} {r['factored_state_mib']:12.2f} {r['ratio']:6.0f}")
    m = result["optimizer_measured"]
    print(f"\nmeasured at E={m['num_experts']}, d={m['d']}, h={m['h']}:")
    for name in ("adam", "factored_adam"):
        print(f"  {name:14} slot variables {m[name]['slot_mib']:8.2f} MiB "
              f"(expected {m[name]['expected_mib']:.2f}), allocator growth "
              f"{m[name]['allocator_growth_mib']:8.2f} MiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/expert_memory.json")
    args = parser.parse_args(argv)
    if args.quick:
        cases = [(8, 256, 2, 16, 256, 2)]
        counts, measured = (4, 64), (8, 16, 32)
    else:
        # h = 32 d: the hidden activations [T k, h] (128 MiB) are far above
        # the experts' parameters and the [T k, d] rows.
        cases = [(16, 4096, 2, 128, 4096, 4)]
        counts, measured = (4, 32, 256, 1024, 4096, 16384, 65536, 131072), (64, 512, 1024)
    rows = []
    for e, t, k, d, h, depth in cases:
        for capacity_factor in (None, 1.25):
            for recompute in (False, True):
                rows.append(recompute_case(recompute, e, t, k, d, h, capacity_factor, depth,
                                           args.repeats))
    result = dict(
        benchmark="expert_memory",
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                     python=sys.version.split()[0], tensorflow=tf.__version__,
                     keras=keras.__version__),
        memory_measure="tf.config.experimental.get_memory_info('CPU:0') with the BFC allocator",
        allocator=os.environ.get("TF_CPU_ALLOCATOR_USE_BFC"),
        recompute=rows,
        optimizer_state=optimizer_table(512, 1024, counts),
        optimizer_measured=measured_optimizer_state(*measured),
    )
    print_tables(result)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
