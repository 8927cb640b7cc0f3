"""Run by distributed_test.py in a fresh process: MoE on 1 device vs 4 replicas.

The CPU is split into 4 logical devices before TensorFlow starts, which is
only possible in a new process. Compares one device with 4 data-parallel
replicas (every replica holds every expert) and 4 expert-parallel replicas
(each holds a quarter of the experts). Prints one JSON object with the
largest differences found.
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
from keras_moe import expert_parallel as ep  # noqa: E402

D, N = 6, 32  # N tokens in the global batch, N / REPLICAS per replica
CLIPNORM = 0.05  # below every expert gradient's norm here: clipping is active

# Keras classes whose members a library could patch; `patched_members`
# compares them before and after everything below ran.
WATCHED = (keras.optimizers.Optimizer, keras.optimizers.Adam, keras.optimizers.SGD,
           keras.layers.Layer, keras.Model)


def class_members():
    return {
        (cls.__name__, name): id(value)
        for cls in WATCHED for klass in cls.__mro__ for name, value in vars(klass).items()
        if not name.startswith("__")  # Python fills in e.g. `__annotations__` lazily
    }


def make_layer(kind, scope, expert_parallel=False, expert_dropout=0.0):
    """`flat`: MoE(8 experts, k=2); `cap`: the same with capacity_factor 1 (drops
    pairs); `hier`: HierarchicalMoE(4 groups x 3 experts, 2 x 2)."""
    if kind in ("flat", "cap"):
        layer = keras_moe.MoE(
            8, 12, k=2, gating="top_k", importance_weight=0.5, load_weight=0.5,
            balancing_scope=scope, seed=1, name="moe", expert_parallel=expert_parallel,
            capacity_factor=1.0 if kind == "cap" else None, expert_dropout=expert_dropout,
        )
    else:
        layer = keras_moe.HierarchicalMoE(
            4, 3, 12, k_primary=2, k_secondary=2, gating="top_k", importance_weight=0.5,
            load_weight=0.5, balancing_scope=scope, seed=1, name="moe",
            expert_parallel=expert_parallel, expert_dropout=expert_dropout,
        )
    layer.build((None, D))
    rng = np.random.RandomState(7)
    for variable in layer.weights:
        if "seed_generator" in variable.path:
            continue
        if ep.is_sharded(variable):
            # The values one device holds, each replica given its share.
            shape = (variable.shape[0] * REPLICAS, *variable.shape[1:])
            ep.assign_shards(variable, rng.normal(0.0, 0.5, shape).astype("float32"))
        else:
            variable.assign(rng.normal(0.0, 0.5, variable.shape).astype("float32"))
    return layer


def values(variables):
    """Every variable's value as one device would hold it (all experts)."""
    return [ep.full_value(v) if ep.is_sharded(v) else v.numpy() for v in variables]


def single_device(kind, x, r):
    """Output, balancing loss and gradients of one call on the global batch."""
    layer = make_layer(kind, "global")
    assert layer.experts.w_in.shape[0] == layer.num_experts
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


def replicated(strategy, kind, scope, x, r, expert_parallel=False):
    """The same on 4 replicas with a custom `strategy.run` step."""
    with strategy.scope():
        layer = make_layer(kind, scope, expert_parallel)
    sharded = [ep.is_sharded(v) for v in layer.trainable_variables]
    assert any(sharded) == expert_parallel
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

        return strategy.run(replica_fn, args=(xs, rs))

    y, aux, grads = step(piece(x), piece(r))
    y = np.concatenate([t.numpy() for t in strategy.experimental_local_results(y)])
    auxes = [float(a) for a in strategy.experimental_local_results(aux)]
    # Data-parallel gradients are summed over the replicas; an expert shard's
    # gradient already holds every replica's tokens and belongs to its own
    # experts, so the shards are concatenated in replica order instead.
    total = []
    for g, own in zip(grads, sharded, strict=True):
        parts = [t.numpy() for t in strategy.experimental_local_results(g)]
        total.append(np.concatenate(parts) if own else np.sum(parts, axis=0))
    return y, auxes, total


