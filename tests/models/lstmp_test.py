"""Tests of keras_moe.models.lstmp.ProjectedLSTM against a float64 NumPy step loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.models.lstmp import ProjectedLSTM, ProjectedLSTMCell
from tests.keras_moe import reference as ref

B, T, D, U, P = 3, 6, 5, 7, 4


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def numpy_lstmp(x, kernel, recurrent_kernel, bias, projection, mask=None):
    """Step-by-step LSTMP in float64; Keras's mask convention (see `ProjectedLSTM`)."""
    x = np.asarray(x, np.float64)
    batch, steps, _ = x.shape
    units, p = projection.shape
    r, c = np.zeros((batch, p)), np.zeros((batch, units))
    out, outputs = np.zeros((batch, p)), []
    for t in range(steps):
        z = x[:, t] @ kernel + r @ recurrent_kernel + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        r_new = (sigmoid(o) * np.tanh(c_new)) @ projection
        keep = np.ones((batch, 1), bool) if mask is None else mask[:, t, None]
        # Masked step: state carried over, output repeats the previous output.
        c, r = np.where(keep, c_new, c), np.where(keep, r_new, r)
        out = np.where(keep, r_new, out)
        outputs.append(out)
    return np.stack(outputs, axis=1), r, c


def randomized(layer, input_dim=D, seed=0):
    layer.build((None, None, input_dim))
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape) * 0.5)
    return layer


def weights_of(layer):
    cell = layer.cell
    return [ref.as_np(v) for v in (cell.kernel, cell.recurrent_kernel, cell.bias, cell.projection)]


def inputs(seed=1):
    return np.random.default_rng(seed).normal(size=(B, T, D)).astype("float32")


