"""`recompute_hidden=True`: the experts' hidden activations recomputed in backward (App. D).

Outputs and gradients must be those of the plain path, on every way the
experts are evaluated (capacity buffers, the unrolled dropless loop, the
`tf.while_loop` dropless path), eagerly and in graphs; dropout must draw the
same mask in the recomputation as in the forward pass (checked against
finite differences of the forward pass itself); and the graph of a
recomputed step must not keep the `[rows, h]` hidden activation for backward.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import dispatch
from keras_moe.experts import FeedForwardExperts

D, H, E, N, K = 6, 12, 4, 9, 2


def _pairs():
    rng = np.random.default_rng(3)
    token_index = np.repeat(np.arange(N), K).astype("int32")
    expert_index = rng.integers(0, E, N * K).astype("int32")
    expert_index[:K] = 0  # expert 3 may stay empty; expert 0 never does
    gate = rng.random(N * K).astype("float32")
    return tf.constant(token_index), tf.constant(expert_index), tf.constant(gate)


def _experts(recompute, dropout=0.0, layers=2, dtype="float32"):
    experts = FeedForwardExperts(E, H, seed=5, num_hidden_layers=layers, dropout=dropout,
                                 recompute_hidden=recompute, dtype=dtype)
    experts.build((D,))
    return experts


def _loss_and_grads(experts, x, path, use_function, training=False):
    token_index, expert_index, gate = _pairs()

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            if path == "capacity":
                y = experts(tf.reshape(tf.concat([x, x[:3]], 0), [E, 3, D]), training=training)
            else:
                y = dispatch.dropless_dispatch(x, token_index, expert_index, gate, experts, N,
                                               training=training, strategy=path)
            loss = tf.reduce_sum(tf.sin(y))
        grads = tape.gradient(loss, [x] + experts.trainable_variables)
        return [loss] + [tf.convert_to_tensor(g) for g in grads]

    fn = tf.function(step) if use_function else step
    return [t.numpy() for t in fn(x)]


@pytest.mark.parametrize("use_function", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("path", ["capacity", "unrolled", "loop"])
def test_outputs_and_gradients_equal_the_plain_path(path, use_function):
    x = tf.constant(np.random.default_rng(0).normal(size=(N, D)).astype("float32"))
    plain = _loss_and_grads(_experts(False), x, path, use_function)
    recomputed = _loss_and_grads(_experts(True), x, path, use_function)
    assert len(recomputed) == len(plain) == 1 + 1 + 6  # loss, x, six expert variables
    for expected, got in zip(plain, recomputed, strict=True):
        assert np.any(expected != 0)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["capacity", "unrolled", "loop"])
def test_dropout_mask_is_replayed_in_the_recomputation(path):
    # The recomputed backward is right only if it draws the forward pass's
    # masks again: the analytic gradient must equal a central difference of
    # the forward pass run from the same seed-generator state.
    experts = _experts(True, dropout=0.4, dtype="float64")
    state = experts.seed_generator.state.numpy()
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(N, D)))
    direction = rng.normal(size=(N, D))
    grads = _loss_and_grads(experts, x, path, use_function=False, training=True)

    def loss_at(t):
        experts.seed_generator.state.assign(state)
        return _loss_and_grads(experts, tf.constant(t), path, False, training=True)[0]

    experts.seed_generator.state.assign(state)
    eps = 1e-6
    numeric = (loss_at(x.numpy() + eps * direction) - loss_at(x.numpy() - eps * direction)) / (
        2 * eps)
    np.testing.assert_allclose(np.sum(grads[1] * direction), numeric, rtol=1e-6)
    # Dropout really applied: the same state without training gives another loss.
    assert abs(loss_at(x.numpy()) - _loss_and_grads(experts, x, path, False)[0]) > 1e-3


def _hidden_kept_for_backward(recompute):
    # Count float tensors of width H computed by the step's forward graph
    # and consumed by its gradient ops: the activations kept for backward.
    experts = _experts(recompute, layers=1)
    x = tf.zeros([N, D])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(experts(tf.reshape(tf.concat([x, x[:3]], 0), [E, 3, D])))
        return tape.gradient(loss, [x] + experts.trainable_variables)

    operations = step.get_concrete_function(x).graph.get_operations()
    # Operations are listed in creation order: the forward pass, then the
    # gradient's (the recomputation included).
    first_backward = next(i for i, op in enumerate(operations) if "gradient_tape" in op.name)
    forward = set(operations[:first_backward])
    kept = set()
    for op in operations[first_backward:]:
        for tensor in op.inputs:
            if tensor.op in forward and tensor.op.type not in ("ReadVariableOp", "Cast") \
                    and tensor.shape.rank == 3 and tensor.shape[-1] == H:
                kept.add(tensor.name)
    return kept


def test_recomputed_graph_keeps_no_hidden_activation_for_backward():
    assert _hidden_kept_for_backward(False)  # the plain path keeps [E, C, h]
    assert not _hidden_kept_for_backward(True)


def test_moe_layers_pass_it_to_their_experts_and_round_trip():
    for layer in (keras_moe.MoE(4, 8, k=2, recompute_hidden=True),
                  keras_moe.HierarchicalMoE(2, 2, 8, recompute_hidden=True)):
        assert layer.experts.recompute_hidden is True
        config = layer.get_config()
        assert config["recompute_hidden"] is True
        assert type(layer).from_config(config).experts.recompute_hidden is True
    assert keras_moe.MoE(4, 8, k=2).get_config()["recompute_hidden"] is False
    experts = FeedForwardExperts(3, 4, recompute_hidden=True)
    assert FeedForwardExperts.from_config(experts.get_config()).recompute_hidden is True
    with pytest.raises(ValueError, match="recompute_hidden=1"):
        FeedForwardExperts(3, 4, recompute_hidden=1)


# The loop path runs in `make test`; the other two (about 9 s each) are slow.
@pytest.mark.parametrize("capacity_factor, loop", [
    pytest.param(None, False, marks=pytest.mark.slow), (None, True),
    pytest.param(2.0, False, marks=pytest.mark.slow),
], ids=["unrolled", "loop", "capacity"])
def test_fit_matches_the_plain_model(capacity_factor, loop, tmp_path, monkeypatch):
    if loop:  # the while_loop dropless path, whatever the number of experts
        monkeypatch.setattr(dispatch, "LOOP_MIN_EXPERTS", 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5, 8)).astype("float32")
    y = rng.normal(size=(64, 5, 8)).astype("float32")

    def trained(recompute):
        keras.utils.set_random_seed(4)
        inputs = keras.Input((5, 8))
        moe = keras_moe.HierarchicalMoE(2, 3, 16, capacity_factor=capacity_factor, seed=2,
                                        recompute_hidden=recompute, name="moe")
        model = keras.Model(inputs, moe(inputs))
        model.compile(keras.optimizers.Adam(0.01), "mse")
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        return model, history.history["loss"]

    plain, plain_loss = trained(False)
    recomputed, loss = trained(True)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-4)
    assert loss[-1] < loss[0]
    for a, b in zip(plain.weights, recomputed.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
    path = str(tmp_path / "m.keras")
    recomputed.save(path)
    assert keras.saving.load_model(path).get_layer("moe").experts.recompute_hidden is True