def make_model(strategy, kind, scope, expert_parallel=False, optimizer="sgd"):
    keras.utils.set_random_seed(3)
    with strategy.scope():
        inputs = keras.Input((D,))
        moe = make_layer(kind, scope, expert_parallel)
        model = keras.Model(inputs, keras.layers.Dense(1, name="head")(moe(inputs)))
        rng = np.random.RandomState(11)
        head = model.get_layer("head")
        head.kernel.assign(rng.normal(0.0, 0.5, head.kernel.shape).astype("float32"))
        if optimizer == "sgd":
            optimizer = keras.optimizers.SGD(0.5)
        elif optimizer == "sgd_clipnorm":
            optimizer = keras.optimizers.SGD(0.5, clipnorm=CLIPNORM)
        else:
            optimizer = keras.optimizers.Adam(0.05)
        if expert_parallel:
            # The explicit opt-in: expert shards skip the all-reduce.
            optimizer = keras_moe.ExpertParallelOptimizer(optimizer)
        model.compile(optimizer, "mse")
    return model


def fit_weights(strategy, kind, scope, x, t, expert_parallel=False, optimizer="sgd"):
    """Weights after 3 steps of `fit` (global batch N) under `strategy`."""
    model = make_model(strategy, kind, scope, expert_parallel, optimizer)
    initial = values(model.trainable_weights)
    model.fit(x, t, batch_size=N, epochs=1, shuffle=False, verbose=0)
    return initial, values(model.trainable_weights)


def largest(a, b):
    return float(max(np.max(np.abs(u - v)) for u, v in zip(a, b, strict=True)))


def expert_parallel_checks(mirrored, one_device, x, t, r, report):
    """1 device vs 4 expert-parallel replicas; memory, saving, bad configurations."""
    for kind in ("flat", "cap", "hier"):
        y1, aux1, g1 = single_device(kind, x[:N], r)
        y4, aux4, g4 = replicated(mirrored, kind, "global", x[:N], r, expert_parallel=True)
        report[f"ep_{kind}_step"] = {
            "output": float(np.max(np.abs(y4 - y1))),
            "aux": float(max(abs(a - aux1) for a in aux4)),
            "grad": largest(g4, g1),
            "grad_scale": float(max(np.max(np.abs(b)) for b in g1)),
        }
    for kind, optimizer in (("flat", "sgd"), ("flat", "adam"), ("cap", "sgd")):
        initial, reference = fit_weights(one_device, kind, "global", x, t, optimizer=optimizer)
        _, weights = fit_weights(mirrored, kind, "global", x, t, True, optimizer)
        report[f"ep_{kind}_{optimizer}_fit"] = {
            "difference": largest(weights, reference), "moved": largest(reference, initial),
        }

    # Clipping by norm clips an expert's whole gradient (every replica's
    # shard), as one device does: after one step the experts are equal.
    # (The dense weights are not: Keras clips each replica's gradient of
    # them before summing.)
    clipped = {}
    for where, strategy, mode in (("one", one_device, False), ("replicas", mirrored, True)):
        model = make_model(strategy, "flat", "global", mode, "sgd_clipnorm")
        before = values(model.get_layer("moe").experts.weights)
        model.fit(x[:N], t[:N], batch_size=N, epochs=1, shuffle=False, verbose=0)
        clipped[where] = (before, values(model.get_layer("moe").experts.weights))
    report["ep_clipnorm_step"] = {
        "difference": largest(clipped["replicas"][1], clipped["one"][1]),
        "moved": largest(clipped["one"][1], clipped["one"][0]),
    }

    # Memory: bytes of expert weights each replica's device holds.
    per_device = {}
    for mode in (False, True):
        with mirrored.scope():
            layer = make_layer("flat", "global", mode)
        sizes = [0] * REPLICAS
        for variable in layer.experts.weights:
            for i, component in enumerate(ep.components(variable)):
                sizes[i] += component.numpy().nbytes
        per_device["expert_parallel" if mode else "data_parallel"] = sizes
    report["ep_memory_bytes"] = per_device

    # A model trained expert parallel saves all experts and all of Adam's
    # moments; it reloads on one device, equal to one device's training.
    single = make_model(one_device, "flat", "global", False, "adam")
    single.fit(x, t, batch_size=N, epochs=1, shuffle=False, verbose=0)
    model = make_model(mirrored, "flat", "global", True, "adam")
    model.fit(x, t, batch_size=N, epochs=1, shuffle=False, verbose=0)
    predicted = model.predict(x, batch_size=N, verbose=0)
    path = os.path.join(os.environ.get("EP_SCRIPT_TMP", "."), "ep.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    report["ep_reload"] = {
        "optimizer_variables": largest(
            [v.numpy() for v in reloaded.optimizer.variables],
            [v.numpy() for v in single.optimizer.variables],
        ),
        "optimizer_scale": float(max(np.max(np.abs(v.numpy())) for v in single.optimizer.variables[1:])),
        "w_in_shape": list(reloaded.get_layer("moe").experts.w_in.shape),
        "prediction": float(np.max(np.abs(reloaded.predict(x, verbose=0) - predicted))),
        "weights": largest(values(model.trainable_weights), values(reloaded.trainable_weights)),
    }
    # ...and loads back into 4 replicas, each taking its share.
    again = make_model(mirrored, "flat", "global", True, "adam")
    with mirrored.scope():
        again.optimizer.build(again.trainable_variables)
    again.load_weights(path)
    report["ep_reload"]["into_replicas"] = largest(
        values(again.trainable_weights), values(model.trainable_weights)
    )
    report["ep_reload"]["optimizer_into_replicas"] = largest(
        values(again.optimizer.variables), values(model.optimizer.variables)
    )

    errors = {}
    with mirrored.scope():
        try:
            keras_moe.MoE(6, 4, k=2, expert_parallel=True).build((None, D))
        except ValueError as error:
            errors["not_divisible"] = str(error)
        layer = keras_moe.MoE(8, 4, k=2, expert_parallel=True, name="moe_x")
        layer.build((None, D))
    try:
        layer(tf.constant(x[:4]))
    except ValueError as error:
        errors["cross_replica_call"] = str(error)
    report["ep_errors"] = errors
    report["ep_expert_dropout"] = expert_dropout_check(mirrored, x[:N])