@pytest.mark.parametrize("unroll", [False, True])
def test_forward_equals_numpy_step_loop(unroll):
    layer = randomized(ProjectedLSTM(U, P, unroll=unroll))
    x = inputs()
    expected, _, _ = numpy_lstmp(x, *weights_of(layer))
    y = layer(x)
    assert tuple(y.shape) == (B, T, P)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_last_output_and_states():
    layer = randomized(ProjectedLSTM(U, P, return_sequences=False, return_state=True))
    x = inputs()
    expected, r, c = numpy_lstmp(x, *weights_of(layer))
    last, r_state, c_state = layer(x)
    np.testing.assert_allclose(last.numpy(), expected[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r_state.numpy(), r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c_state.numpy(), c, rtol=1e-5, atol=1e-5)


def test_initial_weights_follow_keras_lstm_conventions():
    layer = ProjectedLSTM(U, P, seed=3)
    layer.build((None, None, D))
    shapes = {w.name: tuple(w.shape) for w in layer.weights}
    assert shapes == {
        "kernel": (D, 4 * U), "recurrent_kernel": (P, 4 * U), "bias": (4 * U,),
        "projection": (U, P),
    }
    # Unit forget bias: gate order i, f, g, o.
    bias = layer.cell.bias.numpy()
    np.testing.assert_array_equal(bias, np.repeat([0.0, 1.0, 0.0, 0.0], U))


@pytest.mark.parametrize("unroll", [False, True])
def test_masked_steps_carry_the_state(unroll):
    layer = randomized(ProjectedLSTM(U, P, unroll=unroll), seed=2)
    x = inputs(3)
    # Leading, middle and trailing masked steps.
    mask = np.array(
        [[1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]], bool
    )
    expected, _, _ = numpy_lstmp(x, *weights_of(layer), mask=mask)
    y = layer(x, mask=mask).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The convention spelled out: a masked step repeats the last output,
    # zeros before the first unmasked step.
    np.testing.assert_array_equal(y[0, 4], y[0, 3])
    np.testing.assert_array_equal(y[1, 0], 0.0)
    np.testing.assert_array_equal(y[1, 2], y[1, 1])
    # Masked inputs have no effect at all.
    x2 = np.where(mask[..., None], x, 100.0).astype("float32")
    np.testing.assert_allclose(layer(x2, mask=mask).numpy(), y, atol=1e-6)


def test_identity_projection_is_keras_lstm_including_masking():
    # With P = I (projection_units == units) an LSTMP is a plain LSTM, so its
    # outputs, masked steps included, must be Keras's own LSTM's.
    layer = randomized(ProjectedLSTM(U, U), seed=4)
    layer.cell.projection.assign(np.eye(U))
    lstm = keras.layers.LSTM(U, return_sequences=True, use_cudnn=False)
    lstm.build((None, None, D))
    lstm.set_weights([w.numpy() for w in layer.weights[:3]])
    x = inputs(5)
    mask = np.array([[1, 1, 0, 1, 1, 0]] * B, bool)
    mask[1, 0] = False
    np.testing.assert_allclose(
        layer(x, mask=mask).numpy(), lstm(x, mask=mask).numpy(), rtol=1e-5, atol=1e-6
    )


def test_mask_from_embedding_is_used_and_passed_on():
    tokens = keras.Input(shape=(None,), dtype="int32")
    embedded = keras.layers.Embedding(10, D, mask_zero=True)(tokens)
    hidden = ProjectedLSTM(U, P, seed=0, name="lstmp")(embedded)
    out = keras.layers.LSTM(3, return_sequences=True, use_cudnn=False)(hidden)
    model = keras.Model(tokens, [hidden, out])
    ids = np.array([[3, 4, 0, 0], [0, 5, 6, 7]], np.int32)
    h, y = (t.numpy() for t in model(ids))
    np.testing.assert_array_equal(h[0, 2], h[0, 1])
    np.testing.assert_array_equal(h[1, 0], 0.0)
    # The next layer got the mask too: its padded step repeats as well.
    np.testing.assert_array_equal(y[0, 3], y[0, 1])
    assert model.get_layer("lstmp").compute_mask(ids, tf.not_equal(ids, 0)) is not None


def test_parameter_count():
    d, u, p = 9, 11, 3
    layer = ProjectedLSTM(u, p)
    layer.build((None, None, d))
    assert layer.count_params() == 4 * u * (d + p) + 4 * u + u * p


def test_layer_contract_and_fit_step():
    ref.run_layer_test(
        ProjectedLSTM, {"units": U, "projection_units": P, "seed": 1}, (B, T, D), (B, T, P), 4
    )


def test_config_round_trip():
    layer = ProjectedLSTM(U, P, return_sequences=False, unroll=True, seed=5, name="p")
    config = layer.get_config()
    for key, value in dict(
        units=U, projection_units=P, return_sequences=False, unroll=True, seed=5
    ).items():
        assert config[key] == value
    clone = ProjectedLSTM.from_config(config)
    assert clone.get_config() == config
    cell = ProjectedLSTMCell(U, P, seed=2)
    assert ProjectedLSTMCell.from_config(cell.get_config()).get_config() == cell.get_config()


def test_keras_save_and_reload(tmp_path):
    tokens = keras.Input(shape=(T,), dtype="int32")
    x = keras.layers.Embedding(10, D, mask_zero=True)(tokens)
    model = keras.Model(tokens, ProjectedLSTM(U, P, unroll=True, name="lstmp")(x))
    ids = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]], np.int32)
    path = str(tmp_path / "lstmp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("lstmp"), ProjectedLSTM)
    assert loaded.get_layer("lstmp").unroll
    np.testing.assert_array_equal(loaded(ids).numpy(), model(ids).numpy())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(units=0, projection_units=2), "units"),
        (dict(units=2.5, projection_units=2), "units"),
        (dict(units=True, projection_units=2), "units"),
        (dict(units=4, projection_units=0), "projection_units"),
        (dict(units=4, projection_units="2"), "projection_units"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be an integer >= 1. Received: {name}="):
        ProjectedLSTM(**kwargs)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        layer = ProjectedLSTM(U, P)
        y = layer(inputs(), mask=np.ones((B, T), bool))
    finally:
        keras.config.set_dtype_policy(previous)
    assert y.dtype == layer.compute_dtype != "float32"
    assert layer.cell.kernel.dtype == "float32"
    assert np.isfinite(np.asarray(tf.cast(y, tf.float32))).all()
