"""Tests of keras_moe.losses against closed forms and independent NumPy code.

Every expected value below is worked out by hand or with NumPy; the code
under test is never used to produce an expected value.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose, assert_array_equal

from keras_moe import losses
from keras_moe.gating import NoisyTopKGating

# ---------------------------------------------------------------------------
# Independent NumPy references.


def np_cv_squared(v):
    v = np.asarray(v, np.float64).reshape(-1)
    if v.size <= 1:
        return 0.0
    return float(np.var(v) / (np.mean(v) ** 2 + 1e-10))


def np_phi(z):
    """Standard normal CDF written with math.erf (scipy is not installed)."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def np_smooth_load_probability(clean, noisy, std, k):
    """Eq. 9 of Shazeer et al. 2017, written literally with loops.

    P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / std_i), where
    kth_excluding is the k-th largest noisy logit once component i is removed.
    """
    n, e = clean.shape
    out = np.zeros((n, e))
    for t in range(n):
        for i in range(e):
            others = [noisy[t, j] for j in range(e) if j != i]
            kth = sorted(others, reverse=True)[k - 1]
            out[t, i] = np_phi((clean[t, i] - kth) / std[t, i])
    return out


# ---------------------------------------------------------------------------
# cv_squared / coefficient_of_variation.


class TestCvSquared:
    def test_constant_vector_is_zero(self):
        assert float(losses.cv_squared([3.0, 3.0, 3.0, 3.0, 3.0])) == 0.0

    def test_two_elements_hand_value(self):
        # [2, 0]: mean 1, population variance ((2-1)^2 + (0-1)^2) / 2 = 1.
        assert_allclose(float(losses.cv_squared([2.0, 0.0])), 1.0, rtol=1e-6)

    def test_one_to_four_hand_value(self):
        # mean 2.5 -> mean^2 6.25; deviations -1.5,-0.5,0.5,1.5 -> var 5/4 = 1.25.
        assert_allclose(float(losses.cv_squared([1.0, 2.0, 3.0, 4.0])), 0.2, rtol=1e-6)

    def test_population_not_sample_variance(self):
        # Sample variance (ddof=1) of [2, 0] is 2 and would give 2, not 1.
        assert_allclose(float(losses.cv_squared([0.0, 2.0])), 1.0, rtol=1e-6)

    def test_all_zeros_is_zero_not_nan(self):
        value = float(losses.cv_squared(tf.zeros([5])))
        assert value == 0.0

    def test_all_zeros_gradient_is_finite(self):
        v = tf.Variable(tf.zeros([4]))
        with tf.GradientTape() as tape:
            loss = losses.cv_squared(v)
        grad = tape.gradient(loss, v)
        assert np.all(np.isfinite(grad.numpy()))

    def test_single_element_is_zero(self):
        assert float(losses.cv_squared([7.0])) == 0.0
        assert float(losses.cv_squared(tf.constant([[7.0]]))) == 0.0

    def test_scale_invariant(self):
        # cv^2 of 10 * v equals cv^2 of v (up to the tiny epsilon).
        v = np.array([1.0, 5.0, 2.0, 0.5])
        assert_allclose(float(losses.cv_squared(10.0 * v)), float(losses.cv_squared(v)), rtol=1e-5)

    def test_returns_float32_scalar_from_ints_and_float64(self):
        out = losses.cv_squared(tf.constant([1, 3], tf.int32))
        assert out.dtype == tf.float32 and out.shape == ()
        # mean 2, var 1 -> 0.25.
        assert_allclose(float(out), 0.25, rtol=1e-6)
        out64 = losses.cv_squared(tf.constant([1.0, 3.0], tf.float64))
        assert out64.dtype == tf.float32
        assert_allclose(float(out64), 0.25, rtol=1e-6)

    @pytest.mark.parametrize("size", [2, 3, 8, 17])
    def test_matches_numpy_on_random_vectors(self, size):
        rng = np.random.default_rng(size)
        for _ in range(5):
            v = rng.uniform(0.1, 5.0, size=size)
            assert_allclose(float(losses.cv_squared(v)), np_cv_squared(v), rtol=1e-5)

    def test_matrix_is_flattened(self):
        m = np.array([[1.0, 2.0], [3.0, 4.0]])
        assert_allclose(float(losses.cv_squared(m)), 0.2, rtol=1e-6)


