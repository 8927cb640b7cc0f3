"""The MoE layer on an accelerator: dropless and capacity, float32 and bfloat16.

For each (E, dispatch, precision) one forward + backward step of
`keras_moe.MoE` (training mode, noisy top-k, d=512, h=1024 by default) is
timed against the ideal, the same useful FLOPs as one dense GEMM pair on
`T * k` rows, in the same precision (`benchmarks/moe_layer.py`'s method and
helpers). bfloat16 runs under the `mixed_bfloat16` policy: the experts
compute in bfloat16 with float32 weights, the gates in float32.

Run by `benchmarks/device_check.sh`; on its own:
    python benchmarks/device_layers.py [--quick] [--out FILE]
"""

import argparse
import importlib.util
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_MOE_QUIET_START", "1")  # no C++ start-up lines (keras_moe/_startup.py)

import keras_moe  # noqa: E402, I001 (before keras: with the variable set, TensorFlow starts quietly)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402



def _moe_layer_module():
    path = pathlib.Path(__file__).with_name("moe_layer.py")
    spec = importlib.util.spec_from_file_location("moe_layer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _moe_layer_module()


def device_name():
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", gpus[0].name)


def ideal_step(rows, d, h, dtype):
    x = tf.cast(tf.random.normal([rows, d]), dtype)
    w1 = tf.Variable(tf.random.normal([d, h], stddev=d**-0.5))
    w2 = tf.Variable(tf.random.normal([h, d], stddev=h**-0.5))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            hidden = tf.nn.relu(tf.matmul(x, tf.cast(w1, dtype)))
            loss = tf.reduce_sum(tf.cast(tf.matmul(hidden, tf.cast(w2, dtype)), tf.float32))
        return [tf.reduce_sum(tf.cast(g, tf.float32)) for g in tape.gradient(loss, [x, w1, w2])]

    return lambda: [g.numpy() for g in forward_backward()]


def moe_step(layer, x):
    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x, training=True), tf.float32)
            loss = tf.reduce_sum(y) + tf.add_n(layer.losses)
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        return [tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads if g is not None]

    return lambda: [g.numpy() for g in forward_backward()]


def run_case(num_experts, k, tokens, d, h, capacity_factor, precision, repeats):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        keras.utils.set_random_seed(0)
        layer = keras_moe.MoE(num_experts, h, k=k, capacity_factor=capacity_factor, name="moe")
        layer.build((None, d))
        layer.gating.w_gate.assign(np.random.normal(0, 1, (d, num_experts)) / np.sqrt(d))
        x = tf.random.normal([tokens, d])
        start = time.perf_counter()
        step = moe_step(layer, x)
        step()
        first = time.perf_counter() - start
        seconds, peak_mib = bench.measure(step, repeats)
        dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
        ideal, _ = bench.measure(ideal_step(tokens * k, d, h, dtype), repeats)
    finally:
        keras.config.set_dtype_policy(previous)
    return dict(
        num_experts=num_experts, k=k, tokens=tokens, d=d, h=h,
        dispatch="dropless" if capacity_factor is None else f"capacity {capacity_factor:g}",
        precision=precision, first_step_s=first, forward_backward_s=seconds,
        ideal_forward_backward_s=ideal, ratio=seconds / ideal, peak_mib=peak_mib,
    )


def print_table(rows, device):
    print(f"MoE layer forward+backward on {device}")
    header = (f"{'E':>5} {'k':>2} {'T':>5} {'dispatch':13} {'precision':9} {'first s':>8} "
              f"{'f+b s':>8} {'ideal s':>8} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['num_experts']:>5} {r['k']:>2} {r['tokens']:>5} {r['dispatch']:13} "
              f"{r['precision']:9} {r['first_step_s']:8.2f} {r['forward_backward_s']:8.4f} "
              f"{r['ideal_forward_backward_s']:8.4f} {r['ratio']:6.2f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/device/layers.json")
    args = parser.parse_args(argv)
    if args.quick:
        d, h, tokens, k, experts = 16, 32, 64, 2, (4,)
    else:
        d, h, tokens, k, experts = 512, 1024, 8192, 2, (32, 256, 2048)
    device = device_name()
    rows = []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for e in experts:
        for capacity_factor in (None, 1.25):
            for precision in ("float32", "bfloat16"):
                rows.append(run_case(e, k, tokens, d, h, capacity_factor, precision,
                                     args.repeats))
                print_table(rows[-1:], device)
                # Written after every case: a run stopped by its time limit
                # still leaves what it measured.
                with open(args.out, "w") as f:
                    json.dump(dict(benchmark="device_layers", device=device, quick=args.quick,
                                   tensorflow=tf.__version__, rows=rows), f, indent=1)
    print()
    print_table(rows, device)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