def expert_dropout_check(strategy, x, draws=300):
    """Expert dropout on 4 expert-parallel replicas.

    Inference equals one device's layer (same weights); training calls
    differ from each other, and, the output being linear in each expert's
    hidden units, their mean is the inference output (largest z-score).
    """
    with strategy.scope():
        layer = make_layer("flat", "global", True, expert_dropout=0.5)
    one = make_layer("flat", "global", False, expert_dropout=0.5)
    shard = N // REPLICAS
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * shard:][:shard])
    )

    def gather(result):
        return np.concatenate([t.numpy() for t in strategy.experimental_local_results(result)])

    train = tf.function(lambda v: strategy.run(lambda x_r: layer(x_r, training=True), args=(v,)))
    infer = tf.function(lambda v: strategy.run(lambda x_r: layer(x_r, training=False), args=(v,)))
    expected = gather(infer(xs)).astype(np.float64)
    samples = np.stack([gather(train(xs)) for _ in range(draws)]).astype(np.float64)
    std = samples.std(0, ddof=1)
    z = np.abs(samples.mean(0) - expected) / np.maximum(std / np.sqrt(draws), 1e-12)
    return {
        "inference_vs_one_device": float(np.max(np.abs(expected - one(x, training=False).numpy()))),
        "spread": float(std.max()),
        "z": float(z.max()),
    }


def main():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(3 * N, D)).astype("float32")
    t = rng.normal(size=(3 * N, 1)).astype("float32")
    mirrored = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    report = {}
    members = class_members()
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
    expert_parallel_checks(mirrored, one_device, x, t, r, report)
    after = class_members()
    report["patched_members"] = sorted(
        f"{cls}.{name}" for (cls, name), value in after.items() if members.get((cls, name)) != value
    )
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
