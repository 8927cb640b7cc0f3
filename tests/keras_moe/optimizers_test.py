"""`keras_moe.optimizers.FactoredAdam` against a float64 NumPy reference of App. D."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe.optimizers import FactoredAdam


def reference_steps(w, grads, lr, beta_2, epsilon, factored):
    """App. D written out literally in float64: no first moment, R and C averages."""
    w = w.astype(np.float64).copy()
    if factored:
        rows = np.zeros(w.shape[:-1])
        cols = np.zeros(w.shape[:-2] + w.shape[-1:])
    else:
        full = np.zeros(w.shape)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if factored:
            rows = beta_2 * rows + (1 - beta_2) * (g**2).mean(axis=-1)
            cols = beta_2 * cols + (1 - beta_2) * (g**2).mean(axis=-2)
            v = np.einsum("...i,...j->...ij", rows, cols) / rows.mean(axis=-1)[..., None, None]
        else:
            full = beta_2 * full + (1 - beta_2) * g**2
            v = full
        w -= lr * g / (np.sqrt(v / (1 - beta_2**t)) + epsilon)
    return w


@pytest.mark.parametrize("shape, factored", [
    ((5,), False),        # a bias: full second moment
    ((4, 6), True),       # a matrix
    ((3, 4, 6), True),    # stacked expert weights [E, d, h]: statistics per expert
    ((3, 1, 6), False),   # an axis under min_dim_to_factor=2: not factored
])
def test_steps_equal_the_numpy_reference(shape, factored):
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=shape).astype(np.float32)
    # Gradients of changing scale per row and column, so that a wrong axis shows.
    grads = [(rng.normal(size=shape) * (1 + np.arange(shape[-1]))).astype(np.float32)
             for _ in range(5)]
    opt = FactoredAdam(learning_rate=0.01, beta_2=0.9, epsilon=1e-6)
    w = keras.Variable(w0)
    for g in grads:
        opt.apply_gradients([(g, w)])
    assert opt.factored(w) is factored
    expected = reference_steps(w0, grads, 0.01, 0.9, 1e-6, factored)
    np.testing.assert_allclose(w.numpy(), expected, rtol=2e-5, atol=2e-6)


def test_one_optimizer_keeps_each_variables_own_state():
    # A bias, a matrix and stacked expert weights [E, d, h] updated together
    # for several steps: each against its own reference (no state mixed up
    # between variables, experts factored one by one).
    rng = np.random.default_rng(11)
    shapes = {"bias": (7,), "matrix": (5, 3), "experts": (4, 6, 8), "expert_bias": (4, 1)}
    initial = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    steps = [{k: (rng.normal(size=s) * rng.uniform(0.1, 3.0, size=s[-1:])).astype(np.float32)
              for k, s in shapes.items()} for _ in range(6)]
    variables = {k: keras.Variable(v, name=k) for k, v in initial.items()}
    opt = FactoredAdam(learning_rate=0.02, beta_2=0.8, epsilon=1e-5)
    for grads in steps:
        opt.apply_gradients([(grads[k], variables[k]) for k in shapes])
    assert [len(opt.second_moment_variables(variables[k])) for k in shapes] == [1, 2, 2, 1]
    for name, shape in shapes.items():
        factored = len(shape) >= 2 and min(shape[-2:]) >= 2
        expected = reference_steps(initial[name], [g[name] for g in steps], 0.02, 0.8, 1e-5,
                                   factored)
        np.testing.assert_allclose(variables[name].numpy(), expected, rtol=2e-5, atol=2e-6,
                                   err_msg=name)


def test_sparse_gradients_of_an_embedding_equal_their_dense_form():
    # `fit` hands an embedding's gradient over as tf.IndexedSlices: the
    # looked-up rows only. The update is that of the dense gradient.
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(6, 4)).astype(np.float32)
    steps = [(np.array([0, 2, 2]), rng.normal(size=(3, 4)).astype(np.float32)),
             (np.array([5, 1, 0]), rng.normal(size=(3, 4)).astype(np.float32))]
    dense_grads = []
    for rows, values in steps:
        dense = np.zeros_like(w0)
        np.add.at(dense, rows, values)
        dense_grads.append(dense)
    w = keras.Variable(w0)
    opt = FactoredAdam(learning_rate=0.05, beta_2=0.9, epsilon=1e-6)
    for rows, values in steps:
        opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(rows),
                                               tf.constant([6, 4])), w)])
    expected = reference_steps(w0, dense_grads, 0.05, 0.9, 1e-6, factored=True)
    np.testing.assert_allclose(w.numpy(), expected, rtol=2e-5, atol=2e-6)


def test_rank_one_squared_gradient_is_estimated_exactly():
    # g^2 = a b^T: the factored second moment equals Adam's (beta_1 = 0) full one.
    a, b = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 4.0, 2.0])
    g = np.sqrt(np.outer(a, b)).astype(np.float32)
    factored, full = keras.Variable(np.zeros((3, 4), "float32")), keras.Variable(
        np.zeros((3, 4), "float32"))
    FactoredAdam(learning_rate=0.1, beta_2=0.5).apply_gradients([(g, factored)])
    FactoredAdam(learning_rate=0.1, beta_2=0.5, min_dim_to_factor=10).apply_gradients(
        [(g, full)])
    np.testing.assert_allclose(factored.numpy(), full.numpy(), rtol=1e-6)
    # First step with bias correction: every entry moves by lr * sign(g).
    np.testing.assert_allclose(factored.numpy(), -0.1 * np.ones((3, 4)), rtol=1e-5)


def test_state_is_rows_plus_columns_per_expert():
    # E=8 experts of d=64 x h=128: Adam keeps 2 * E * d * h floats, FactoredAdam E * (d + h).
    w = keras.Variable(np.zeros((8, 64, 128), "float32"))
    bias = keras.Variable(np.zeros((8, 128), "float32"))
    factored, adam = FactoredAdam(), keras.optimizers.Adam()
    factored.build([w, bias])
    adam.build([w, bias])

    def state(opt):
        return sum(int(np.prod(v.shape)) for v in opt.variables
                   if v is not opt.iterations and "learning_rate" not in v.path)

    assert state(adam) == 2 * (8 * 64 * 128 + 8 * 128)
    # The [8, 128] bias is a matrix too (E x h), factored into 8 + 128.
    assert state(factored) == 8 * (64 + 128) + (8 + 128)


def test_trains_an_moe_with_fit_and_round_trips_through_keras_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x[:, :1] * 2.0 - x[:, 1:2]).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((16,)),
        keras_moe.MoE(num_experts=4, expert_hidden_dim=8, k=2, name="moe"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=FactoredAdam(learning_rate=0.01), loss="mse")
    first = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    assert model.evaluate(x, y, verbose=0, return_dict=True)["loss"] < 0.5 * first
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, FactoredAdam)
    assert loaded.optimizer.get_config()["beta_2"] == 0.999
    saved, restored = model.optimizer.variables, loaded.optimizer.variables
    assert len(restored) == len(saved)
    for before, after in zip(saved, restored, strict=True):
        np.testing.assert_array_equal(after.numpy(), before.numpy())


def test_restored_slots_continue_training_identically(tmp_path):
    # Deterministic routing (top-k without noise), so that only the
    # optimizer's state can make the two continuations differ.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.normal(size=(64, 8)).astype("float32")
    model = keras.Sequential([
        keras.Input((8,)), keras_moe.MoE(4, 16, k=2, gating="top_k", seed=1, name="moe")])
    model.compile(optimizer=FactoredAdam(learning_rate=0.01, beta_2=0.9), loss="mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    fresh = keras.saving.load_model(path)
    fresh.compile(optimizer=FactoredAdam(learning_rate=0.01, beta_2=0.9), loss="mse")
    for m in (model, loaded, fresh):
        m.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    for before, after in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-5, atol=1e-6)
    # With the slots reset instead, the step differs: the check has teeth.
    assert any(not np.allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
               for a, b in zip(model.weights, fresh.weights, strict=True))


@pytest.mark.parametrize("kwargs, match", [
    ({"beta_2": 1.0}, "beta_2"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"min_dim_to_factor": 0}, "min_dim_to_factor"),
    ({"min_dim_to_factor": True}, "min_dim_to_factor"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactoredAdam(**kwargs)