class TestCoefficientOfVariation:
    def test_hand_values(self):
        assert_allclose(float(losses.coefficient_of_variation([2.0, 0.0])), 1.0, rtol=1e-6)
        assert_allclose(
            float(losses.coefficient_of_variation([1.0, 2.0, 3.0, 4.0])),
            math.sqrt(0.2),
            rtol=1e-6,
        )
        assert float(losses.coefficient_of_variation([4.0, 4.0])) == 0.0
        assert float(losses.coefficient_of_variation([0.0, 0.0])) == 0.0

    def test_matches_numpy_std_over_mean(self):
        rng = np.random.default_rng(0)
        v = rng.uniform(0.5, 3.0, size=9)
        assert_allclose(
            float(losses.coefficient_of_variation(v)), np.std(v) / np.mean(v), rtol=1e-5
        )


# ---------------------------------------------------------------------------
# importance / counts.


class TestImportanceAndCounts:
    def test_importance_hand_example(self):
        # Pairs: expert 0 gets 0.5 + 0.25, expert 2 gets 0.75, expert 1 and 3 nothing.
        out = losses.importance(tf.constant([0, 2, 0], tf.int32), tf.constant([0.5, 0.75, 0.25]), 4)
        assert out.shape == (4,)
        assert_allclose(out.numpy(), [0.75, 0.0, 0.75, 0.0])

    def test_importance_matches_bincount(self):
        rng = np.random.default_rng(1)
        num_experts = 5
        idx = rng.integers(0, num_experts, size=40)
        gate = rng.uniform(0.0, 1.0, size=40)
        out = losses.importance(tf.constant(idx, tf.int32), tf.constant(gate, tf.float32), 5)
        expected = np.bincount(idx, weights=gate, minlength=num_experts)
        assert out.dtype == tf.float32
        assert_allclose(out.numpy(), expected, rtol=1e-5)

    def test_counts_matches_bincount(self):
        rng = np.random.default_rng(2)
        num_experts = 6
        idx = rng.integers(0, num_experts - 1, size=30)  # expert 5 never used
        out = losses.counts(tf.constant(idx, tf.int32), num_experts)
        assert out.dtype == tf.float32
        assert_array_equal(out.numpy(), np.bincount(idx, minlength=num_experts))
        assert out.numpy()[5] == 0.0

    def test_counts_with_weight_matches_weighted_bincount(self):
        rng = np.random.default_rng(3)
        num_experts = 4
        idx = rng.integers(0, num_experts, size=25)
        weight = rng.integers(0, 2, size=25).astype(np.float32)
        out = losses.counts(tf.constant(idx, tf.int32), num_experts, tf.constant(weight))
        expected = np.bincount(idx, weights=weight, minlength=num_experts)
        assert_allclose(out.numpy(), expected)

    def test_counts_hand_example(self):
        out = losses.counts(tf.constant([1, 1, 3, 1], tf.int32), 4, [1.0, 0.0, 1.0, 1.0])
        assert_array_equal(out.numpy(), [0.0, 2.0, 0.0, 1.0])


# ---------------------------------------------------------------------------
# smooth_load_probability (Eq. 8-9).


