"""Tests of `keras_moe.HierarchicalMoE` (App. B) against a two-level NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from tests.keras_moe import reference as ref

D = 4


def randomize(layer, rng, gate_scale=1.5, expert_scale=0.6):
    gating = layer.gating
    gating.primary.w_gate.assign(rng.normal(size=gating.primary.w_gate.shape) * gate_scale)
    gating.w_gate.assign(rng.normal(size=gating.w_gate.shape) * gate_scale)
    ex = layer.experts
    for v in (ex.w_in, ex.b_in, ex.w_out, ex.b_out):
        v.assign(rng.normal(size=v.shape) * expert_scale)


def make_hmoe(groups=3, per_group=3, hidden=4, kp=2, ks=2, d=D, rng=None, **kwargs):
    layer = keras_moe.HierarchicalMoE(groups, per_group, hidden, k_primary=kp, k_secondary=ks, **kwargs)
    layer.build((None, d))
    randomize(layer, rng if rng is not None else np.random.default_rng(0))
    return layer


def reference_for(layer, x):
    g = layer.gating
    return ref.hierarchical_reference(
        x, ref.as_np(g.primary.w_gate), ref.as_np(g.w_gate), *ref.expert_weights(layer),
        layer.k_primary, layer.k_secondary,
    )


def normal(rng, *shape):
    return rng.normal(size=shape).astype("float32")


def counts_from(indices, num_experts):
    idx = np.asarray(indices).reshape(-1)
    return np.bincount(idx[idx >= 0], minlength=num_experts).astype(np.float64)


def tokens_per_group(indices, per_group, num_groups):
    """|X^(i)|: number of tokens with at least one expert in group i."""
    groups = np.asarray(indices).reshape(-1, np.shape(indices)[-1]) // per_group
    return np.array([(groups == g).any(axis=1).sum() for g in range(num_groups)], np.float64)


# ----------------------------------------------------------- forward pass ---


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["rank2", "rank3"])
@pytest.mark.parametrize("kp, ks", [(2, 2), (1, 2), (2, 1), (3, 3)])
def test_output_equals_two_level_reference(lead, kp, ks):
    rng = np.random.default_rng(1)
    layer = make_hmoe(groups=3, per_group=3, kp=kp, ks=ks, rng=rng)
    x = normal(rng, *lead, D)
    y = layer(x, training=False)
    expected = reference_for(layer, x)
    assert tuple(y.shape) == lead + (D,)
    np.testing.assert_allclose(y.numpy(), expected["y"], rtol=1e-5, atol=1e-5)


def test_output_dim_and_rank4():
    rng = np.random.default_rng(2)
    layer = make_hmoe(groups=2, per_group=3, kp=2, ks=2, output_dim=3, rng=rng)
    x = normal(rng, 2, 2, 2, D)
    y = layer(x, training=False)
    assert tuple(y.shape) == (2, 2, 2, 3)
    np.testing.assert_allclose(y.numpy(), reference_for(layer, x)["y"], rtol=1e-5, atol=1e-5)


def test_secondary_gate_matters():
    # Swapping two secondary gates of a group changes the output: the test
    # above really checks the second level, not only the primary.
    rng = np.random.default_rng(3)
    layer = make_hmoe(groups=2, per_group=3, kp=1, ks=1, rng=rng)
    x = normal(rng, 6, D)
    before = layer(x, training=False).numpy()
    w = ref.as_np(layer.gating.w_gate)
    layer.gating.w_gate.assign(w[:, :, ::-1].copy())
    after = layer(x, training=False).numpy()
    assert np.abs(before - after).max() > 1e-3
    np.testing.assert_allclose(after, reference_for(layer, x)["y"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- routing ---


def test_routing_importance_and_counts():
    rng = np.random.default_rng(4)
    groups, per_group, kp, ks = 3, 4, 2, 2
    layer = make_hmoe(groups=groups, per_group=per_group, kp=kp, ks=ks, rng=rng)
    x = normal(rng, 2, 4, D)
    _, routing = layer(x, training=False, return_routing=True)
    expected = reference_for(layer, x)
    n_total = groups * per_group

    idx, gates = routing.expert_indices.numpy(), routing.gates.numpy()
    assert routing.expert_indices.dtype == tf.int32
    assert idx.shape == (2, 4, kp * ks) and gates.shape == (2, 4, kp * ks)
    assert (gates >= 0).all()
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    flat_idx = idx.reshape(-1, kp * ks)
    assert all(len(set(row)) == kp * ks for row in flat_idx)
    np.testing.assert_allclose(
        ref.dense_gates(flat_idx, gates, n_total), expected["dense"], rtol=1e-5, atol=1e-6
    )
    # Eq. 13: Importance_H(X)_{i,j} = sum_x G_primary(x)_i G_i(x)_j.
    np.testing.assert_allclose(routing.importance.numpy(), expected["dense"].sum(0), rtol=1e-5)
    counts = counts_from(flat_idx, n_total)
    np.testing.assert_array_equal(routing.counts.numpy(), counts)
    # Load_H without noise: Load_primary_i * counts_ij / |X^(i)| = counts_ij.
    np.testing.assert_allclose(routing.load.numpy(), counts, rtol=1e-6)
    np.testing.assert_allclose(
        routing.primary_importance.numpy(), expected["primary_dense"].sum(0), rtol=1e-5
    )
    np.testing.assert_array_equal(
        routing.primary_load.numpy(), counts_from(expected["primary_indices"], groups)
    )
    np.testing.assert_array_equal(
        tokens_per_group(flat_idx, per_group, groups), routing.primary_load.numpy()
    )
    assert float(routing.dropped_fraction) == 0.0


def test_load_h_in_training_is_eq_14():
    # Secondary noise std is made negligible (W_noise very negative on positive
    # inputs, noise_epsilon 0), so the secondary smooth load is exactly the
    # count; the primary keeps a real noise std (softplus(0)), so its load is
    # the smooth estimator. Eq. 14 then reads
    #   Load_H[i, j] = Load_primary[i] * counts[i, j] / |X^(i)|.
    rng = np.random.default_rng(5)
    groups, per_group, ks = 3, 3, 2
    layer = make_hmoe(
        groups=groups, per_group=per_group, kp=2, ks=ks, noise_epsilon=0.0,
        importance_weight=0.4, load_weight=0.9, rng=rng,
    )
    layer.gating.w_noise.assign(np.full(layer.gating.w_noise.shape, -40.0))
    x = np.abs(normal(rng, 10, D)) + 0.2
    _, routing = layer(x, training=True, return_routing=True)

    flat_idx = routing.expert_indices.numpy()
    counts = counts_from(flat_idx, groups * per_group).reshape(groups, per_group)
    sizes = tokens_per_group(flat_idx, per_group, groups)
    primary_load = ref.as_np(routing.primary_load)
    assert not np.allclose(primary_load, sizes)  # the primary load is smooth
    expected_load = primary_load[:, None] * np.divide(
        counts, sizes[:, None], out=np.zeros_like(counts), where=sizes[:, None] > 0
    )
    np.testing.assert_allclose(routing.load.numpy(), expected_load.reshape(-1), rtol=1e-5, atol=1e-6)
    # Each token in group i sends exactly ks pairs there: the group's loads sum to ks * Load_primary_i.
    np.testing.assert_allclose(
        routing.load.numpy().reshape(groups, per_group).sum(1),
        np.where(sizes > 0, ks * primary_load, 0.0), rtol=1e-5, atol=1e-6,
    )
    importance = ref.dense_gates(flat_idx, routing.gates.numpy(), groups * per_group).sum(0)
    np.testing.assert_allclose(routing.importance.numpy(), importance, rtol=1e-5)
    aux = 0.4 * ref.cv_squared(importance) + 0.9 * ref.cv_squared(routing.load.numpy())
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), aux, rtol=1e-4)


def test_load_loss_alone_trains_both_gate_levels():
    rng = np.random.default_rng(6)
    groups, per_group = 3, 3
    layer = make_hmoe(
        groups=groups, per_group=per_group, kp=2, ks=2, importance_weight=0.0, load_weight=1.0,
        rng=rng,
    )
    x = tf.constant(normal(rng, 12, D))
    gating = layer.gating
    variables = [gating.primary.w_gate, gating.w_gate]
    with tf.GradientTape() as tape:
        _, routing = layer(x, training=True, return_routing=True)
        (loss,) = layer.losses
    load = routing.load.numpy()
    assert (load >= 0).all()
    # Per group, each of the ks smooth probabilities of a token lies in [0, 1].
    per_group_sum = load.reshape(groups, per_group).sum(1)
    assert (per_group_sum <= per_group * routing.primary_load.numpy() + 1e-5).all()
    assert float(loss) > 0
    np.testing.assert_allclose(float(loss), ref.cv_squared(load), rtol=1e-4)
    for var, grad in zip(variables, tape.gradient(loss, variables), strict=True):
        assert grad is not None, var.path
        grad = tf.convert_to_tensor(grad).numpy()
        assert np.isfinite(grad).all(), var.path
        assert np.abs(grad).max() > 1e-6, var.path


# --------------------------------------------------------------- capacity ---


def test_large_capacity_factor_equals_dropless():
    rng = np.random.default_rng(7)
    dropless = make_hmoe(groups=3, per_group=2, kp=2, ks=2, rng=rng)
    capped = keras_moe.HierarchicalMoE(3, 2, 4, k_primary=2, k_secondary=2, capacity_factor=50.0)
    capped.build((None, D))
    capped.set_weights(dropless.get_weights())
    x = normal(rng, 2, 5, D)
    y0, r0 = dropless(x, training=False, return_routing=True)
    y1, r1 = capped(x, training=False, return_routing=True)
    np.testing.assert_allclose(y1.numpy(), y0.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y1.numpy(), reference_for(capped, x)["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r1.counts.numpy(), r0.counts.numpy())
    assert float(r1.dropped_fraction) == 0.0


def test_small_capacity_factor_drops_pairs():
    rng = np.random.default_rng(8)
    layer = make_hmoe(groups=2, per_group=2, kp=1, ks=1, capacity_factor=0.5, rng=rng)
    x = normal(rng, 8, D)
    y, routing = layer(x, training=False, return_routing=True)
    # k = 1, E = 4, P = 8: C = ceil(0.5 * 8 / 4) = 1 token per expert, in token order.
    idx = routing.expert_indices.numpy()
    keep = ref.capacity_keep(idx, 4, 1)
    assert (~keep).sum() > 0
    np.testing.assert_allclose(float(routing.dropped_fraction), (~keep).mean(), rtol=1e-6)
    expected = reference_for(layer, x)
    expert_out, _ = ref.all_experts(x, *ref.expert_weights(layer))
    kept_dense = expected["dense"] * ref.dense_gates(idx, keep.astype(float), 4)
    np.testing.assert_allclose(
        y.numpy(), np.einsum("ne,neo->no", kept_dense, expert_out), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- masking ---


@pytest.mark.parametrize("capacity_factor", [None, 50.0], ids=["dropless", "capacity"])
def test_mask(capacity_factor):
    rng = np.random.default_rng(9)
    layer = make_hmoe(groups=3, per_group=2, kp=2, ks=1, capacity_factor=capacity_factor, rng=rng)
    x = normal(rng, 2, 4, D)
    mask = np.array([[True, False, True, True], [False, True, False, True]])
    y, routing = layer(x, training=False, mask=mask, return_routing=True)
    y = y.numpy()
    assert (y[~mask] == 0).all()
    assert (routing.expert_indices.numpy()[~mask] == -1).all()
    assert (routing.gates.numpy()[~mask] == 0).all()
    expected = reference_for(layer, x[mask])
    np.testing.assert_allclose(y[mask], expected["y"], rtol=1e-5, atol=1e-5)
    _, alone = layer(x[mask], training=False, return_routing=True)
    for field in ("importance", "counts", "load", "primary_importance", "primary_load"):
        np.testing.assert_allclose(
            getattr(routing, field).numpy(), getattr(alone, field).numpy(), rtol=1e-6,
            err_msg=field,
        )
    np.testing.assert_allclose(routing.importance.numpy(), expected["dense"].sum(0), rtol=1e-5)


# ------------------------------------------------------ layer test, config ---


def test_run_layer_test_and_primary_metrics():
    _, history = ref.run_layer_test(
        keras_moe.HierarchicalMoE,
        dict(
            num_groups=3, experts_per_group=2, expert_hidden_dim=4, k_primary=2, k_secondary=1,
            output_dim=3, seed=2, name="hmoe",
        ),
        input_shape=(4, 3, 5),
        expected_output_shape=(4, 3, 3),
        expected_num_trainable_weights=8,
    )
    logs = history.history
    for stat in ("cv_importance", "cv_load", "max_mean_load", "zero_expert_fraction"):
        assert np.isfinite(logs[f"hmoe_{stat}"][0]), stat
        assert np.isfinite(logs[f"hmoe_primary_{stat}"][0]), stat
    assert logs["hmoe_dropped_fraction"][0] == 0.0


def test_get_config_round_trip():
    kwargs = dict(
        num_groups=4, experts_per_group=3, expert_hidden_dim=5, k_primary=3, k_secondary=2,
        output_dim=7, gating="top_k", importance_weight=0.3, load_weight=0.2,
        noise_epsilon=0.05, capacity_factor=1.5, use_bias=False, seed=11,
    )
    layer = keras_moe.HierarchicalMoE(**kwargs)
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value, key
    assert keras_moe.HierarchicalMoE.from_config(config).get_config() == config


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(k_primary=4), "k=4"),
        (dict(k_primary=0), "k=0"),
        (dict(k_secondary=3), "k_secondary=3"),
        (dict(experts_per_group=0, k_secondary=1), "experts_per_group=0"),
        (dict(gating="softmax"), "gating='softmax'"),
        (dict(expert_hidden_dim=0), "expert_hidden_dim=0"),
        (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
        (dict(load_weight=-1.0), "load_weight=-1.0"),
    ],
)
def test_invalid_arguments(kwargs, fragment):
    args = dict(num_groups=3, experts_per_group=2, expert_hidden_dim=4)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        keras_moe.HierarchicalMoE(**args)
    assert fragment in str(info.value), str(info.value)



# ------------------------------------------- gradients, both group paths ---
#
# The secondary gates run as one grouped product over all groups
# (`keras_moe.dispatch.grouped_matmul`): a Python loop over the groups below
# `LOOP_MIN_EXPERTS`, a `tf.while_loop` from there on. Both paths must give
# the two-level reference's output and gradients.


def hierarchical_reference_gradients(x, w_primary, w_secondary, w_in, b_in, w_out, b_out,
                                     kp, ks, r):
    """`y` and the gradients of `L = sum(y * r)` for the noise-free two-level MoE.

    Worked out by hand in float64 for flat `x [N, d]`: the top-k choices
    are piecewise constant, each softmax over kept logits is differentiated
    exactly, and the combined gate of expert `(g, j)` is
    `G_primary(x)_g * G_g(x)_j` (Eq. 12).
    """
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    num_groups, _, per_group = w_secondary.shape
    p_idx, p_gates = ref.top_k_gates(x @ w_primary, kp)
    expert_out, pre = ref.all_experts(x, w_in, b_in, w_out, b_out)
    a = np.einsum("no,neo->ne", r, expert_out)  # dL / d(combined gate)
    dense = np.zeros((x.shape[0], num_groups * per_group))
    g_x, g_secondary = np.zeros_like(x), np.zeros_like(w_secondary)
    d_primary_logits = np.zeros((x.shape[0], num_groups))
    for n in range(x.shape[0]):
        d_pg = np.zeros(kp)
        for slot, (g, pg) in enumerate(zip(p_idx[n], p_gates[n], strict=True)):
            s_idx, s_gates = ref.top_k_gates(x[n : n + 1] @ w_secondary[g], ks)
            s_idx, s_gates = s_idx[0], s_gates[0]
            experts = g * per_group + s_idx
            dense[n, experts] += pg * s_gates
            d_pg[slot] = s_gates @ a[n, experts]
            d_sg = pg * a[n, experts]
            d_logits = np.zeros(per_group)
            d_logits[s_idx] = s_gates * (d_sg - s_gates @ d_sg)
            g_secondary[g] += np.outer(x[n], d_logits)
            g_x[n] += w_secondary[g] @ d_logits
        d_primary_logits[n, p_idx[n]] = p_gates[n] * (d_pg - p_gates[n] @ d_pg)
    g_x += d_primary_logits @ w_primary.T
    # The expert path, as for the flat MoE (tests/keras_moe/reference.py).
    dy_e = dense[:, :, None] * r[:, None, :]
    d_hidden = np.einsum("neo,eho->neh", dy_e, w_out) * (pre > 0)
    g_x += np.einsum("neh,edh->nd", d_hidden, w_in)
    grads = dict(
        x=g_x, w_primary=x.T @ d_primary_logits, w_secondary=g_secondary,
        w_in=np.einsum("nd,neh->edh", x, d_hidden), b_in=d_hidden.sum(0),
        w_out=np.einsum("neh,neo->eho", ref.relu(pre), dy_e), b_out=dy_e.sum(0),
    )
    return np.einsum("ne,neo->no", dense, expert_out), dense, grads


@pytest.fixture(params=["unrolled", "loop"])
def group_path(request, monkeypatch):
    """Runs a test with the gates and experts on each path, whatever the sizes."""
    from keras_moe import dispatch

    monkeypatch.setattr(dispatch, "LOOP_MIN_EXPERTS", 1 if request.param == "loop" else 10**9)
    return request.param


@pytest.mark.parametrize("routing", ["spread", "collapsed", "empty_groups", "masked"])
def test_gradients_equal_two_level_reference(group_path, routing):
    rng = np.random.default_rng(30)
    groups, per_group, kp, ks = 4, 3, 2, 2
    if routing == "empty_groups":
        groups, kp = 6, 1
    layer = make_hmoe(groups=groups, per_group=per_group, kp=kp, ks=ks, rng=rng,
                      importance_weight=0.0, load_weight=0.0)
    x = normal(rng, 2, 5, D)
    mask = None
    if routing == "collapsed":
        # Positive inputs, one huge gate column per level: every token's
        # first group is 1 and, in every group, its first expert is 0.
        x = np.abs(x) + 0.1
        w = ref.as_np(layer.gating.primary.w_gate)
        w[:, 1] = 50.0
        layer.gating.primary.w_gate.assign(w)
        w = ref.as_np(layer.gating.w_gate)
        w[:, :, 0] = 50.0
        layer.gating.w_gate.assign(w)
    if routing == "empty_groups":
        # Positive inputs and very negative primary logits: groups 4 and 5
        # (and their experts) never get a token.
        x = np.abs(x) + 0.1
        w = ref.as_np(layer.gating.primary.w_gate)
        w[:, 4:] = -50.0
        layer.gating.primary.w_gate.assign(w)
    if routing == "masked":
        mask = np.array([[True, False, True, True, False], [False, True, True, False, True]])
    r = normal(rng, 2, 5, D)
    g = layer.gating
    variables = dict(w_primary=g.primary.w_gate, w_secondary=g.w_gate, w_in=layer.experts.w_in,
                     b_in=layer.experts.b_in, w_out=layer.experts.w_out,
                     b_out=layer.experts.b_out)

    @tf.function
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=False, mask=mask)
            loss = tf.reduce_sum(y * r)
        grads = tape.gradient(loss, dict(x=x, **variables))
        return y, {name: tf.convert_to_tensor(t) for name, t in grads.items()}

    y, grads = run(tf.constant(x))
    keep = np.ones((2, 5), bool) if mask is None else mask
    y_ref, dense, expected = hierarchical_reference_gradients(
        x[keep], ref.as_np(g.primary.w_gate), ref.as_np(g.w_gate), *ref.expert_weights(layer),
        kp, ks, r[keep],
    )
    used_groups = np.flatnonzero(dense.reshape(-1, groups, per_group).sum((0, 2)))
    if routing == "collapsed":
        assert (dense.reshape(-1, groups, per_group)[:, 1, 0] > 0).all()
    if routing == "empty_groups":
        assert set(used_groups) <= {0, 1, 2, 3} and len(used_groups) > 1
    np.testing.assert_allclose(y.numpy()[keep], y_ref, rtol=1e-5, atol=1e-5)
    assert (y.numpy()[~keep] == 0).all()
    grad_x = np.zeros_like(x, dtype=np.float64)
    grad_x[keep] = expected.pop("x")
    np.testing.assert_allclose(grads.pop("x").numpy(), grad_x, rtol=1e-4, atol=1e-5)
    for name, value in grads.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    unused = np.setdiff1d(np.arange(groups), used_groups)
    assert (grads["w_secondary"].numpy()[unused] == 0).all()
    if routing != "collapsed":  # (a saturated softmax has no gradient to speak of)
        assert np.abs(expected["w_secondary"]).max() > 1e-3  # the secondary gates learn


def test_noisy_training_is_the_same_on_both_group_paths(monkeypatch):
    # With noise, the load estimator and both balancing losses: the two paths
    # (same seed, so the same noise) give the same output, loss and gradients.
    from keras_moe import dispatch

    rng = np.random.default_rng(31)
    x = tf.constant(normal(rng, 12, D))
    results = []
    for threshold in (10**9, 1):
        monkeypatch.setattr(dispatch, "LOOP_MIN_EXPERTS", threshold)
        layer = make_hmoe(groups=4, per_group=3, kp=2, ks=2, rng=np.random.default_rng(32),
                          seed=5, importance_weight=0.5, load_weight=0.7)
        layer.gating.w_noise.assign(np.random.default_rng(33).normal(size=(4, D, 3)))
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y) + tf.add_n(layer.losses)
        grads = tape.gradient(loss, layer.trainable_variables)
        results.append((y.numpy(), float(loss), [tf.convert_to_tensor(t).numpy() for t in grads]))
    (y0, loss0, g0), (y1, loss1, g1) = results
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    names = [v.path for v in layer.trainable_variables]
    for name, a, b in zip(names, g0, g1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=name)
    noise_grad = g1[names.index(layer.gating.w_noise.path)]
    assert np.abs(noise_grad).max() > 1e-4  # the load loss reaches W_noise


def test_graph_size_does_not_depend_on_the_number_of_groups(group_path):
    from tests.keras_moe.dispatch_test import forward_and_backward, op_count

    def ops(num_groups):
        layer = keras_moe.HierarchicalMoE(num_groups, 2, 4, k_primary=2, k_secondary=1, seed=1)
        layer.build((None, D))
        return op_count(forward_and_backward(layer), tf.TensorSpec([None, D], tf.float32))

    small, large = ops(4), ops(8)
    if group_path == "loop":
        assert small == large
    else:
        # The unrolled path adds ops per group and per expert: the count sees them.
        assert large > small + 4 * 10


def test_gate_weight_layout_is_unchanged():
    # `.keras` files store the gate's variables in creation order; the
    # grouped product reads the same [G, d, E_g] stacks as the per-group
    # loop did, so files saved before it load unchanged.
    layer = make_hmoe(groups=3, per_group=2)
    gating = layer.gating
    assert [v.path.split("/")[-1] for v in gating.weights] == [
        "w_gate", "w_noise", "w_gate", "w_noise"
    ]
    assert [tuple(v.shape) for v in gating.weights] == [(3, D, 2), (3, D, 2), (D, 3), (D, 3)]
    assert gating.weights[0] is gating.w_gate and gating.weights[1] is gating.w_noise
