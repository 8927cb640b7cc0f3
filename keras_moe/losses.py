"""Balancing losses and the routing statistics they are built from.

Every function here works on float32 tensors and on *sums* over the batch
(importance, load, counts), never on means, so that statistics computed on
several replicas can be added before the coefficient of variation is taken
(Shazeer et al. 2017 compute the losses over the whole batch).

References:
    Shazeer et al. 2017, "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer", arXiv:1701.06538, Section 4
    and Appendices A, B and F.
    Fedus et al. 2021, "Switch Transformers", arXiv:2101.03961, Eq. 4-6.
"""

import tensorflow as tf

# Added to the squared mean so that an all-zero vector (nothing routed, or a
# masked-out batch) gives a loss of 0 instead of NaN.
CV_EPSILON = 1e-10


def cv_squared(v):
    """Squared coefficient of variation of a vector: `var(v) / (mean(v)^2 + eps)`.

    The variance is the population variance (divides by `n`), as in the
    paper's Eq. 6-7 and tensor2tensor's `cv_squared`. A vector of a single
    element has no spread and gives 0.

    Args:
        v: 1-D tensor (any float dtype; computed in float32).

    Returns:
        A float32 scalar.

    Example:

    >>> float(cv_squared([1.0, 1.0, 1.0, 1.0]))
    0.0
    >>> round(float(cv_squared([2.0, 0.0])), 6)  # var 1, mean 1
    1.0
    """
    v = tf.cast(tf.convert_to_tensor(v), tf.float32)
    v = tf.reshape(v, [-1])
    if v.shape[0] is not None and v.shape[0] <= 1:
        return tf.zeros([], tf.float32)
    mean = tf.reduce_mean(v)
    var = tf.reduce_mean(tf.square(v - mean))
    return var / (tf.square(mean) + CV_EPSILON)


def coefficient_of_variation(v):
    """`std(v) / mean(v)` (population std): the figure of the paper's Table 6."""
    return tf.sqrt(cv_squared(v))


def importance(expert_index, gate, num_experts):
    """Importance of each expert, Eq. 6: the sum of its gate values over the batch.

    Args:
        expert_index: int32 tensor `[P]`, the expert of each (token, expert)
            pair that was routed.
        gate: float tensor `[P]`, the gate value of each pair (masked tokens
            carry no pairs, or gate 0).
        num_experts: int.

    Returns:
        float32 tensor `[num_experts]`.
    """
    return tf.math.unsorted_segment_sum(
        tf.cast(gate, tf.float32), expert_index, num_experts
    )


def counts(expert_index, num_experts, weight=None):
    """Number of (non-masked) tokens routed to each expert: `[num_experts]` float32."""
    ones = tf.ones_like(expert_index, dtype=tf.float32)
    if weight is not None:
        ones = ones * tf.cast(weight, tf.float32)
    return tf.math.unsorted_segment_sum(ones, expert_index, num_experts)


def smooth_load_probability(clean_logits, noisy_logits, noise_std, k):
    """Per-token probability that each expert is in the top k, Eq. 8-9.

    `P(x, i) = Phi((x W_g)_i - kth_excluding(H(x), k, i)) / noise_std_i)`:
    the probability that expert `i` is still selected if its own noise were
    drawn again while every other component of `H(x)` stays as sampled.
    Averaged over the noise it equals the probability that `i` is selected,
    so `sum_x P(x, i)` (Eq. 10) is an unbiased, differentiable estimate of
    the expert's load.

    Args:
        clean_logits: float32 `[N, E]`, `x W_g`.
        noisy_logits: float32 `[N, E]`, `H(x)`, the logits the top-k was
            taken on.
        noise_std: float32 `[N, E]`, `softplus(x W_noise) + noise_epsilon`.
        k: int, `1 <= k < E`.

    Returns:
        float32 `[N, E]`.
    """
    top_values, _ = tf.math.top_k(noisy_logits, k + 1)
    # Excluding an expert inside the top k, the k-th largest of the others
    # is the (k+1)-th overall; for an expert outside it is the k-th overall.
    threshold_if_in = top_values[:, k : k + 1]
    threshold_if_out = top_values[:, k - 1 : k]
    is_in = noisy_logits > threshold_if_in
    normal = _standard_normal_cdf
    prob_if_in = normal((clean_logits - threshold_if_in) / noise_std)
    prob_if_out = normal((clean_logits - threshold_if_out) / noise_std)
    return tf.where(is_in, prob_if_in, prob_if_out)


def _standard_normal_cdf(z):
    return 0.5 * tf.math.erfc(-z / tf.sqrt(2.0))


def switch_load_balancing_loss(expert_index, router_probs, weight=None):
    """Switch Transformer auxiliary loss: `E * sum_i f_i * P_i` (Fedus et al., Eq. 4).

    `f_i` is the fraction of tokens dispatched to expert `i` (top-1 choice),
    `P_i` the mean router probability for `i`. It equals 1 under perfect
    balance and grows to `E` when everything goes to one expert.

    Args:
        expert_index: int32 `[N]`, each token's top-1 expert.
        router_probs: float32 `[N, E]`, softmax over all experts.
        weight: optional float `[N]`, 0 for masked tokens.

    Returns:
        float32 scalar.
    """
    num_experts = router_probs.shape[-1]
    if weight is None:
        weight = tf.ones(tf.shape(expert_index), tf.float32)
    weight = tf.cast(weight, tf.float32)
    return switch_loss_from_sums(
        counts(expert_index, num_experts, weight),
        tf.reduce_sum(router_probs * weight[:, None], axis=0),
        tf.reduce_sum(weight),
    )


def switch_loss_from_sums(expert_counts, router_prob_sum, tokens):
    """`E * sum_i f_i P_i` from batch sums (addable across replicas).

    Args:
        expert_counts: float32 `[E]`, tokens whose top-1 choice is expert `i`.
        router_prob_sum: float32 `[E]`, router probabilities summed over tokens.
        tokens: float32 scalar, number of (non-masked) tokens.
    """
    total = tf.maximum(tf.cast(tokens, tf.float32), 1.0)
    fraction = expert_counts / total
    mean_prob = router_prob_sum / total
    num_experts = expert_counts.shape[-1]
    return float(num_experts) * tf.reduce_sum(fraction * mean_prob)


def batchwise_threshold_loss(logits, thresholds, batchwise_mask, weight=None):
    """Threshold loss of App. F, Eq. 18, averaged over tokens.

    `sum_i (M_threshold(x, T)_i - M_batchwise(X, m)_i) (x_i - T_i)` is zero
    when the per-expert thresholds `T` reproduce the batchwise mask, and its
    gradient moves each `T_i` towards the boundary the batchwise mask drew.

    Args:
        logits: float32 `[N, E]`.
        thresholds: float32 `[E]`.
        batchwise_mask: bool `[N, E]`, Eq. 16.
        weight: optional float `[N]`, 0 for masked tokens.

    Returns:
        float32 scalar.
    """
    threshold_mask = tf.cast(logits > thresholds, tf.float32)
    diff = threshold_mask - tf.cast(batchwise_mask, tf.float32)
    per_token = tf.reduce_sum(diff * (logits - thresholds), axis=-1)
    if weight is None:
        return tf.reduce_mean(per_token)
    weight = tf.cast(weight, tf.float32)
    return tf.reduce_sum(per_token * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)