class TestSmoothLoadProbability:
    def test_hand_example_two_experts(self):
        # k=1, E=2: P(x,0) = Phi((0 - noisy_1) / 1) = Phi(1);
        #           P(x,1) = Phi((0 - noisy_0) / 1) = Phi(-1).
        clean = tf.constant([[0.0, 0.0]])
        noisy = tf.constant([[1.0, -1.0]])
        std = tf.constant([[1.0, 1.0]])
        out = losses.smooth_load_probability(clean, noisy, std, 1).numpy()
        assert_allclose(out, [[0.8413447, 0.1586553]], atol=1e-6)

    def test_hand_example_three_experts_k2(self):
        # noisy = [3, 1, 2], k = 2.
        # i=0: others [1, 2] -> 2nd largest 1 -> Phi((0.5 - 1) / 0.5) = Phi(-1)
        # i=1: others [3, 2] -> 2 -> Phi((0 - 2) / 2) = Phi(-1)
        # i=2: others [3, 1] -> 1 -> Phi((2 - 1) / 1) = Phi(1)
        clean = tf.constant([[0.5, 0.0, 2.0]])
        noisy = tf.constant([[3.0, 1.0, 2.0]])
        std = tf.constant([[0.5, 2.0, 1.0]])
        out = losses.smooth_load_probability(clean, noisy, std, 2).numpy()
        assert_allclose(out, [[0.1586553, 0.1586553, 0.8413447]], atol=1e-6)

    @pytest.mark.parametrize("num_experts,k", [(2, 1), (4, 1), (4, 2), (5, 3), (6, 5)])
    def test_matches_literal_numpy_eq9(self, num_experts, k):
        rng = np.random.default_rng(10 * num_experts + k)
        n = 7
        clean = rng.normal(size=(n, num_experts))
        std = rng.uniform(0.3, 2.0, size=(n, num_experts))
        noisy = clean + std * rng.normal(size=(n, num_experts))
        out = losses.smooth_load_probability(
            tf.constant(clean, tf.float32),
            tf.constant(noisy, tf.float32),
            tf.constant(std, tf.float32),
            k,
        ).numpy()
        expected = np_smooth_load_probability(clean, noisy, std, k)
        assert out.shape == (n, num_experts)
        assert_allclose(out, expected, atol=2e-5)
        assert np.all((out >= 0.0) & (out <= 1.0))


# ---------------------------------------------------------------------------
# Switch Transformer load balancing loss.


