"""Tests of NoisyTopKGating, SwitchGating, SoftmaxGating and BatchwiseGating.

Expected values come from NumPy reimplementations, hand calculations or
Monte Carlo averages, never from the code under test.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose, assert_array_equal

from keras_moe.batchwise import BatchwiseGating
from keras_moe.gating import NoisyTopKGating, SoftmaxGating, SwitchGating

# ---------------------------------------------------------------------------
# NumPy helpers.


def np_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_softplus(z):
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)


def np_cv_squared(v):
    v = np.asarray(v, np.float64)
    return float(np.var(v) / (np.mean(v) ** 2 + 1e-10))


def dense_gates(decision, num_tokens, num_experts):
    """Scatter the flat (token, expert, gate) pairs into a dense [N, E] matrix."""
    out = np.zeros((num_tokens, num_experts))
    tokens = decision.token_index.numpy()
    experts = decision.expert_index.numpy()
    gates = decision.gate.numpy()
    for t, e, g in zip(tokens, experts, gates, strict=True):
        assert out[t, e] == 0.0, "a (token, expert) pair appears twice"
        out[t, e] = g
    return out


def make_gating(num_experts, k, d, gating="noisy_top_k", w_gate=None, w_noise=None, **kwargs):
    # The `gating` names of `MoE`: "switch" and "softmax" have classes of their own.
    if gating == "switch":
        layer = SwitchGating(num_experts, k=k, **kwargs)
    elif gating == "softmax":
        layer = SoftmaxGating(num_experts, k=k, **kwargs)
    else:
        layer = NoisyTopKGating(num_experts, k=k, gating=gating, **kwargs)
    layer.build((d,))
    if w_gate is not None:
        layer.w_gate.assign(np.asarray(w_gate, np.float32))
    if w_noise is not None and layer.noisy:
        layer.w_noise.assign(np.asarray(w_noise, np.float32))
    return layer


def random_problem(seed, n=6, d=3, num_experts=4, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_gate = (scale * rng.normal(size=(d, num_experts))).astype(np.float32)
    w_noise = (scale * rng.normal(size=(d, num_experts))).astype(np.float32)
    return x, w_gate, w_noise


def assert_k_sparse_simplex(decision, num_tokens, num_experts, k):
    top_indices = decision.top_indices.numpy()
    top_gates = decision.top_gates.numpy()
    assert top_indices.shape == (num_tokens, k)
    assert top_gates.shape == (num_tokens, k)
    assert top_indices.dtype == np.int32
    assert np.all((top_indices >= 0) & (top_indices < num_experts))
    for row in top_indices:
        assert len(set(row.tolist())) == k, f"repeated expert in {row}"
    assert np.all(top_gates >= 0.0)
    assert_allclose(top_gates.sum(-1), np.ones(num_tokens), rtol=1e-5)
    # Flat pairs are token-major and agree with the [N, k] view.
    assert_array_equal(decision.token_index.numpy(), np.repeat(np.arange(num_tokens), k))
    assert_array_equal(decision.expert_index.numpy(), top_indices.reshape(-1))
    assert_allclose(decision.gate.numpy(), top_gates.reshape(-1))
    dense = dense_gates(decision, num_tokens, num_experts)
    assert np.all(np.count_nonzero(dense, axis=1) <= k)
    assert_allclose(dense.sum(-1), np.ones(num_tokens), rtol=1e-5)


# ---------------------------------------------------------------------------
# Weights and basic structure.


def test_weights_shape_and_zero_init():
    layer = NoisyTopKGating(5, k=2)
    layer.build((3,))
    assert tuple(layer.w_gate.shape) == (3, 5)
    assert tuple(layer.w_noise.shape) == (3, 5)
    assert_array_equal(layer.w_gate.numpy(), np.zeros((3, 5)))
    assert_array_equal(layer.w_noise.numpy(), np.zeros((3, 5)))
    assert layer.w_gate.trainable and layer.w_noise.trainable


@pytest.mark.parametrize(
    "gating,training",
    [("noisy_top_k", True), ("noisy_top_k", False), ("top_k", True), ("top_k", False)],
)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gates_are_k_sparse_non_negative_and_sum_to_one(gating, training, k):
    num_experts, n = 5, 7
    x, w_gate, w_noise = random_problem(k, n=n, d=3, num_experts=num_experts)
    layer = make_gating(num_experts, k, 3, gating=gating, w_gate=w_gate, w_noise=w_noise)
    decision = layer(x, training=training)
    assert_k_sparse_simplex(decision, n, num_experts, k)
    assert decision.primary is None


def test_top_gates_are_softmax_of_top_k_clean_logits():
    num_experts, k, n, d = 6, 3, 5, 4
    x, w_gate, w_noise = random_problem(7, n=n, d=d, num_experts=num_experts, scale=1.5)
    for gating in ("noisy_top_k", "top_k"):
        layer = make_gating(num_experts, k, d, gating=gating, w_gate=w_gate, w_noise=w_noise)
        decision = layer(x, training=False)
        logits = x.astype(np.float64) @ w_gate.astype(np.float64)
        assert_allclose(decision.clean_logits.numpy(), logits, rtol=1e-5, atol=1e-5)
        order = np.argsort(-logits, axis=-1)[:, :k]
        top_logits = np.take_along_axis(logits, order, axis=-1)
        assert_array_equal(decision.top_indices.numpy(), order)
        assert_allclose(decision.top_gates.numpy(), np_softmax(top_logits), rtol=1e-5)
        assert decision.noise_std is None


def test_noise_std_is_softplus_plus_epsilon():
    num_experts, k, n, d = 4, 2, 5, 3
    x, w_gate, w_noise = random_problem(8, n=n, d=d, num_experts=num_experts)
    layer = make_gating(num_experts, k, d, w_gate=w_gate, w_noise=w_noise, noise_epsilon=0.05)
    decision = layer(x, training=True)
    expected = np_softplus(x.astype(np.float64) @ w_noise) + 0.05
    assert decision.noise_std.shape == (n, num_experts)
    assert_allclose(decision.noise_std.numpy(), expected, rtol=1e-5)
    # The clean logits do not carry the noise.
    assert_allclose(decision.clean_logits.numpy(), x @ w_gate, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Zero initialisation: routing by noise alone.


def test_zero_init_training_routes_by_noise():
    num_experts, k, n, d = 4, 2, 2000, 3
    layer = make_gating(num_experts, k, d)
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    first = layer(x, training=True)
    second = layer(x, training=True)
    # Two calls on the same input route differently.
    assert not np.array_equal(
        np.sort(first.top_indices.numpy(), -1), np.sort(second.top_indices.numpy(), -1)
    )
    # Identical tokens inside a batch are routed differently too.
    same = layer(np.ones((50, d), np.float32), training=True)
    assert len({tuple(sorted(r)) for r in same.top_indices.numpy().tolist()}) > 1
    # Each token picks a uniformly random k-subset: every expert is chosen
    # with probability k / E = 0.5; binomial standard error sqrt(.25 / 2000)
    # = 0.011, so 0.05 is about 4.5 standard errors.
    for decision in (first, second):
        freq = decision.counts.numpy() / n
        assert_allclose(freq, np.full(num_experts, k / num_experts), atol=0.05)
        assert_allclose(decision.counts.numpy().sum(), n * k)


# ---------------------------------------------------------------------------
# Smooth load estimator (Eq. 8-10): Monte Carlo check of unbiasedness.


@pytest.mark.parametrize("num_experts,k", [(4, 1), (4, 2), (5, 3)])
def test_smooth_load_is_unbiased_estimate_of_counts(num_experts, k):
    n, d, calls = 6, 3, 1000
    x, w_gate, w_noise = random_problem(
        100 + num_experts + k, n=n, d=d, num_experts=num_experts, scale=0.7
    )
    layer = make_gating(num_experts, k, d, w_gate=w_gate, w_noise=w_noise, seed=11)
    x = tf.constant(x)

    @tf.function
    def one_call():
        decision = layer(x, training=True)
        return decision.load, decision.counts

    outs = [one_call() for _ in range(calls)]
    load = np.stack([o[0].numpy() for o in outs]).astype(np.float64)
    counts = np.stack([o[1].numpy() for o in outs]).astype(np.float64)
    # The noise really changes the routing from call to call.
    assert counts.std(axis=0).max() > 0.3
    # Each call: sum of counts is n * k; the estimate need not sum to it.
    assert_array_equal(counts.sum(-1), np.full(calls, n * k))
    diff = load - counts
    mean_diff = diff.mean(0)
    standard_error = diff.std(0, ddof=1) / math.sqrt(calls)
    # The test has power: standard errors are small against the mean counts.
    assert np.all(standard_error < 0.1), standard_error
    assert np.all(np.abs(mean_diff) <= 4.0 * standard_error + 1e-3), (
        mean_diff,
        standard_error,
        counts.mean(0),
    )


# ---------------------------------------------------------------------------
# Gradients of the load loss.


@pytest.mark.parametrize("zero_init", [False, True])
def test_load_loss_alone_gives_gradients_to_both_matrices(zero_init):
    num_experts, k, n, d = 4, 2, 8, 3
    x, w_gate, w_noise = random_problem(21, n=n, d=d, num_experts=num_experts, scale=0.5)
    if zero_init:
        w_gate = w_noise = None
    layer = make_gating(
        num_experts, k, d, w_gate=w_gate, w_noise=w_noise, importance_weight=0.0, load_weight=1.0
    )
    with tf.GradientTape() as tape:
        decision = layer(x, training=True)
        loss = decision.aux_loss
    grad_gate, grad_noise = tape.gradient(loss, [layer.w_gate, layer.w_noise])
    assert np.isfinite(float(loss)) and float(loss) > 0.0
    for grad in (grad_gate, grad_noise):
        assert grad is not None
        grad = grad.numpy()
        assert np.all(np.isfinite(grad))
        assert np.abs(grad).max() > 1e-6


def test_load_loss_gradient_matches_finite_differences_with_fixed_noise():
    num_experts, k, n, d = 4, 2, 6, 3
    x, w_gate, w_noise = random_problem(31, n=n, d=d, num_experts=num_experts, scale=0.6)
    layer = make_gating(
        num_experts,
        k,
        d,
        w_gate=w_gate,
        w_noise=w_noise,
        importance_weight=0.0,
        load_weight=1.0,
        seed=5,
    )
    state = layer.seed_generator.state.numpy().copy()

    def loss_at(wg, wn):
        layer.seed_generator.state.assign(state)  # same noise every time
        layer.w_gate.assign(wg)
        layer.w_noise.assign(wn)
        return float(layer(x, training=True).aux_loss)

    layer.seed_generator.state.assign(state)
    with tf.GradientTape() as tape:
        loss = layer(x, training=True).aux_loss
    grad_gate, grad_noise = (g.numpy() for g in tape.gradient(loss, [layer.w_gate, layer.w_noise]))
    eps = 1e-2
    w_gate64, w_noise64 = w_gate.astype(np.float64), w_noise.astype(np.float64)
    for which, grad in (("gate", grad_gate), ("noise", grad_noise)):
        for i, j in ((0, 0), (1, 2), (2, 3)):
            delta = np.zeros_like(w_gate64)
            delta[i, j] = eps
            if which == "gate":
                plus = loss_at(w_gate64 + delta, w_noise64)
                minus = loss_at(w_gate64 - delta, w_noise64)
            else:
                plus = loss_at(w_gate64, w_noise64 + delta)
                minus = loss_at(w_gate64, w_noise64 - delta)
            numeric = (plus - minus) / (2 * eps)
            assert_allclose(grad[i, j], numeric, rtol=0.05, atol=2e-3, err_msg=f"{which}[{i},{j}]")


# ---------------------------------------------------------------------------
# Noise off: load equals counts, degenerate batches are finite.


@pytest.mark.parametrize("gating,training", [("noisy_top_k", False), ("top_k", True)])
def test_without_noise_load_equals_counts(gating, training):
    num_experts, k, n, d = 5, 2, 9, 3
    x, w_gate, w_noise = random_problem(41, n=n, d=d, num_experts=num_experts)
    layer = make_gating(num_experts, k, d, gating=gating, w_gate=w_gate, w_noise=w_noise)
    decision = layer(x, training=training)
    assert decision.noise_std is None
    expected_counts = np.bincount(
        np.argsort(-(x @ w_gate), -1)[:, :k].reshape(-1), minlength=num_experts
    )
    assert_array_equal(decision.counts.numpy(), expected_counts)
    assert_array_equal(decision.load.numpy(), expected_counts)


@pytest.mark.parametrize("gating,training", [("noisy_top_k", False), ("top_k", True)])
def test_all_tokens_to_one_expert_gives_finite_hand_value(gating, training):
    # Positive inputs and a large first column: every token picks expert 0.
    num_experts, n, d = 4, 6, 3
    w_gate = np.zeros((d, num_experts), np.float32)
    w_gate[:, 0] = 5.0
    layer = make_gating(
        num_experts, 1, d, gating=gating, w_gate=w_gate, importance_weight=0.25, load_weight=0.5
    )
    x = np.random.default_rng(0).uniform(0.5, 1.0, size=(n, d)).astype(np.float32)
    decision = layer(x, training=training)
    assert_array_equal(decision.counts.numpy(), [n, 0, 0, 0])
    assert_array_equal(decision.load.numpy(), [n, 0, 0, 0])
    # counts [n, 0, 0, 0]: mean n/4, var 3 n^2 / 16 -> cv^2 = 3; k = 1 gates are 1.
    assert_allclose(float(decision.aux_loss), (0.25 + 0.5) * 3.0, rtol=1e-5)


@pytest.mark.parametrize(
    "gating,training", [("noisy_top_k", False), ("top_k", True), ("noisy_top_k", True)]
)
def test_all_zero_weight_gives_zero_statistics_and_finite_loss(gating, training):
    num_experts, k, n, d = 4, 2, 5, 3
    x, w_gate, w_noise = random_problem(51, n=n, d=d, num_experts=num_experts)
    layer = make_gating(num_experts, k, d, gating=gating, w_gate=w_gate, w_noise=w_noise)
    with tf.GradientTape() as tape:
        decision = layer(x, training=training, weight=tf.zeros([n]))
        loss = decision.aux_loss
    assert_array_equal(decision.importance.numpy(), np.zeros(num_experts))
    assert_array_equal(decision.load.numpy(), np.zeros(num_experts))
    assert_array_equal(decision.counts.numpy(), np.zeros(num_experts))
    assert float(loss) == 0.0
    for grad in tape.gradient(loss, [layer.w_gate, layer.w_noise]):
        if grad is not None:
            assert np.all(np.isfinite(grad.numpy()))


# ---------------------------------------------------------------------------
# The weight argument.


@pytest.mark.parametrize("gating,training", [("noisy_top_k", False), ("top_k", True)])
def test_zero_weight_tokens_do_not_contribute(gating, training):
    num_experts, k, n, d = 4, 2, 8, 3
    x, w_gate, w_noise = random_problem(61, n=n, d=d, num_experts=num_experts)
    weight = np.array([1, 0, 1, 1, 0, 0, 1, 1], np.float32)
    layer = make_gating(num_experts, k, d, gating=gating, w_gate=w_gate, w_noise=w_noise)
    masked = layer(x, training=training, weight=weight)
    kept = layer(x[weight > 0], training=training)
    assert_allclose(masked.importance.numpy(), kept.importance.numpy(), rtol=1e-5)
    assert_allclose(masked.load.numpy(), kept.load.numpy(), rtol=1e-5)
    assert_allclose(masked.counts.numpy(), kept.counts.numpy(), rtol=1e-5)
    assert_allclose(float(masked.aux_loss), float(kept.aux_loss), rtol=1e-5, atol=1e-7)
    # And against NumPy: bincount over the kept tokens only.
    logits = x @ w_gate
    order = np.argsort(-logits, -1)[:, :k]
    gates = np_softmax(np.take_along_axis(logits, order, -1))
    keep = weight > 0
    assert_array_equal(
        masked.counts.numpy(), np.bincount(order[keep].reshape(-1), minlength=num_experts)
    )
    assert_allclose(
        masked.importance.numpy(),
        np.bincount(order[keep].reshape(-1), gates[keep].reshape(-1), minlength=num_experts),
        rtol=1e-5,
    )
    # The masked tokens are still routed (the weight only affects statistics).
    assert masked.top_indices.shape == (n, k)


def test_zero_weight_tokens_do_not_contribute_in_noisy_training():
    # Same seed, same shape -> same noise. Changing only masked tokens
    # (drastically) must leave importance, load and counts unchanged.
    num_experts, k, n, d = 4, 2, 8, 3
    x, w_gate, w_noise = random_problem(71, n=n, d=d, num_experts=num_experts)
    weight = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.float32)
    other = x.copy()
    other[weight == 0] = 40.0 * np.abs(other[weight == 0])
    decisions = []
    for inputs in (x, other):
        layer = make_gating(num_experts, k, d, w_gate=w_gate, w_noise=w_noise, seed=3)
        decisions.append(layer(inputs, training=True, weight=weight))
    a, b = decisions
    # Sanity: the masked tokens did get routed differently.
    assert not np.array_equal(a.clean_logits.numpy(), b.clean_logits.numpy())
    assert_allclose(a.importance.numpy(), b.importance.numpy(), rtol=1e-5)
    assert_allclose(a.load.numpy(), b.load.numpy(), rtol=1e-5)
    assert_allclose(a.counts.numpy(), b.counts.numpy())
    assert_allclose(float(a.aux_loss), float(b.aux_loss), rtol=1e-5)
    # counts = bincount of the kept tokens' experts.
    kept = a.top_indices.numpy()[weight > 0].reshape(-1)
    assert_array_equal(a.counts.numpy(), np.bincount(kept, minlength=num_experts))
    # The estimate of the kept tokens' load is smaller than the unmasked one.
    layer = make_gating(num_experts, k, d, w_gate=w_gate, w_noise=w_noise, seed=3)
    full = layer(x, training=True)
    assert float(full.load.numpy().sum()) > float(a.load.numpy().sum())


# ---------------------------------------------------------------------------
# Switch and dense softmax gating.


@pytest.mark.parametrize("use_weight", [False, True])
def test_switch_gating_matches_numpy(use_weight):
    num_experts, n, d = 4, 7, 3
    x, w_gate, _ = random_problem(81, n=n, d=d, num_experts=num_experts, scale=1.2)
    weight = np.array([1, 1, 0, 1, 1, 0, 1], np.float32) if use_weight else np.ones(n, np.float32)
    layer = make_gating(
        num_experts, 1, d, gating="switch", w_gate=w_gate, importance_weight=0.3, load_weight=0.7
    )
    decision = layer(x, training=True, weight=weight if use_weight else None)
    probs = np_softmax(x.astype(np.float64) @ w_gate)
    choice = probs.argmax(-1)
    chosen_prob = probs.max(-1)
    assert_array_equal(decision.top_indices.numpy(), choice[:, None])
    assert_allclose(decision.top_gates.numpy(), chosen_prob[:, None], rtol=1e-5)
    assert_allclose(decision.gate.numpy(), chosen_prob, rtol=1e-5)
    # The gate is the router probability, not 1.
    assert np.all(decision.gate.numpy() < 1.0)
    importance = np.bincount(choice, weights=chosen_prob * weight, minlength=num_experts)
    counts = np.bincount(choice, weights=weight, minlength=num_experts)
    assert_allclose(decision.importance.numpy(), importance, rtol=1e-5)
    assert_array_equal(decision.counts.numpy(), counts)
    assert_array_equal(decision.load.numpy(), counts)
    total = weight.sum()
    f = counts / total
    p = (probs * weight[:, None]).sum(0) / total
    expected = 0.7 * num_experts * np.sum(f * p) + 0.3 * np_cv_squared(importance)
    assert_allclose(float(decision.aux_loss), expected, rtol=1e-5)
    assert decision.noise_std is None


def test_switch_gating_ignores_training_flag():
    num_experts, n, d = 4, 5, 3
    x, w_gate, w_noise = random_problem(82, n=n, d=d, num_experts=num_experts)
    layer = make_gating(num_experts, 1, d, gating="switch", w_gate=w_gate, w_noise=w_noise)
    a = layer(x, training=True)
    b = layer(x, training=False)
    assert_array_equal(a.top_indices.numpy(), b.top_indices.numpy())
    assert_allclose(a.top_gates.numpy(), b.top_gates.numpy())


def test_softmax_gating_is_full_softmax():
    num_experts, n, d = 5, 6, 3
    x, w_gate, w_noise = random_problem(91, n=n, d=d, num_experts=num_experts)
    layer = make_gating(
        num_experts, num_experts, d, gating="softmax", w_gate=w_gate, w_noise=w_noise
    )
    probs = np_softmax(x.astype(np.float64) @ w_gate)
    for training in (True, False):
        decision = layer(x, training=training)
        top_gates = decision.top_gates.numpy()
        assert np.all(np.diff(top_gates, axis=-1) <= 0.0), "top_gates not sorted"
        assert_allclose(top_gates, -np.sort(-probs, -1), rtol=1e-5)
        assert_allclose(dense_gates(decision, n, num_experts), probs, rtol=1e-5)
        assert decision.noise_std is None


# ---------------------------------------------------------------------------
# BatchwiseGating.


def np_batchwise_mask(logits, m):
    mask = np.zeros(logits.shape, bool)
    for i in range(logits.shape[1]):
        mask[np.argsort(-logits[:, i])[:m], i] = True
    return mask


def make_batchwise(num_experts, k, d, **kwargs):
    layer = BatchwiseGating(num_experts, k=k, seed=0, **kwargs)
    layer.build((d,))
    return layer


@pytest.mark.parametrize(
    "n,num_experts,k,m",
    [(8, 4, 2, 4), (7, 4, 2, 3), (3, 4, 1, 1), (10, 5, 1, 2), (6, 3, 3, 6)],
)
def test_batchwise_training_selects_top_m_tokens_per_expert(n, num_experts, k, m):
    d = 3
    assert m == max(1, (k * n) // num_experts)  # the hand value of m
    layer = make_batchwise(num_experts, k, d)
    x = np.random.default_rng(n + k).normal(size=(n, d)).astype(np.float32)
    decision = layer(x, training=True)
    logits = x.astype(np.float64) @ layer.w_gate.numpy()
    assert_allclose(decision.clean_logits.numpy(), logits, rtol=1e-5, atol=1e-5)
    expected_mask = np_batchwise_mask(logits, m)
    dense = dense_gates(decision, n, num_experts)
    assert_array_equal(dense > 0, expected_mask)
    assert_array_equal(decision.counts.numpy(), np.full(num_experts, m))
    assert_array_equal(decision.load.numpy(), np.full(num_experts, m))
    # Gates: softmax of each token over its selected logits; zero elsewhere.
    expected_gates = np.zeros_like(logits)
    for t in range(n):
        sel = expected_mask[t]
        if sel.any():
            expected_gates[t, sel] = np_softmax(logits[t, sel])
    assert_allclose(dense, expected_gates, rtol=1e-5, atol=1e-7)
    assert_allclose(decision.importance.numpy(), expected_gates.sum(0), rtol=1e-5)
    # top_indices / top_gates: the k largest gates, -1 / 0 where fewer.
    top_indices = decision.top_indices.numpy()
    top_gates = decision.top_gates.numpy()
    for t in range(n):
        chosen = np.flatnonzero(expected_mask[t])
        kept = min(k, chosen.size)
        assert set(top_indices[t, :kept]) <= set(chosen.tolist())
        assert_array_equal(top_indices[t, kept:], -1)
        assert_allclose(top_gates[t, :kept], -np.sort(-expected_gates[t])[:kept], rtol=1e-5)


def test_batchwise_weight_excludes_tokens():
    n, num_experts, k, d = 8, 4, 2, 3
    weight = np.array([1, 1, 0, 1, 1, 0, 1, 1], np.float32)  # 6 valid -> m = 3
    layer = make_batchwise(num_experts, k, d)
    x = np.random.default_rng(3).normal(size=(n, d)).astype(np.float32)
    decision = layer(x, training=True, weight=weight)
    logits = x.astype(np.float64) @ layer.w_gate.numpy()
    logits_valid = np.where(weight[:, None] > 0, logits, -np.inf)
    expected_mask = np_batchwise_mask(logits_valid, 3)
    assert_array_equal(dense_gates(decision, n, num_experts) > 0, expected_mask)
    assert_array_equal(decision.counts.numpy(), np.full(num_experts, 3))
    assert not np.isin(decision.token_index.numpy(), np.flatnonzero(weight == 0)).any()


def test_batchwise_inference_uses_thresholds():
    n, num_experts, k, d = 9, 4, 2, 3
    layer = make_batchwise(num_experts, k, d)
    thresholds = np.array([-0.2, 0.1, 0.4, -10.0], np.float32)
    layer.thresholds.assign(thresholds)
    x = np.random.default_rng(4).normal(size=(n, d)).astype(np.float32)
    decision = layer(x, training=False)
    logits = x.astype(np.float64) @ layer.w_gate.numpy()
    expected_mask = logits > thresholds
    assert_array_equal(dense_gates(decision, n, num_experts) > 0, expected_mask)
    assert_array_equal(decision.counts.numpy(), expected_mask.sum(0))
    # Expert 3's threshold is below every logit: it takes all tokens.
    assert decision.counts.numpy()[3] == n
    expected_gates = np.zeros_like(logits)
    for t in range(n):
        sel = expected_mask[t]
        if sel.any():
            expected_gates[t, sel] = np_softmax(logits[t, sel])
    assert_allclose(dense_gates(decision, n, num_experts), expected_gates, rtol=1e-5, atol=1e-7)
    # A threshold above every logit sends nothing to the expert.
    layer.thresholds.assign(np.full(num_experts, 100.0, np.float32))
    empty = layer(x, training=False)
    assert empty.token_index.shape[0] == 0
    assert_array_equal(empty.counts.numpy(), np.zeros(num_experts))
    assert np.isfinite(float(empty.aux_loss))
    assert_array_equal(empty.top_indices.numpy(), np.full((n, k), -1))


def test_batchwise_threshold_gradient_moves_toward_boundary():
    n, num_experts, k, d = 8, 4, 2, 3  # m = 4
    layer = make_batchwise(
        num_experts, k, d, importance_weight=0.0, load_weight=0.0, threshold_weight=1.0
    )
    x = np.random.default_rng(5).normal(size=(n, d)).astype(np.float32)
    logits = x.astype(np.float64) @ layer.w_gate.numpy()
    bw_mask = np_batchwise_mask(logits, 4)
    for thresholds in (
        np.full(num_experts, -50.0),  # too low: every token passes, T must rise
        np.full(num_experts, 50.0),  # too high: none pass, T must fall
        np.array([-50.0, 50.0, 0.0, 0.3]),
    ):
        layer.thresholds.assign(thresholds.astype(np.float32))
        with tf.GradientTape() as tape:
            loss = layer(x, training=True).aux_loss
        grad_t, grad_w = tape.gradient(loss, [layer.thresholds, layer.w_gate])
        thr_mask = (logits > thresholds).astype(np.float64)
        # dL/dT_i = -sum_t (M_T - M_B)_{t,i} / n.
        expected = -(thr_mask - bw_mask).sum(0) / n
        assert_allclose(grad_t.numpy(), expected, rtol=1e-5, atol=1e-7)
        expected_loss = np.mean(np.sum((thr_mask - bw_mask) * (logits - thresholds), -1))
        assert_allclose(float(loss), expected_loss, rtol=1e-4)
        # Gradient descent moves T toward the batchwise boundary.
        too_many = thr_mask.sum(0) > 4
        too_few = thr_mask.sum(0) < 4
        assert np.all(grad_t.numpy()[too_many] < 0)
        assert np.all(grad_t.numpy()[too_few] > 0)
        # The threshold loss does not pull the gate's logits.
        assert grad_w is None or np.all(grad_w.numpy() == 0.0)
    # Thresholds on the boundary reproduce the mask: loss and gradient vanish.
    sorted_cols = -np.sort(-logits, axis=0)
    boundary = 0.5 * (sorted_cols[3] + sorted_cols[4])
    layer.thresholds.assign(boundary.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = layer(x, training=True).aux_loss
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
    assert_array_equal(tape.gradient(loss, layer.thresholds).numpy(), np.zeros(num_experts))


def test_batchwise_w_gate_is_random_not_zero():
    layer = make_batchwise(4, 2, 3)
    assert tuple(layer.w_gate.shape) == (3, 4)
    assert tuple(layer.thresholds.shape) == (4,)
    assert np.abs(layer.w_gate.numpy()).min() > 0.0
    assert_array_equal(layer.thresholds.numpy(), np.zeros(4))


# ---------------------------------------------------------------------------
# Argument validation.


@pytest.mark.parametrize(
    "kwargs,name,received",
    [
        (dict(num_experts=4, k=0), "k", "k=0"),
        (dict(num_experts=4, k=5), "k", "k=5"),
        (dict(num_experts=0, k=1), "num_experts", "num_experts=0"),
        (dict(num_experts=4, k=2, gating="bogus"), "gating", "gating='bogus'"),
        (dict(num_experts=4, k=2, importance_weight=-0.1), "importance_weight", "=-0.1"),
        (dict(num_experts=4, k=2, load_weight=-1.0), "load_weight", "=-1.0"),
        (dict(num_experts=4, k=2, noise_epsilon=-1e-3), "noise_epsilon", "=-0.001"),
        (dict(num_experts=4, k=2, gating="switch"), "k", "k=2"),
        (dict(num_experts=4, k=2, gating="softmax"), "k", "k=2"),
    ],
)
def test_noisy_top_k_invalid_arguments(kwargs, name, received):
    with pytest.raises(ValueError) as info:
        make_gating(d=3, **kwargs)
    message = str(info.value)
    assert name in message
    assert received in message


def test_switch_and_softmax_error_messages_name_the_gating():
    with pytest.raises(ValueError, match="switch"):
        NoisyTopKGating(4, k=2, gating="switch")
    with pytest.raises(ValueError, match="softmax"):
        NoisyTopKGating(4, k=2, gating="softmax")
    with pytest.raises(ValueError, match="switch"):
        SwitchGating(4, k=2)
    with pytest.raises(ValueError, match="softmax"):
        SoftmaxGating(4, k=2)
    # NoisyTopKGating points to the classes that now hold those rules.
    with pytest.raises(ValueError, match="SwitchGating"):
        NoisyTopKGating(4, k=1, gating="switch")


@pytest.mark.parametrize(
    "kwargs,received",
    [
        (dict(num_experts=4, k=0), "k=0"),
        (dict(num_experts=3, k=4), "k=4"),
        (dict(num_experts=0, k=1), "num_experts=0"),
        (dict(num_experts=4, k=2, importance_weight=-1.0), "importance_weight=-1.0"),
        (dict(num_experts=4, k=2, load_weight=-0.5), "load_weight=-0.5"),
        (dict(num_experts=4, k=2, threshold_weight=-2.0), "threshold_weight=-2.0"),
    ],
)
def test_batchwise_invalid_arguments(kwargs, received):
    with pytest.raises(ValueError, match=received):
        BatchwiseGating(**kwargs)


def test_valid_edge_arguments_are_accepted():
    NoisyTopKGating(1, k=1)
    NoisyTopKGating(4, k=4)
    SwitchGating(4, k=1, importance_weight=0, load_weight=0)
    SoftmaxGating(3, k=3)
    SoftmaxGating(3)
    BatchwiseGating(4, k=4, threshold_weight=0.0)
