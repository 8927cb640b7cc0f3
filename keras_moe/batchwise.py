"""Batchwise gating with learned inference thresholds (App. F of the paper)."""

import keras
import tensorflow as tf

from keras_moe import losses
from keras_moe.gating import validate_common
from keras_moe.routing import GateDecision


def masked_softmax(logits, mask):
    """Softmax of each row over its `True` entries; all-False rows give zeros."""
    mask_f = tf.cast(mask, logits.dtype)
    row_max = tf.reduce_max(tf.where(mask, logits, tf.fill(tf.shape(logits), -1e30)), -1)
    exp = tf.exp(tf.minimum(logits - row_max[:, None], 0.0)) * mask_f
    return tf.math.divide_no_nan(exp, tf.reduce_sum(exp, -1, keepdims=True))


def batchwise_mask(logits, weight, k):
    """`M_batchwise(X, m)` of Eq. 16: each expert keeps its top `m` tokens.

    `m = max(1, floor(k * n / E))` with `n` the number of non-masked tokens,
    so every expert receives exactly `m` tokens and each token on average
    about `k` experts.

    Args:
        logits: float32 `[N, E]`.
        weight: float32 `[N]`, 0 for masked tokens (never selected).
        k: int.

    Returns:
        bool `[N, E]`.
    """
    num_tokens = tf.shape(logits)[0]
    num_experts = logits.shape[-1]
    n_valid = tf.cast(tf.reduce_sum(weight), tf.int32)
    m = tf.maximum((k * n_valid) // num_experts, 1)
    m = tf.minimum(m, tf.maximum(n_valid, 1))
    candidates = tf.where(weight[:, None] > 0, logits, tf.fill(tf.shape(logits), -1e30))
    _, chosen = tf.math.top_k(tf.transpose(candidates), m)  # [E, m] token ids
    experts = tf.broadcast_to(tf.range(num_experts)[:, None], tf.shape(chosen))
    index = tf.stack([tf.reshape(chosen, [-1]), tf.reshape(experts, [-1])], axis=1)
    mask = tf.scatter_nd(index, tf.ones([tf.shape(index)[0]], tf.int32), [num_tokens, num_experts])
    return tf.logical_and(mask > 0, weight[:, None] > 0)


@keras.saving.register_keras_serializable(package="keras_moe")
class BatchwiseGating(keras.layers.Layer):
    """Strictly balanced batchwise gating (Shazeer et al. 2017, App. F).

    Training: `M_batchwise(X, m)` keeps, for each expert, the `m = k|X|/E`
    tokens of the batch with the largest logits `x W_g` (Eq. 16), so every
    expert receives exactly the same number of tokens; the gates are the
    softmax of each token's kept logits. A token may so be sent to more or
    fewer than `k` experts (to none: its output is 0).
    Inference: `M_threshold(x, T)_i = 1 if x_i > T_i` (Eq. 17) with learned
    per-expert thresholds `T`, trained by the threshold loss of Eq. 18
    (weighted by `threshold_weight`; its gradient reaches only `T`, so it
    does not pull the gate's logits).

    `W_g` is initialised randomly (not zero): with equal logits every
    expert would pick the same `m` tokens.

    Args:
        num_experts: int >= 1.
        k: int, average experts per token, `1 <= k <= E`.
        importance_weight: float >= 0, weight of `CV(Importance)^2`.
        load_weight: float >= 0, weight of `CV(Load)^2` (0 in training by
            construction; it matters at inference only).
        threshold_weight: float >= 0, weight of the threshold loss.
        seed: optional int.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `[N, d]`.
        training: bool.
        weight: optional float `[N]`, 0 for masked tokens.

    Returns:
        A `keras_moe.routing.GateDecision` whose `top_indices` / `top_gates`
        report the k largest gates of each token (-1 / 0 where it has fewer).

    Example:

    >>> gating = BatchwiseGating(num_experts=4, k=2)
    >>> d = gating(tf.random.normal([8, 6]), training=True)
    >>> [int(c) for c in d.counts]  # m = 2 * 8 / 4 tokens each
    [4, 4, 4, 4]
    """

    # Experts choose tokens, so a token's choices are not ranked: no pair
    # has priority over another when capacity is short.
    top_k_routing = False

    def __init__(
        self,
        num_experts,
        k=4,
        importance_weight=0.1,
        load_weight=0.1,
        threshold_weight=1.0,
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        validate_common(num_experts, k, importance_weight, load_weight, 0.0)
        if not isinstance(threshold_weight, (int, float)) or threshold_weight < 0:
            raise ValueError(
                "`threshold_weight` must be a non-negative number. "
                f"Received: threshold_weight={threshold_weight}"
            )
        self.num_experts = num_experts
        self.k = k
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.threshold_weight = float(threshold_weight)
        self.seed = seed

    def build(self, input_shape):
        d = input_shape[-1]
        self.w_gate = self.add_weight(
            name="w_gate",
            shape=(d, self.num_experts),
            initializer=keras.initializers.RandomNormal(stddev=d**-0.5, seed=self.seed),
        )
        self.thresholds = self.add_weight(
            name="thresholds", shape=(self.num_experts,), initializer="zeros"
        )

    def call(self, inputs, training=False, weight=None):
        x = tf.cast(inputs, tf.float32)
        if weight is None:
            weight = tf.ones(tf.shape(x)[:1], tf.float32)
        weight = tf.cast(weight, tf.float32)
        logits = tf.matmul(x, tf.cast(self.w_gate, tf.float32))
        thresholds = tf.cast(self.thresholds, tf.float32)
        if training:
            mask = batchwise_mask(logits, weight, self.k)
        else:
            mask = tf.logical_and(logits > thresholds, weight[:, None] > 0)
        gates = masked_softmax(logits, mask)

        pairs = tf.cast(tf.where(mask), tf.int32)
        token_index, expert_index = pairs[:, 0], pairs[:, 1]
        gate = tf.gather_nd(gates, pairs)
        top_gates, top_indices = tf.math.top_k(gates, self.k)
        top_indices = tf.where(top_gates > 0, tf.cast(top_indices, tf.int32), -1)

        importance = tf.reduce_sum(gates * weight[:, None], axis=0)
        counts = tf.reduce_sum(tf.cast(mask, tf.float32), axis=0)
        loss_stats = {"importance": importance, "counts": counts}
        local = tf.zeros([], tf.float32)
        if training:
            local = self.threshold_weight * losses.batchwise_threshold_loss(
                tf.stop_gradient(logits), thresholds, mask, weight
            )
        return GateDecision(
            token_index=token_index,
            expert_index=expert_index,
            gate=gate,
            top_indices=top_indices,
            top_gates=top_gates,
            importance=importance,
            load=counts,
            counts=counts,
            aux_loss=self.balancing_loss(loss_stats) + local,
            clean_logits=logits,
            noise_std=None,
            loss_stats=loss_stats,
            local_loss=local,
        )

    def balancing_loss(self, loss_stats):
        """`w_importance CV(Importance)^2 + w_load CV(Load)^2` from batch sums."""
        aux = self.importance_weight * losses.cv_squared(loss_stats["importance"])
        return aux + self.load_weight * losses.cv_squared(loss_stats["counts"])

    def get_config(self):
        config = {
            "num_experts": self.num_experts,
            "k": self.k,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "threshold_weight": self.threshold_weight,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}
