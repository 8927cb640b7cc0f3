"""Deep experts (`expert_hidden_layers > 1`) against a float64 NumPy reference.

The reference here is a deep version of `reference.all_experts`: every
expert on every token, gates applied as a dense `[N, E]` matrix, and the
backward pass written out by hand (ReLU MLP backprop plus the gate path
through the softmax over the kept logits, as in
`reference.moe_reference_gradients`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from tests.keras_moe import reference as ref

D, H, L = 5, 4, 3


def deep_weights(layer):
    """`(w_in, b_in, w_hidden, b_hidden, w_out, b_out)` of a built MoE, float64."""
    ex = layer.experts
    return tuple(
        ref.as_np(v) for v in (ex.w_in, ex.b_in, ex.w_hidden, ex.b_hidden, ex.w_out, ex.b_out)
    )


def deep_forward(x, w_in, b_in, w_hidden, b_hidden, w_out, b_out):
    """Every expert on every token: `y [N, E, out]` and the pre-activations of each layer."""
    pres = [np.einsum("nd,edh->neh", x, w_in) + b_in[None]]
    for layer in range(w_hidden.shape[1]):
        pres.append(
            np.einsum("neh,ehk->nek", ref.relu(pres[-1]), w_hidden[:, layer])
            + b_hidden[None, :, layer]
        )
    y = np.einsum("neh,eho->neo", ref.relu(pres[-1]), w_out) + b_out[None]
    return y, pres


def deep_reference(x, w_gate, weights, k):
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    idx, gates = ref.top_k_gates(flat @ w_gate, k)
    dense = ref.dense_gates(idx, gates, w_gate.shape[1])
    y, _ = deep_forward(flat, *weights)
    return np.einsum("ne,neo->no", dense, y).reshape(x.shape[:-1] + (y.shape[-1],))


def deep_reference_gradients(x, w_gate, weights, k, r):
    """Gradients of `L = sum(y * r)` for flat `x [N, d]`, keyed like the variables."""
    w_in, b_in, w_hidden, b_hidden, w_out, b_out = weights
    logits = x @ w_gate
    idx, gates = ref.top_k_gates(logits, k)
    dense = ref.dense_gates(idx, gates, w_gate.shape[1])
    expert_out, pres = deep_forward(x, *weights)

    dy = dense[:, :, None] * r[:, None, :]  # dL/d(expert output) [N, E, out]
    g = {"w_out": np.einsum("neh,neo->eho", ref.relu(pres[-1]), dy), "b_out": dy.sum(0)}
    delta = np.einsum("neo,eho->neh", dy, w_out) * (pres[-1] > 0)
    g_w_hidden = np.zeros_like(w_hidden)
    g_b_hidden = np.zeros_like(b_hidden)
    for layer in reversed(range(w_hidden.shape[1])):
        g_w_hidden[:, layer] = np.einsum("neh,nek->ehk", ref.relu(pres[layer]), delta)
        g_b_hidden[:, layer] = delta.sum(0)
        delta = np.einsum("nek,ehk->neh", delta, w_hidden[:, layer]) * (pres[layer] > 0)
    g.update(w_hidden=g_w_hidden, b_hidden=g_b_hidden)
    g["w_in"] = np.einsum("nd,neh->edh", x, delta)
    g["b_in"] = delta.sum(0)
    g_x = np.einsum("neh,edh->nd", delta, w_in)

    # Gate path: dL/dG_ne = <r_n, E_e(x_n)>, through the softmax over kept logits.
    a_kept = np.take_along_axis(np.einsum("no,neo->ne", r, expert_out), idx, axis=-1)
    d_kept = gates * (a_kept - (gates * a_kept).sum(-1, keepdims=True))
    d_logits = np.zeros_like(logits)
    np.put_along_axis(d_logits, idx, d_kept, axis=-1)
    g["x"] = g_x + d_logits @ w_gate.T
    g["w_gate"] = x.T @ d_logits
    return g


def make_deep_moe(num_experts=5, k=2, layers=L, seed=0, **kwargs):
    layer = keras_moe.MoE(num_experts, H, k=k, expert_hidden_layers=layers, **kwargs)
    layer.build((None, D))
    rng = np.random.default_rng(seed)
    layer.gating.w_gate.assign(rng.normal(size=layer.gating.w_gate.shape) * 1.5)
    for v in layer.experts.trainable_weights:
        v.assign(rng.normal(size=v.shape) * 0.6)
    return layer


def normal(rng, *shape):
    return rng.normal(size=shape).astype("float32")


# capacity_factor=100 keeps every pair, so that path must equal the dropless
# one; it evaluates the experts with `call` ([E, C, d] einsums) instead of
# `apply_partitioned` (the per-expert loop).
DISPATCH = pytest.mark.parametrize("capacity_factor", [None, 100.0], ids=["dropless", "capacity"])


@DISPATCH
def test_forward_equals_numpy_reference(capacity_factor):
    layer = make_deep_moe(capacity_factor=capacity_factor)
    assert tuple(layer.experts.w_hidden.shape) == (5, L - 1, H, H)
    assert tuple(layer.experts.b_hidden.shape) == (5, L - 1, H)
    x = normal(np.random.default_rng(1), 2, 4, D)
    expected = deep_reference(x, ref.as_np(layer.gating.w_gate), deep_weights(layer), layer.k)
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)


@DISPATCH
def test_gradients_equal_numpy_reference(capacity_factor):
    layer = make_deep_moe(capacity_factor=capacity_factor, seed=2)
    rng = np.random.default_rng(3)
    x = tf.constant(normal(rng, 2, 4, D))
    r = normal(rng, 2, 4, D)
    ex = layer.experts
    variables = {
        "w_in": ex.w_in, "b_in": ex.b_in, "w_hidden": ex.w_hidden, "b_hidden": ex.b_hidden,
        "w_out": ex.w_out, "b_out": ex.b_out, "w_gate": layer.gating.w_gate,
    }
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=False) * r)
    grads = tape.gradient(loss, {"x": x, **variables})
    expected = deep_reference_gradients(
        x.numpy().reshape(-1, D).astype(np.float64), ref.as_np(layer.gating.w_gate),
        deep_weights(layer), layer.k, r.reshape(-1, D).astype(np.float64),
    )
    expected["x"] = expected["x"].reshape(2, 4, D)
    for name, g in grads.items():
        np.testing.assert_allclose(
            tf.convert_to_tensor(g).numpy(), expected[name], rtol=1e-5, atol=1e-5, err_msg=name
        )
    # The extra layers and the gate path both get a real gradient.
    assert np.abs(expected["w_hidden"]).max() > 1e-2
    assert np.abs(expected["w_gate"]).max() > 1e-2


def test_call_and_apply_partitioned_agree():
    experts = keras_moe.FeedForwardExperts(3, H, num_hidden_layers=4, seed=1)
    x = normal(np.random.default_rng(4), 3, 6, D)
    batched = experts(x).numpy()
    looped = experts.apply_partitioned([x[e] for e in range(3)])
    np.testing.assert_allclose(np.stack([t.numpy() for t in looped]), batched, atol=1e-6)


def test_parameter_count_formula():
    e, d, h, layers, out = 6, 7, 3, 4, 2
    layer = keras_moe.MoE(e, h, k=2, output_dim=out, expert_hidden_layers=layers)
    layer.build((None, d))
    per_expert = d * h + h + (layers - 1) * (h * h + h) + h * out + out
    gating = 2 * d * e  # w_gate and w_noise
    assert layer.count_params() == e * per_expert + gating
    hier = keras_moe.HierarchicalMoE(2, 3, h, k_primary=1, k_secondary=2, expert_hidden_layers=layers)
    hier.build((None, d))
    assert hier.experts.count_params() == e * (d * h + h + (layers - 1) * (h * h + h) + h * d + d)
    # num_hidden_layers=1 creates no hidden stack at all.
    shallow = keras_moe.FeedForwardExperts(e, h)
    shallow.build((None, d))
    assert shallow.w_hidden is None and len(shallow.weights) == 4


def test_hierarchical_deep_experts_run():
    layer = keras_moe.HierarchicalMoE(2, 3, H, k_primary=1, k_secondary=2, expert_hidden_layers=2)
    y = layer(normal(np.random.default_rng(5), 4, D), training=True)
    assert tuple(y.shape) == (4, D)
    assert tuple(layer.experts.w_hidden.shape) == (6, 1, H, H)


@pytest.mark.parametrize("cls", [keras_moe.MoE, keras_moe.HierarchicalMoE])
def test_config_round_trip(cls):
    args = (4, H) if cls is keras_moe.MoE else (2, 2, H)
    layer = cls(*args, expert_hidden_layers=3)
    config = layer.get_config()
    assert config["expert_hidden_layers"] == 3
    clone = cls.from_config(config)
    assert clone.expert_hidden_layers == 3 and clone.experts.num_hidden_layers == 3
    assert clone.get_config() == config
    experts = keras_moe.FeedForwardExperts(2, H, num_hidden_layers=3)
    assert keras_moe.FeedForwardExperts.from_config(experts.get_config()).num_hidden_layers == 3


def test_keras_save_and_reload(tmp_path):
    inputs = keras.Input(shape=(3, D))
    model = keras.Model(inputs, keras_moe.MoE(4, H, k=2, expert_hidden_layers=3, name="moe")(inputs))
    moe = model.get_layer("moe")
    moe.gating.w_gate.assign(np.random.default_rng(6).normal(size=(D, 4)))
    x = normal(np.random.default_rng(7), 2, 3, D)
    path = str(tmp_path / "deep.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("moe").expert_hidden_layers == 3
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_moe_1_deep_is_a_plain_four_layer_relu_mlp():
    # The paper's MoE-1-Deep (App. C.1): one expert, k=1, 4 hidden layers.
    # The single gate is softmax over one logit = 1, so the layer is the MLP.
    layer = make_deep_moe(num_experts=1, k=1, layers=4, seed=8)
    ex = layer.experts
    x = normal(np.random.default_rng(9), 6, D)
    h = ref.relu(x @ ref.as_np(ex.w_in)[0] + ref.as_np(ex.b_in)[0])
    for i in range(3):
        h = ref.relu(h @ ref.as_np(ex.w_hidden)[0, i] + ref.as_np(ex.b_hidden)[0, i])
    expected = h @ ref.as_np(ex.w_out)[0] + ref.as_np(ex.b_out)[0]
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_invalid_hidden_layers(bad):
    with pytest.raises(ValueError, match="expert_hidden_layers"):
        keras_moe.MoE(4, H, expert_hidden_layers=bad)
    with pytest.raises(ValueError, match="expert_hidden_layers"):
        keras_moe.HierarchicalMoE(2, 2, H, expert_hidden_layers=bad)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        keras_moe.FeedForwardExperts(2, H, num_hidden_layers=bad)
