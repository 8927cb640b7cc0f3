"""Step time and data exchanged per step: MoE under MirroredStrategy, 1, 2 and 4 replicas.

The CPU is split into logical devices (`tf.config.set_logical_device_configuration`),
so every "device" shares the same cores: this measures the *overhead* of
data parallelism and expert parallelism (collectives, the extra graph
work), not a speed-up; on one multi-GPU host the replicas run in parallel.

For each replica count `R` and each mode,

- `data`: every replica holds every expert (`expert_parallel=False`); the
  gradients of all variables are all-reduced;
- `expert`: each replica holds `E / R` experts (`expert_parallel=True`);
  tokens go to their experts by all-gather and come back by all-reduce;
  only the gate's (and any other dense) gradients are all-reduced,

one training step of a single `MoE` layer (noisy top-k, SGD, global batch
`--tokens`) is timed with `strategy.run` (median of `--repeats` runs of
`--steps` steps, after a warm-up). The data each replica puts into
collectives per step is counted in elements (4 bytes each, float32 or
int32):

- gradient all-reduce: the elements of every all-reduced gradient;
- balancing all-reduce (global balancing): `2E` forward and `2E` backward;
- expert-parallel dispatch, forward: *measured*, the layer's
  `Routing.exchanged_elements` (tokens `N_r d`, `5` integers or floats per
  pair, `2` sizes, and the partial outputs `N d_out` of the whole batch);
  backward: derived from TensorFlow's registered gradients of the two
  collectives: the all-reduce of the output gradient (`N d_out`), the
  all-gather's gradient, an all-reduce of the whole gathered tensor, for the
  tokens (`N d`) and the gates (`N k`), plus 2 sizes.

`N` is the global batch and `N_r = N / R` a replica's share. An all-reduce
that takes `S` elements from each replica moves about `2 (R - 1) / R * S`
per replica with a ring algorithm; the table reports `S`, what each replica
contributes. Expert weight bytes per replica are read from the variables'
per-device components.

Usage:
    python benchmarks/distributed.py [--quick] [--replicas 1 2 4]
        [--experts 16] [--model-dim 64] [--hidden 128] [--k 2]
        [--tokens 1024] [--steps 10] [--repeats 3]
        [--out benchmarks/results/distributed.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--model-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="global batch, tokens")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed.json")
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.experts, args.model_dim, args.hidden, args.tokens = 8, 16, 32, 64
        args.steps, args.repeats = 2, 1
    for r in args.replicas:
        if r < 1 or args.experts % r or args.tokens % r:
            parser.error(
                f"--replicas {r}: the replica count must divide --experts ({args.experts}) "
                f"and --tokens ({args.tokens})"
            )
    return args


def derived_backward(mode, replicas, tokens, d, k):
    """Elements a replica puts into the backward pass's dispatch collectives."""
    if mode != "expert" or replicas == 1:
        return 0
    return tokens * d + tokens * d + tokens * k + 2


