"""Run by distributed_test.py in a fresh process: MoE on 1 device vs 4 replicas.

The CPU is split into 4 logical devices before TensorFlow starts, which is
only possible in a new process. Prints one JSON object with the largest
differences found.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

REPLICAS = 4
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_moe  # noqa: E402

D, N = 6, 32  # N tokens in the global batch, N / REPLICAS per replica


def make_layer(kind, scope):
    if kind == "flat":
        layer = keras_moe.MoE(
            8, 12, k=2, gating="top_k", importance_weight=0.5, load_weight=0.5,
            balancing_scope=scope, seed=1, name="moe",
        )
    else:
        layer = keras_moe.HierarchicalMoE(
            4, 3, 12, k_primary=2, k_secondary=2, gating="top_k", importance_weight=0.5,
            load_weight=0.5, balancing_scope=scope, seed=1, name="moe",
        )
    layer.build((None, D))
    rng = np.random.RandomState(7)
    for variable in layer.weights:
        if "seed_generator" in variable.path:
            continue
        variable.assign(rng.normal(0.0, 0.5, variable.shape).astype("float32"))
    return layer


def fit_weights(strategy, kind, scope, x, t):
    """Weights after 3 SGD steps of `fit` (global batch N) under `strategy`."""
    keras.utils.set_random_seed(3)
    with strategy.scope():
        inputs = keras.Input((D,))
        moe = make_layer(kind, scope)
        model = keras.Model(inputs, keras.layers.Dense(1, name="head")(moe(inputs)))
        rng = np.random.RandomState(11)
        head = model.get_layer("head")
        head.kernel.assign(rng.normal(0.0, 0.5, head.kernel.shape).astype("float32"))
        model.compile(keras.optimizers.SGD(0.5), "mse")
    initial = [v.numpy() for v in model.trainable_weights]
    model.fit(x, t, batch_size=N, epochs=1, shuffle=False, verbose=0)
    return initial, [v.numpy() for v in model.trainable_weights]


def main():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(3 * N, D)).astype("float32")
    t = rng.normal(size=(3 * N, 1)).astype("float32")
    mirrored = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    report = {}
    for kind in ("flat", "hier"):
        initial, reference = fit_weights(one_device, kind, "global", x, t)
        moved = max(
            float(np.max(np.abs(a - b))) for a, b in zip(reference, initial, strict=True)
        )
        for scope in ("global", "replica"):
            _, weights = fit_weights(mirrored, kind, scope, x, t)
            report[f"{kind}_{scope}"] = float(
                max(np.max(np.abs(a - b)) for a, b in zip(weights, reference, strict=True))
            )
        report[f"{kind}_moved"] = moved
        report[f"{kind}_replicas"] = int(mirrored.num_replicas_in_sync)
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
