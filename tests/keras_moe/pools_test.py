"""Tests of document-level expert pools (`keras_moe.pools`, EMO) in `MoE` and `HierarchicalMoE`.

Expected values come from the NumPy loops of tests/keras_moe/reference.py
(pools, masked top-k, smooth load, gradients) or from the plain layer.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from tests.keras_moe import reference as ref

D = 5


def normal(rng, *shape):
    return rng.normal(size=shape).astype("float32")


def randomize(layer, rng, gate_scale=1.5):
    gating = layer.gating
    if isinstance(layer, keras_moe.HierarchicalMoE):
        gating.primary.w_gate.assign(rng.normal(size=gating.primary.w_gate.shape) * gate_scale)
        gating.primary.w_noise.assign(rng.normal(size=gating.primary.w_noise.shape) * 0.5)
        gating.w_noise.assign(rng.normal(size=gating.w_noise.shape) * 0.5)
    elif getattr(gating, "noisy", False):
        gating.w_noise.assign(rng.normal(size=gating.w_noise.shape) * 0.5)
    gating.w_gate.assign(rng.normal(size=gating.w_gate.shape) * gate_scale)
    for v in layer.experts.weights:
        v.assign(rng.normal(size=v.shape) * 0.6)


def make(cls=keras_moe.MoE, *args, rng=None, **kwargs):
    layer = cls(*args, **kwargs)
    layer.build((None, D))
    randomize(layer, rng if rng is not None else np.random.default_rng(0))
    return layer


def twin(layer, **overrides):
    """The same layer (config, weights, seed) with `overrides`."""
    config = {**layer.get_config(), **overrides}
    other = type(layer).from_config(config)
    other.build((None, D))
    other.set_weights(layer.get_weights())
    return other


def primary_logits(layer, x):
    g = layer.gating
    w = g.primary.w_gate if isinstance(layer, keras_moe.HierarchicalMoE) else g.w_gate
    return np.asarray(x, np.float64).reshape(-1, D) @ ref.as_np(w)


def safe_pools(routing, ref_pools, gaps, documents, per_unit=1):
    """TF pools equal the NumPy ones (documents whose P-th place is a near tie skipped)."""
    tf_pools = routing.pools.numpy()
    index = routing.document_index.numpy().reshape(-1)
    docs = np.asarray(documents).reshape(-1)
    checked = 0
    for n, row in enumerate(index):
        if row < 0 or gaps[docs[n]] < 1e-5:
            continue
        expected = ref_pools[docs[n]]
        if per_unit > 1:
            expected = (expected[:, None] * per_unit + np.arange(per_unit)).reshape(-1)
        np.testing.assert_array_equal(tf_pools[row], expected)
        checked += 1
    return checked


# ------------------------------------------------------ P = E: the plain layer ---


@pytest.mark.parametrize("gating", ["noisy_top_k", "top_k", "switch"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_a_pool_of_every_expert_is_the_plain_layer(gating, capacity_factor, masked):
    rng = np.random.default_rng(1)
    k = 1 if gating == "switch" else 2
    plain = make(keras_moe.MoE, 6, 4, k=k, gating=gating, capacity_factor=capacity_factor,
                 seed=5, rng=rng)
    pooled = twin(plain, pool_size=6)
    ranged = twin(plain, pool_size=6, pool_size_range=(6, 6))
    x = normal(rng, 3, 7, D)
    mask = rng.random((3, 7)) > 0.3 if masked else None
    for training in (True, False, True):
        y0, r0 = plain(x, training=training, mask=mask, return_routing=True)
        for layer in (pooled, ranged):
            y, r = layer(x, training=training, mask=mask, return_routing=True)
            np.testing.assert_array_equal(y.numpy(), y0.numpy())
            for field in ("expert_indices", "gates", "importance", "load", "counts",
                          "aux_loss", "dropped_fraction", "noise_std"):
                a, b = getattr(r, field), getattr(r0, field)
                assert (a is None) == (b is None), field
                if a is not None:
                    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=field)
            assert r.pools.shape == (3, 6) and r0.pools is None
    if gating == "noisy_top_k":
        assert r0.noise_std is not None


def test_a_hierarchical_pool_of_every_group_is_the_plain_layer():
    rng = np.random.default_rng(2)
    plain = make(keras_moe.HierarchicalMoE, 3, 3, 4, k_primary=2, k_secondary=2, seed=3, rng=rng)
    pooled = twin(plain, pool_size=3)
    x = normal(rng, 2, 6, D)
    for training in (True, False):
        y0, r0 = plain(x, training=training, return_routing=True)
        y, r = pooled(x, training=training, return_routing=True)
        np.testing.assert_array_equal(y.numpy(), y0.numpy())
        np.testing.assert_array_equal(r.expert_indices.numpy(), r0.expert_indices.numpy())
        np.testing.assert_array_equal(r.load.numpy(), r0.load.numpy())
        np.testing.assert_array_equal(r.aux_loss.numpy(), r0.aux_loss.numpy())
        assert r.pools.shape == (2, 9)


# --------------------------------------------------- pools and leakage ---


@pytest.mark.parametrize("capacity_factor", [None, 2.0])
@pytest.mark.parametrize("pool_by", ["row", "document_ids"])
def test_no_token_leaves_its_numpy_pool(capacity_factor, pool_by):
    rng = np.random.default_rng(3)
    e, k, p = 10, 2, 3
    layer = make(keras_moe.MoE, e, 4, k=k, pool_size=p, pool_by=pool_by,
                 capacity_factor=capacity_factor, seed=1, rng=rng)
    checked = 0
    for trial in range(4):
        b, t = 6, 25
        x = normal(rng, b, t, D)
        mask = rng.random((b, t)) > 0.2
        if pool_by == "row":
            documents, kwargs = np.repeat(np.arange(b)[:, None], t, axis=1), {}
        else:  # 30 documents over the batch, across rows
            documents = rng.integers(100, 130, size=(b, t))
            kwargs = {"document_ids": documents}
        routing = layer(x, training=trial % 2 == 0, mask=mask, return_routing=True, **kwargs)[1]
        pools, gaps = ref.document_pools(primary_logits(layer, x), documents, p, mask)
        checked += safe_pools(routing, pools, gaps, documents)
        allowed = ref.pool_mask(documents, pools, e)
        experts = routing.expert_indices.numpy().reshape(-1, k)
        index = routing.document_index.numpy().reshape(-1)
        assert np.array_equal(index >= 0, mask.reshape(-1))
        assert np.all(experts[~mask.reshape(-1)] == -1)
        for n in np.flatnonzero(mask.reshape(-1)):
            # Against the layer's own pools (exact) and the NumPy pools.
            assert set(experts[n]) <= set(routing.pools.numpy()[index[n]]), n
            if gaps[documents.reshape(-1)[n]] >= 1e-5:
                assert allowed[n, experts[n]].all(), n
        # Pools differ between documents: the test is not trivial.
        assert len({tuple(sorted(v)) for v in pools.values()}) > 1
    assert checked > 300


def test_hierarchical_pools_are_groups_and_no_token_leaves_them():
    rng = np.random.default_rng(4)
    groups, per_group, kp, ks, p = 5, 3, 2, 2, 2
    layer = make(keras_moe.HierarchicalMoE, groups, per_group, 4, k_primary=kp, k_secondary=ks,
                 pool_size=p, pool_by="document_ids", seed=2, rng=rng)
    x = normal(rng, 4, 20, D)
    documents = rng.integers(0, 12, size=(4, 20))
    mask = rng.random((4, 20)) > 0.2
    for training in (True, False):
        routing = layer(x, training=training, mask=mask, document_ids=documents,
                        return_routing=True)[1]
        pools, gaps = ref.document_pools(primary_logits(layer, x), documents, p, mask)
        assert safe_pools(routing, pools, gaps, documents, per_unit=per_group) > 50
        groups_used = routing.expert_indices.numpy().reshape(-1, kp * ks) // per_group
        for n in np.flatnonzero(mask.reshape(-1)):
            doc = documents.reshape(-1)[n]
            if gaps[doc] >= 1e-5:
                assert set(groups_used[n]) <= set(pools[doc]), n


def test_pooled_output_and_gates_equal_the_numpy_reference():
    rng = np.random.default_rng(5)
    e, k, p = 8, 2, 3
    layer = make(keras_moe.MoE, e, 4, k=k, gating="top_k", pool_size=p, rng=rng)
    x = normal(rng, 4, 9, D)
    y, routing = layer(x, return_routing=True)
    rows = np.repeat(np.arange(4), 9)
    pools, gaps = ref.document_pools(primary_logits(layer, x), rows, p)
    assert min(gaps.values()) > 1e-5
    expected = ref.moe_reference(x, ref.as_np(layer.gating.w_gate), *ref.expert_weights(layer),
                                 k, logits_mask=ref.pool_mask(rows, pools, e))
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(routing.expert_indices.numpy().reshape(-1, k),
                                  expected["indices"])
    np.testing.assert_allclose(routing.gates.numpy().reshape(-1, k), expected["gates"],
                               rtol=1e-5)
    # The pools really restrict: the unrestricted top-k differs somewhere.
    assert not np.array_equal(ref.top_k(expected["logits"], k), expected["indices"])


def test_noisy_training_routing_and_losses_equal_the_numpy_reference():
    rng = np.random.default_rng(6)
    e, k, p, seed = 8, 2, 4, 21
    layer = make(keras_moe.MoE, e, 4, k=k, pool_size=p, pool_by="document_ids", seed=seed,
                 importance_weight=0.3, load_weight=0.7, rng=rng)
    x = normal(rng, 3, 10, D)
    documents = rng.integers(0, 5, size=(3, 10))
    y, routing = layer(x, training=True, document_ids=documents, return_routing=True)
    # The gate's first noise draw: a fresh generator of the same seed.
    noise = keras.random.normal((30, e), seed=keras.random.SeedGenerator(seed)).numpy()
    flat = x.reshape(-1, D).astype(np.float64)
    clean = flat @ ref.as_np(layer.gating.w_gate)
    std = np.logaddexp(0.0, flat @ ref.as_np(layer.gating.w_noise)) + layer.noise_epsilon
    pools, gaps = ref.document_pools(clean, documents, p)
    assert min(gaps.values()) > 1e-5
    allowed = ref.pool_mask(documents, pools, e)
    noisy = ref.masked(clean + noise * std, allowed)
    idx, gates = ref.top_k_gates(noisy, k)
    np.testing.assert_array_equal(routing.expert_indices.numpy().reshape(-1, k), idx)
    np.testing.assert_allclose(routing.gates.numpy().reshape(-1, k), gates, rtol=1e-4,
                               atol=1e-6)
    load = ref.smooth_load(clean, noisy, std, k).sum(0)
    importance = ref.dense_gates(idx, gates, e).sum(0)
    np.testing.assert_allclose(routing.load.numpy(), load, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(routing.importance.numpy(), importance, rtol=1e-4, atol=1e-6)
    # The losses are over the whole batch, across documents.
    expected_loss = 0.3 * ref.cv_squared(importance) + 0.7 * ref.cv_squared(load)
    np.testing.assert_allclose(float(routing.aux_loss), expected_loss, rtol=1e-4)
    np.testing.assert_allclose(float(sum(layer.losses)), expected_loss, rtol=1e-4)
    # Experts outside every pool of the batch have load 0 exactly.
    outside = ~allowed.any(axis=0)
    assert np.all(routing.load.numpy()[outside] == 0)


# ------------------------------------------------------------ gradients ---


def test_gradients_reach_the_gate_through_the_restricted_softmax_only():
    rng = np.random.default_rng(7)
    e, k, p = 6, 2, 3
    layer = make(keras_moe.MoE, e, 4, k=k, gating="top_k", pool_size=p, rng=rng)
    x = tf.constant(normal(rng, 3, 5, D))
    r = normal(rng, 3, 5, D)
    ex = layer.experts
    variables = {"w_in": ex.w_in, "b_in": ex.b_in, "w_out": ex.w_out, "b_out": ex.b_out,
                 "w_gate": layer.gating.w_gate}
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * r)
    grads = tape.gradient(loss, {"x": x, **variables})
    rows = np.repeat(np.arange(3), 5)
    pools, gaps = ref.document_pools(primary_logits(layer, x.numpy()), rows, p)
    assert min(gaps.values()) > 1e-5
    expected = ref.moe_reference_gradients(
        x.numpy().reshape(-1, D), ref.as_np(layer.gating.w_gate), *ref.expert_weights(layer), k,
        r.reshape(-1, D), logits_mask=ref.pool_mask(rows, pools, e),
    )
    expected["x"] = expected["x"].reshape(3, 5, D)
    for name, g in grads.items():
        g = tf.convert_to_tensor(g).numpy()
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(expected["w_gate"]).max() > 1e-2


@pytest.mark.parametrize("cls", ["moe", "hierarchical"])
def test_noisy_training_gradients_are_finite(cls):
    rng = np.random.default_rng(8)
    if cls == "moe":
        layer = make(keras_moe.MoE, 8, 4, k=2, pool_size=2, seed=4, rng=rng)
    else:
        layer = make(keras_moe.HierarchicalMoE, 4, 2, 4, k_primary=1, k_secondary=2,
                     pool_size=1, seed=4, rng=rng)
    x = tf.constant(normal(rng, 4, 6, D))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=True))) + sum(layer.losses)
    grads = tape.gradient(loss, layer.trainable_weights)
    for w, g in zip(layer.trainable_weights, grads, strict=True):
        if g is not None:
            assert np.isfinite(tf.convert_to_tensor(g).numpy()).all(), w.path
    gate_grad = grads[[w.path for w in layer.trainable_weights].index(
        layer.gating.trainable_weights[0].path)]
    assert np.abs(tf.convert_to_tensor(gate_grad).numpy()).max() > 0


# ----------------------------------------------------- masking and sizes ---


@pytest.mark.parametrize("capacity_factor", [None, 2.0])
def test_masked_positions_count_in_no_document_mean(capacity_factor):
    rng = np.random.default_rng(9)
    layer = make(keras_moe.MoE, 8, 4, k=2, gating="top_k", pool_size=3,
                 capacity_factor=capacity_factor, rng=rng)
    x = normal(rng, 2, 6, D)
    padded = np.concatenate([x, 50.0 * normal(rng, 2, 4, D)], axis=1)  # loud padding
    mask = np.concatenate([np.ones((2, 6), bool), np.zeros((2, 4), bool)], axis=1)
    short = layer(x, return_routing=True)[1]
    long = layer(padded, mask=mask, return_routing=True)[1]
    np.testing.assert_array_equal(long.pools.numpy(), short.pools.numpy())
    np.testing.assert_array_equal(long.expert_indices.numpy()[:, :6], short.expert_indices.numpy())
    # Counted, the padding would have chosen other pools.
    unmasked = layer(padded, return_routing=True)[1]
    assert not np.array_equal(unmasked.pools.numpy(), short.pools.numpy())


def test_pool_size_range_draws_sizes_in_training_and_uses_pool_size_at_inference():
    rng = np.random.default_rng(10)
    layer = make(keras_moe.MoE, 8, 4, k=2, pool_size=3, pool_size_range=(2, 6), seed=9, rng=rng)
    again = twin(layer)
    x = normal(rng, 3, 4, D)

    @tf.function
    def train_step(layer_):
        routing = layer_(x, training=True, return_routing=True)[1]
        return tf.shape(routing.pools)[1], routing.expert_indices

    sizes = []
    for _ in range(40):
        size, experts = train_step(layer)
        sizes.append(int(size))
    assert set(sizes) == {2, 3, 4, 5, 6}
    # Seeded: a twin of the same seed draws the same sizes.
    assert [int(train_step(again)[0]) for _ in range(40)] == sizes
    for _ in range(3):
        assert layer(x, return_routing=True)[1].pools.shape == (3, 3)


# ------------------------------------------------------- arguments, saving ---


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(pool_size=1), "`pool_size` must be in [k=2, num_experts=6]. Received: pool_size=1"),
    (dict(pool_size=7), "Received: pool_size=7"),
    (dict(pool_size=2.5), "pool_size=2.5"),
    (dict(pool_size=3, pool_size_range=(1, 4)), "pool_size_range=(1, 4)"),
    (dict(pool_size=3, pool_size_range=(4, 3)), "pool_size_range=(4, 3)"),
    (dict(pool_size=3, pool_size_range=(2, 7)), "pool_size_range=(2, 7)"),
    (dict(pool_size_range=(2, 4)), "needs `pool_size`"),
    (dict(pool_size=3, pool_by="sentence"), "pool_by='sentence'"),
    (dict(pool_size=3, gating="batchwise"), "gating='batchwise'"),
])
def test_invalid_pool_arguments_are_named(kwargs, fragment):
    with pytest.raises(ValueError) as error:
        keras_moe.MoE(6, 4, k=2, **kwargs)
    assert fragment in str(error.value)


def test_invalid_hierarchical_pool_size_names_groups():
    with pytest.raises(ValueError, match=r"\[k_primary=2, num_groups=3\]. Received: pool_size=4"):
        keras_moe.HierarchicalMoE(3, 2, 4, k_primary=2, pool_size=4)


def test_document_ids_errors_name_the_argument():
    x = np.zeros((2, 3, D), "float32")
    by_ids = keras_moe.MoE(4, 4, k=2, pool_size=2, pool_by="document_ids")
    with pytest.raises(ValueError, match="Received: document_ids=None"):
        by_ids(x)
    with pytest.raises(ValueError, match=r"document_ids of shape \(2, 2\)"):
        by_ids(x, document_ids=np.zeros((2, 2), "int32"))
    with pytest.raises(ValueError, match="must be integers"):
        by_ids(x, document_ids=np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="pool_by='row'"):
        keras_moe.MoE(4, 4, k=2, pool_size=2)(x, document_ids=np.zeros((2, 3), "int32"))
    with pytest.raises(ValueError, match="pool_size=None"):
        keras_moe.MoE(4, 4, k=2)(x, document_ids=np.zeros((2, 3), "int32"))


def test_config_round_trip_and_keras_file_keep_the_pools(tmp_path):
    rng = np.random.default_rng(11)
    layers = [
        keras_moe.MoE(6, 4, k=2, pool_size=3, pool_size_range=(2, 5), seed=1, name="moe"),
        keras_moe.HierarchicalMoE(3, 2, 4, k_primary=1, k_secondary=2, pool_size=2,
                                  pool_by="row", name="hmoe"),
    ]
    x = normal(rng, 4, 6, D)
    for layer in layers:
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config
        inputs = keras.Input((6, D))
        model = keras.Model(inputs, layer(inputs))
        randomize(layer, rng)
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, x, epochs=1, batch_size=2, verbose=0)  # dynamic P in fit
        assert np.isfinite(history.history["loss"][0])
        path = tmp_path / f"{layer.name}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        inner = loaded.layers[-1]
        assert (inner.pool_size, inner.pool_size_range, inner.pool_by) == (
            layer.pool_size, layer.pool_size_range, layer.pool_by)
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)
        y, routing = inner(x, return_routing=True)
        assert routing.pools.shape[0] == 4


def test_document_ids_flow_through_a_functional_model():
    rng = np.random.default_rng(12)
    layer = make(keras_moe.MoE, 8, 4, k=2, pool_size=3, pool_by="document_ids", rng=rng)
    x, ids = keras.Input((5, D)), keras.Input((5,), dtype="int32")
    model = keras.Model([x, ids], layer(x, document_ids=ids))
    data = normal(rng, 2, 5, D)
    documents = np.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2]], "int32")
    np.testing.assert_array_equal(model([data, documents]).numpy(),
                                  layer(data, document_ids=documents).numpy())
    # Other documents, other pools, other outputs.
    other = model([data, np.zeros_like(documents)]).numpy()
    assert not np.allclose(other, model([data, documents]).numpy())
