"""`keras_moe.ExpertParallelOptimizer` on one device (the 4-replica checks run in
`distributed_test.py`).

On one device nothing is sharded and the wrapper must equal the optimizer
it wraps; the shard path (merge_call, `extended.update`, clipping by the
whole gradient's norm) is also exercised here on one replica by marking the
experts as shards by hand, where it must give Keras's own numbers too.
"""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import expert_parallel as ep

D = 6


def make_model(seed=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((D,))
    moe = keras_moe.MoE(4, 8, k=2, gating="top_k", seed=1, name="moe")
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(moe(inputs)))


def data():
    rng = np.random.RandomState(0)
    return rng.normal(size=(48, D)).astype("float32"), rng.normal(size=(48, 1)).astype("float32")


def train(optimizer, mark=False):
    model = make_model()
    if mark:
        for variable in model.get_layer("moe").experts.weights:
            ep.mark_sharded(variable)
    model.compile(optimizer, "mse")
    x, t = data()
    model.fit(x, t, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model


def arrays(variables):
    return [np.asarray(v.numpy()) for v in variables]


def largest(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "optimizer, message",
    [
        ("adam", "Received: optimizer='adam'"),
        (keras.optimizers.Adam(weight_decay=0.1), "Received: weight_decay=0.1"),
        (keras.optimizers.AdamW(), "Received: weight_decay=0.004"),
        (keras.optimizers.SGD(global_clipnorm=1.0), "Received: global_clipnorm=1.0"),
        (keras.optimizers.SGD(use_ema=True), "Received: use_ema=True"),
        (keras.optimizers.SGD(gradient_accumulation_steps=2),
         "Received: gradient_accumulation_steps=2"),
    ],
    ids=["not-an-optimizer", "weight-decay", "adamw", "global-clipnorm", "ema", "accumulation"],
)
def test_bad_arguments_are_named(optimizer, message):
    with pytest.raises(ValueError, match=message):
        keras_moe.ExpertParallelOptimizer(optimizer)


def test_other_arguments_belong_to_the_wrapped_optimizer():
    with pytest.raises(ValueError, match="learning_rate"):
        keras_moe.ExpertParallelOptimizer(keras.optimizers.SGD(), learning_rate=0.1)
    wrapped = keras_moe.ExpertParallelOptimizer(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="not already an `ExpertParallelOptimizer`"):
        keras_moe.ExpertParallelOptimizer(wrapped)


def test_one_device_training_equals_the_wrapped_optimizer():
    plain = train(keras.optimizers.Adam(0.05, clipnorm=0.5))
    wrapped = train(keras_moe.ExpertParallelOptimizer(keras.optimizers.Adam(0.05, clipnorm=0.5)))
    assert largest(arrays(wrapped.weights), arrays(plain.weights)) == 0.0
    assert largest(arrays(wrapped.weights), arrays(make_model().weights)) > 0.01
    # The wrapper shows the wrapped optimizer's state, in its order.
    assert [v.name for v in wrapped.optimizer.variables] == [
        v.name for v in plain.optimizer.variables
    ]
    assert largest(arrays(wrapped.optimizer.variables), arrays(plain.optimizer.variables)) == 0.0
    assert int(wrapped.optimizer.iterations.numpy()) == 3
    assert float(wrapped.optimizer.learning_rate) == pytest.approx(0.05)


def test_shard_path_gives_keras_numbers_on_one_replica():
    # Experts marked as shards of a 1-replica strategy take the wrapper's own
    # path: update before the step counter advances (Adam's bias
    # correction), the norm of the whole variable for `clipnorm` (active:
    # 0.05 is below the gradients' norms). One device must see Keras's numbers.
    plain = train(keras.optimizers.Adam(0.05, clipnorm=0.05))
    optimizer = keras_moe.ExpertParallelOptimizer(keras.optimizers.Adam(0.05, clipnorm=0.05))
    marked = train(optimizer, mark=True)
    assert largest(arrays(marked.weights), arrays(plain.weights)) < 1e-6
    # Adam's two moments of each marked variable are marked; nothing else.
    experts = marked.get_layer("moe").experts
    slots = [v for v in optimizer.variables if ep.is_sharded(v)]
    assert len(slots) == 2 * len(experts.weights)
    for slot in slots:
        owner = [w for w in experts.weights if slot.name.startswith(w.path.replace("/", "_") + "_")]
        assert len(owner) == 1 and tuple(slot.shape) == tuple(owner[0].shape)


# Slow (about 11 s: a SavedModel export and reload).
@pytest.mark.slow
def test_saved_model_reloads_with_the_wrapper(tmp_path):
    model = train(keras_moe.ExpertParallelOptimizer(keras.optimizers.Adam(0.05, clipnorm=0.5)))
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.optimizer, keras_moe.ExpertParallelOptimizer)
    config = reloaded.optimizer.get_config()["optimizer"]["config"]
    assert config["clipnorm"] == 0.5 and config["learning_rate"] == pytest.approx(0.05)
    assert largest(arrays(reloaded.optimizer.variables), arrays(model.optimizer.variables)) == 0.0
    assert largest(arrays(reloaded.weights), arrays(model.weights)) == 0.0