class TestSwitchLoadBalancingLoss:
    def test_perfect_balance_is_one(self):
        num_experts = 4
        idx = tf.constant([0, 1, 2, 3, 3, 2, 1, 0], tf.int32)
        probs = tf.fill([8, num_experts], 0.25)
        assert_allclose(float(losses.switch_load_balancing_loss(idx, probs)), 1.0, rtol=1e-6)

    def test_all_to_expert_zero_is_num_experts(self):
        for num_experts in (2, 4, 8):
            probs = np.zeros((5, num_experts), np.float32)
            probs[:, 0] = 1.0
            idx = tf.zeros([5], tf.int32)
            out = float(losses.switch_load_balancing_loss(idx, tf.constant(probs)))
            assert_allclose(out, float(num_experts), rtol=1e-6)

    def test_hand_example(self):
        # E = 2, both tokens to expert 0: f = [1, 0],
        # P = mean([[.75, .25], [.5, .5]]) = [.625, .375] -> 2 * (1 * .625) = 1.25.
        idx = tf.constant([0, 0], tf.int32)
        probs = tf.constant([[0.75, 0.25], [0.5, 0.5]])
        assert_allclose(float(losses.switch_load_balancing_loss(idx, probs)), 1.25, rtol=1e-6)

    def test_hand_example_mixed(self):
        # E = 3, idx [0, 1, 1, 2]: f = [1/4, 2/4, 1/4];
        # P = column means of probs = [0.4, 0.35, 0.25];
        # 3 * (0.1 + 0.175 + 0.0625) = 1.0125.
        idx = tf.constant([0, 1, 1, 2], tf.int32)
        probs = tf.constant([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.4, 0.3], [0.5, 0.2, 0.3]])
        assert_allclose(float(losses.switch_load_balancing_loss(idx, probs)), 1.0125, rtol=1e-5)

    def test_weight_excludes_tokens(self):
        # Only token 0 counts: f = [1, 0], P = [.75, .25] -> 2 * .75 = 1.5.
        idx = tf.constant([0, 0], tf.int32)
        probs = tf.constant([[0.75, 0.25], [0.5, 0.5]])
        out = losses.switch_load_balancing_loss(idx, probs, tf.constant([1.0, 0.0]))
        assert_allclose(float(out), 1.5, rtol=1e-6)

    def test_all_zero_weight_is_zero_not_nan(self):
        idx = tf.constant([0, 1], tf.int32)
        probs = tf.constant([[0.75, 0.25], [0.5, 0.5]])
        out = float(losses.switch_load_balancing_loss(idx, probs, tf.zeros([2])))
        assert out == 0.0

    def test_matches_numpy_on_random_routing(self):
        rng = np.random.default_rng(4)
        num_experts, n = 5, 12
        logits = rng.normal(size=(n, num_experts))
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        idx = probs.argmax(-1)
        f = np.bincount(idx, minlength=num_experts) / n
        expected = num_experts * np.sum(f * probs.mean(0))
        out = losses.switch_load_balancing_loss(
            tf.constant(idx, tf.int32), tf.constant(probs, tf.float32)
        )
        assert_allclose(float(out), expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# Batchwise threshold loss (App. F, Eq. 18).


class TestBatchwiseThresholdLoss:
    logits = tf.constant([[1.0, -1.0], [2.0, 0.5]])
    thresholds = tf.constant([0.0, 1.0])
    batchwise = tf.constant([[True, False], [False, True]])

    def test_hand_example(self):
        # threshold mask [[1, 0], [1, 0]]; diff = [[0, 0], [1, -1]];
        # token 0: 0; token 1: 1 * (2 - 0) + (-1) * (0.5 - 1) = 2.5; mean 1.25.
        out = losses.batchwise_threshold_loss(self.logits, self.thresholds, self.batchwise)
        assert_allclose(float(out), 1.25, rtol=1e-6)

    def test_hand_example_with_weight(self):
        out = losses.batchwise_threshold_loss(
            self.logits, self.thresholds, self.batchwise, tf.constant([0.0, 1.0])
        )
        assert_allclose(float(out), 2.5, rtol=1e-6)
        out = losses.batchwise_threshold_loss(
            self.logits, self.thresholds, self.batchwise, tf.constant([1.0, 0.0])
        )
        assert_allclose(float(out), 0.0, atol=1e-7)
        out = losses.batchwise_threshold_loss(
            self.logits, self.thresholds, self.batchwise, tf.zeros([2])
        )
        assert float(out) == 0.0

    def test_zero_when_thresholds_reproduce_mask(self):
        # T = [1.5, 0.0] reproduces the batchwise mask [[0, 0], [1, 1]] exactly.
        mask = tf.constant([[False, False], [True, True]])
        out = losses.batchwise_threshold_loss(self.logits, tf.constant([1.5, 0.0]), mask)
        assert float(out) == 0.0

    def test_non_negative(self):
        # Each term (M_T - M_B)(x - T) is >= 0: M_T = 1 means x > T.
        rng = np.random.default_rng(5)
        for _ in range(5):
            logits = rng.normal(size=(6, 3)).astype(np.float32)
            thresholds = rng.normal(size=3).astype(np.float32)
            mask = rng.integers(0, 2, size=(6, 3)).astype(bool)
            out = float(losses.batchwise_threshold_loss(logits, thresholds, mask))
            thr_mask = (logits > thresholds).astype(np.float64)
            expected = np.mean(np.sum((thr_mask - mask) * (logits - thresholds), axis=-1))
            assert out >= 0.0
            assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_threshold_gradient_sign(self):
        # Expert 0: T=0 lets token 1 through though the batchwise mask drops it:
        # dL/dT_0 = -(1 - 0) / 2 = -0.5, so gradient descent raises T_0.
        # Expert 1: T=1 blocks token 1 though the batchwise mask keeps it:
        # dL/dT_1 = -(0 - 1) / 2 = +0.5, so gradient descent lowers T_1.
        thresholds = tf.Variable(self.thresholds)
        with tf.GradientTape() as tape:
            loss = losses.batchwise_threshold_loss(self.logits, thresholds, self.batchwise)
        grad = tape.gradient(loss, thresholds).numpy()
        assert_allclose(grad, [-0.5, 0.5], rtol=1e-6)


# ---------------------------------------------------------------------------
# Balancing losses through the gating layer: 0 when balanced, growing with skew.


def _one_hot_tokens(assignment, num_experts):
    x = np.zeros((len(assignment), num_experts), np.float32)
    x[np.arange(len(assignment)), assignment] = 1.0
    return x


@pytest.mark.parametrize(
    "assignment,expected_cv2",
    [
        # counts per expert, mean 2: cv^2 = var / 4.
        ([0, 1, 2, 3, 0, 1, 2, 3], 0.0),  # [2, 2, 2, 2]
        ([0, 0, 0, 1, 1, 2, 2, 3], 0.125),  # [3, 2, 2, 1], var 0.5
        ([0, 0, 0, 0, 1, 1, 2, 3], 0.375),  # [4, 2, 1, 1], var 1.5
        ([0, 0, 0, 0, 0, 1, 2, 3], 0.75),  # [5, 1, 1, 1], var 3
        ([0, 0, 0, 0, 0, 0, 0, 0], 3.0),  # [8, 0, 0, 0], var 12
    ],
)
def test_top_k_aux_loss_hand_values(assignment, expected_cv2):
    # One-hot tokens with W_g = 2 I route token t to expert assignment[t];
    # with k = 1 every gate is 1, so importance = load = counts.
    num_experts = 4
    layer = NoisyTopKGating(
        num_experts, k=1, gating="top_k", importance_weight=0.3, load_weight=0.7
    )
    layer.build((num_experts,))
    layer.w_gate.assign(2.0 * np.eye(num_experts, dtype=np.float32))
    decision = layer(_one_hot_tokens(assignment, num_experts), training=True)
    expected_counts = np.bincount(assignment, minlength=num_experts)
    assert_array_equal(decision.counts.numpy(), expected_counts)
    assert_allclose(decision.importance.numpy(), expected_counts, rtol=1e-6)
    assert_allclose(float(decision.aux_loss), (0.3 + 0.7) * expected_cv2, rtol=1e-5, atol=1e-7)


def test_aux_loss_grows_monotonically_with_skew_k2():
    # k = 2, E = 4; token features have a strong own expert (logit 3) and a
    # second choice (logit 1), the rest 0: every token's gates are
    # softmax([3, 1]) = [a, 1 - a]. Skew by moving tokens to expert 0.
    num_experts, k = 4, 2
    layer = NoisyTopKGating(
        num_experts, k=k, gating="top_k", importance_weight=0.5, load_weight=0.5
    )
    layer.build((num_experts,))
    layer.w_gate.assign(np.eye(num_experts, dtype=np.float32))

    def tokens(pairs):
        x = np.zeros((len(pairs), num_experts), np.float32)
        for t, (first, second) in enumerate(pairs):
            x[t, first] = 3.0
            x[t, second] = 1.0
        return x

    a = math.exp(3.0) / (math.exp(3.0) + math.exp(1.0))
    balanced = [(0, 1), (1, 2), (2, 3), (3, 0)]
    skews = [
        balanced,
        [(0, 1), (0, 2), (2, 3), (3, 0)],
        [(0, 1), (0, 2), (0, 3), (3, 0)],
        [(0, 1), (0, 2), (0, 3), (0, 1)],
    ]
    losses_seen = []
    for pairs in skews:
        decision = layer(tokens(pairs), training=True)
        imp = np.zeros(num_experts)
        cnt = np.zeros(num_experts)
        for first, second in pairs:
            imp[first] += a
            imp[second] += 1 - a
            cnt[first] += 1
            cnt[second] += 1
        assert_allclose(decision.importance.numpy(), imp, rtol=1e-5)
        assert_array_equal(decision.counts.numpy(), cnt)
        expected = 0.5 * np_cv_squared(imp) + 0.5 * np_cv_squared(cnt)
        assert_allclose(float(decision.aux_loss), expected, rtol=1e-5, atol=1e-7)
        losses_seen.append(float(decision.aux_loss))
    assert losses_seen[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b > a_ + 1e-3 for a_, b in zip(losses_seen[:-1], losses_seen[1:], strict=True)), (
        losses_seen
    )