def run_case(tf, keras, keras_moe, ep, args, strategy, mode):
    replicas = strategy.num_replicas_in_sync
    d, n = args.model_dim, args.tokens
    with strategy.scope():
        layer = keras_moe.MoE(
            args.experts, args.hidden, k=args.k, seed=1, name="moe",
            expert_parallel=(mode == "expert"),
        )
        layer.build((None, d))
        optimizer = keras.optimizers.SGD(0.01)
        if mode == "expert":
            # The opt-in: expert shards are updated per replica, not all-reduced.
            optimizer = keras_moe.ExpertParallelOptimizer(optimizer)
        optimizer.build(layer.trainable_variables)
    variables = layer.trainable_variables
    rng = tf.random.Generator.from_seed(0)
    x = rng.normal([n, d])
    shard = n // replicas
    inputs = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[ctx.replica_id_in_sync_group * shard:][:shard]
    )

    @tf.function
    def step(batch):
        def replica_fn(xs):
            with tf.GradientTape() as tape:
                y, routing = layer(xs, training=True, return_routing=True)
                loss = tf.reduce_mean(tf.square(y)) / replicas + routing.aux_loss / replicas
            grads = tape.gradient(loss, variables)
            grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            exchanged = routing.exchanged_elements
            return tf.zeros([], tf.int32) if exchanged is None else tf.cast(exchanged, tf.int32)

        return strategy.run(replica_fn, args=(batch,))

    exchanged = step(inputs)  # warm-up: traces and builds
    forward = int(strategy.experimental_local_results(exchanged)[0].numpy())
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            result = step(inputs)
        strategy.experimental_local_results(result)[0].numpy()
        times.append((time.perf_counter() - start) / args.steps)

    gradient = 0
    if replicas > 1:
        gradient = sum(int(v.shape.num_elements()) for v in variables if not ep.is_sharded(v))
    balancing = 4 * args.experts if replicas > 1 else 0
    backward = derived_backward(mode, replicas, n, d, args.k)
    elements = gradient + balancing + forward + backward
    expert_bytes = sum(
        ep.components(v)[0].numpy().nbytes for v in layer.experts.trainable_variables
    )
    return {
        "replicas": replicas,
        "mode": mode,
        "step_ms": round(1000 * statistics.median(times), 2),
        "elements": {
            "gradient_all_reduce": gradient,
            "balancing_all_reduce": balancing,
            "dispatch_forward_measured": forward,
            "dispatch_backward_derived": backward,
            "total": elements,
        },
        "bytes_per_step": 4 * elements,
        "bytes_per_token": round(4 * elements / n, 1),
        "expert_weight_bytes_per_replica": expert_bytes,
    }


def measure(args, replicas):
    """The rows of one replica count, in this process."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
    import keras

    import keras_moe
    from keras_moe import expert_parallel as ep

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    modes = ("data", "expert") if replicas > 1 else ("data",)
    return [run_case(tf, keras, keras_moe, ep, args, strategy, mode) for mode in modes]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.one is not None:
        print("ROWS " + json.dumps(measure(args, args.one)))
        return 0
    # One process per replica count: MirroredStrategy objects over different
    # device sets in one process number their collective groups alike
    # (group key 1) and abort each other's collectives (TensorFlow 2.21).
    rows = []
    for replicas in args.replicas:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--one", str(replicas)],
            capture_output=True, text=True, timeout=900,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode or not lines:
            sys.stderr.write(done.stderr[-4000:])
            return done.returncode or 1
        rows.extend(json.loads(lines[-1][len("ROWS "):]))
    import tensorflow as tf

    print(
        f"MoE({args.experts} experts, d={args.model_dim}, h={args.hidden}, k={args.k}), "
        f"global batch {args.tokens} tokens, logical CPU devices sharing "
        f"{os.cpu_count()} cores (overhead, not speed-up)"
    )
    header = (
        f"{'R':>2} {'mode':7} {'step ms':>9} {'grad AR':>9} {'balance':>8} {'disp fwd':>9} "
        f"{'disp bwd':>9} {'bytes/step':>11} {'bytes/tok':>9} {'expert B/replica':>17}"
    )
    print(header)
    for row in rows:
        e = row["elements"]
        print(
            f"{row['replicas']:>2} {row['mode']:7} {row['step_ms']:>9.2f} "
            f"{e['gradient_all_reduce']:>9} {e['balancing_all_reduce']:>8} "
            f"{e['dispatch_forward_measured']:>9} {e['dispatch_backward_derived']:>9} "
            f"{row['bytes_per_step']:>11} {row['bytes_per_token']:>9.1f} "
            f"{row['expert_weight_bytes_per_replica']:>17}"
        )
    result = {
        "benchmark": "distributed",
        "config": {
            "experts": args.experts, "model_dim": args.model_dim, "hidden": args.hidden,
            "k": args.k, "tokens": args.tokens, "steps": args.steps, "repeats": args.repeats,
            "quick": args.quick,
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "tensorflow": tf.__version__,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
