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


def single_device(kind, x, r):
    """Output, balancing loss and gradients of one call on the global batch."""
    layer = make_layer(kind, "global")
    with tf.GradientTape() as tape:
        y, routing = layer(x, training=True, return_routing=True)
        loss = tf.reduce_sum(y * r) / N + routing.aux_loss
    grads = tape.gradient(loss, layer.trainable_variables)
    return y.numpy(), float(routing.aux_loss), _arrays(grads, layer.trainable_variables)


def _arrays(grads, variables):
    # W_noise is unused by top_k gating: its gradient is None (zero).
    return [
        np.zeros(v.shape, "float32") if g is None else np.asarray(g)
        for g, v in zip(grads, variables, strict=True)
    ]


def replicated(strategy, kind, scope, x, r):
    """The same on 4 replicas with a custom `strategy.run` step."""
    with strategy.scope():
        layer = make_layer(kind, scope)
    shard = N // REPLICAS

    def piece(array):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * shard:][:shard])
        )

    @tf.function
    def step(xs, rs):
        def replica_fn(x_r, r_r):
            with tf.GradientTape() as tape:
                y_r, routing = layer(x_r, training=True, return_routing=True)
                # As Keras does: added losses are divided by the replica count
                # and the replicas' gradients are summed.
                loss = tf.reduce_sum(y_r * r_r) / N + routing.aux_loss / REPLICAS
            grads = tape.gradient(loss, layer.trainable_variables)
            grads = [
                tf.zeros_like(v) if g is None else g
                for g, v in zip(grads, layer.trainable_variables, strict=True)
            ]
            return y_r, routing.aux_loss, grads

        y, aux, grads = strategy.run(replica_fn, args=(xs, rs))
        return y, aux, [strategy.reduce("SUM", g, axis=None) for g in grads]

    y, aux, grads = step(piece(x), piece(r))
    y = np.concatenate([t.numpy() for t in strategy.experimental_local_results(y)])
    auxes = [float(a) for a in strategy.experimental_local_results(aux)]
    return y, auxes, [g.numpy() for g in grads]


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
    r = rng.normal(size=(N, D)).astype("float32")
    for kind in ("flat", "hier"):
        y1, aux1, g1 = single_device(kind, x[:N], r)
        for scope in ("global", "replica"):
            y4, aux4, g4 = replicated(mirrored, kind, scope, x[:N], r)
            report[f"{kind}_{scope}_step"] = {
                "output": float(np.max(np.abs(y4 - y1))),
                "aux": float(max(abs(a - aux1) for a in aux4)),
                "grad": float(max(np.max(np.abs(a - b)) for a, b in zip(g4, g1, strict=True))),
                "grad_scale": float(max(np.max(np.abs(b)) for b in g1)),
                "aux_value": aux1,
            }
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
