"""Run by multi_worker_test.py: one process of a `keras_moe.pipelines.training.multi_worker.train` run.

`python multi_worker_script.py --strategy multi_worker --out w.npz ...` with
`TF_CONFIG` set trains the small MoE model below for `--steps` steps of a
`GLOBAL_BATCH`-row global batch and writes its final weights and history to
`--out`. The test imports `build` and `dataset_fn` to run the same training
in its own process with the default strategy.
"""

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_moe  # noqa: E402
from keras_moe.pipelines.training import distribution, multi_worker  # noqa: E402

D = 6  # input width
GLOBAL_BATCH = 16  # rows per step, over all replicas


def build(strategy, optimizer="sgd"):
    """A Dense -> MoE -> Dense regressor with fixed weights, and its optimizer.

    The gate has no noise (`top_k`), so every run computes the same function;
    the weights are drawn from a fixed NumPy seed, not from TensorFlow's.
    """
    with strategy.scope():
        inputs = keras.Input((D,))
        hidden = keras.layers.Dense(8, activation="tanh", name="proj")(inputs)
        hidden = keras_moe.MoE(
            4, 8, k=2, gating="top_k", importance_weight=0.5, load_weight=0.5, seed=1,
            name="moe",
        )(hidden)
        model = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
        rng = np.random.RandomState(7)
        for variable in model.weights:
            if "seed_generator" not in variable.path:
                variable.assign(rng.normal(0.0, 0.5, variable.shape).astype("float32"))
        if optimizer == "sgd":
            opt = keras.optimizers.SGD(0.2)
        else:
            opt = keras.optimizers.Adam(0.01)
    return model, opt


def data(steps):
    """`steps` global batches: rows `[s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)` are step s."""
    rng = np.random.RandomState(0)
    x = rng.normal(size=(steps * GLOBAL_BATCH, D)).astype("float32")
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]).astype("float32")
    weight = rng.uniform(0.5, 1.5, size=(steps * GLOBAL_BATCH,)).astype("float32")
    return x, y, weight


def dataset_fn(steps, context):
    # `shard` then `batch`: worker i's batch s holds rows s * G + i + n * j,
    # which together are exactly global batch s.
    per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
    dataset = tf.data.Dataset.from_tensor_slices(data(steps))
    dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
    return dataset.batch(per_replica, drop_remainder=True).repeat()


def run(strategy, args):
    model, optimizer = build(strategy, args.optimizer)

    def on_log(step, logs):
        time.sleep(args.step_delay)

    history = multi_worker.train(
        model, optimizer, "mse", functools.partial(dataset_fn, args.steps),
        strategy=strategy, steps=args.steps, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, log_every=1, on_log=on_log,
    )
    return model, history


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="multi_worker")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # Two workers share two cores with whatever else runs.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    started = time.time()
    strategy = distribution.make_strategy(args.strategy, connect_timeout=60)
    model, history = run(strategy, args)
    history["replicas"] = int(strategy.num_replicas_in_sync)
    history["seconds"] = time.time() - started
    weights = {f"w{i}": v.numpy() for i, v in enumerate(model.trainable_weights)}
    np.savez(args.out + ".tmp.npz", history=json.dumps(history), **weights)
    os.replace(args.out + ".tmp.npz", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
