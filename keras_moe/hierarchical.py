"""Hierarchical (two-level) Mixture-of-Experts (Shazeer et al. 2017, App. B)."""

import keras
import tensorflow as tf

from keras_moe import losses
from keras_moe.dispatch import grouped_matmul
from keras_moe.gating import NoisyTopKGating, top_k_gates, validate_common
from keras_moe.moe import SparseMoEBase
from keras_moe.routing import GateDecision, make_routing_metrics


def validate_hierarchical(num_groups, experts_per_group, k_primary, k_secondary, gating,
                          importance_weight, load_weight, noise_epsilon):
    """Argument checks of `HierarchicalGating` and `HierarchicalMoE`."""
    validate_common(num_groups, k_primary, importance_weight, load_weight, noise_epsilon)
    if not isinstance(experts_per_group, int) or experts_per_group < 1:
        raise ValueError(
            "`experts_per_group` must be an integer >= 1. "
            f"Received: experts_per_group={experts_per_group}"
        )
    if not isinstance(k_secondary, int) or not 1 <= k_secondary <= experts_per_group:
        raise ValueError(
            f"`k_secondary` must be an integer in [1, experts_per_group={experts_per_group}]. "
            f"Received: k_secondary={k_secondary}"
        )
    if gating not in ("noisy_top_k", "top_k"):
        raise ValueError(
            "`gating` of a hierarchical MoE must be 'noisy_top_k' or 'top_k'. "
            f"Received: gating={gating!r}"
        )


def _repeat(t, times):
    return tf.repeat(t, times, axis=0)


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalGating(keras.layers.Layer):
    """Two-level noisy top-k gate over `num_groups * experts_per_group` experts.

    A primary gate `G_primary` chooses `k_primary` groups per token; inside
    each chosen group `i`, a secondary gate `G_i` (its own `W_g`, `W_noise`)
    chooses `k_secondary` experts. The combined gate of expert `(i, j)` is
    `G_primary(x)_i * G_i(x)_j` (App. B, Eq. 12), and each token's combined
    gates sum to 1. Secondary logits are computed only for the chosen
    groups, by the same grouped dispatch the experts use.

    Balancing losses use Importance_H (Eq. 13),
    `sum_x G_primary(x)_i G_i(x)_j`, and Load_H (Eq. 14),
    `Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|`, where `X^(i)` is the
    set of tokens the primary gate sent to group `i`; the primary load is
    the smooth estimator, so the primary gate gets gradient from Load_H.

    Args:
        num_groups: int >= 1.
        experts_per_group: int >= 1.
        k_primary: int, groups per token.
        k_secondary: int, experts per chosen group.
        gating: `"noisy_top_k"` or `"top_k"`.
        importance_weight, load_weight, noise_epsilon: as for `MoE`.
        seed: optional int.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `[N, d]`; training: bool; weight: optional float `[N]`;
        logits_mask: optional bool `[N, num_groups]`, groups a token may
            choose; k_primary: optional int, groups per token instead of
            the layer's.

    Returns:
        A `GateDecision` over the flat expert index `i * experts_per_group + j`
        whose `primary` field holds the first level's decision.

    Example:

    >>> gating = HierarchicalGating(num_groups=4, experts_per_group=3)
    >>> gating(tf.ones([5, 8]), training=True).top_gates.shape
    TensorShape([5, 4])
    """

    # Pairs are laid out `[N, k_primary * k_secondary]`, first group first.
    top_k_routing = True

    def __init__(
        self,
        num_groups,
        experts_per_group,
        k_primary=2,
        k_secondary=2,
        gating="noisy_top_k",
        importance_weight=0.1,
        load_weight=0.1,
        noise_epsilon=1e-2,
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        validate_hierarchical(
            num_groups, experts_per_group, k_primary, k_secondary, gating, importance_weight,
            load_weight, noise_epsilon,
        )
        # The second level runs each group's gate on the rows routed to it
        # (data-dependent shapes, which XLA rejects), so Keras trains the
        # layer without XLA (with a warning) instead of failing to compile.
        self.supports_jit = False
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.k_primary = k_primary
        self.k_secondary = k_secondary
        self.gating = gating
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.noise_epsilon = float(noise_epsilon)
        self.seed = seed
        self.noisy = gating == "noisy_top_k"
        # The primary gate's own losses are off: the hierarchical losses
        # below are taken over the combined gates instead.
        self.primary = NoisyTopKGating(
            num_groups, k_primary, gating, 0.0, 0.0, noise_epsilon, seed=seed, name="primary"
        )
        self.seed_generator = keras.random.SeedGenerator(None if seed is None else seed + 7)

    def build(self, input_shape):
        d = input_shape[-1]
        self.primary.build(input_shape)
        shape = (self.num_groups, d, self.experts_per_group)
        self.w_gate = self.add_weight(name="w_gate", shape=shape, initializer="zeros")
        self.w_noise = self.add_weight(name="w_noise", shape=shape, initializer="zeros")

    def clean_logits(self, inputs):
        """The primary gate's noise-free logits `[N, num_groups]` (pools are made of groups)."""
        return self.primary.clean_logits(inputs)

    def call(self, inputs, training=False, weight=None, logits_mask=None, k_primary=None):
        x = tf.cast(inputs, tf.float32)
        if weight is None:
            weight = tf.ones(tf.shape(x)[:1], tf.float32)
        weight = tf.cast(weight, tf.float32)
        # `logits_mask` (bool `[N, num_groups]`: document pools of groups) and
        # `k_primary` (inference-time k) only concern the first level.
        primary = self.primary(x, training=training, weight=weight, logits_mask=logits_mask,
                               k=k_primary)
        groups, per_group = self.num_groups, self.experts_per_group
        use_noise = self.noisy and training
        # Each token sent to group g is multiplied by that group's W_g (and
        # W_noise) alone: one grouped product over all groups at once
        # (`grouped_matmul`: a while loop from LOOP_MIN_EXPERTS groups on),
        # so the graph does not grow with the number of groups.
        weights = tf.cast(self.w_gate, tf.float32)
        if use_noise:
            weights = tf.concat([weights, tf.cast(self.w_noise, tf.float32)], axis=-1)
        routed = tf.gather(x, primary.token_index)
        logits = grouped_matmul(routed, primary.expert_index, weights)
        clean = logits[:, :per_group]
        noise_std = noise = None
        if use_noise:
            noise_std = tf.nn.softplus(logits[:, per_group:]) + self.noise_epsilon
            noise = keras.random.normal(tf.shape(clean), seed=self.seed_generator)
        idx2, gates2, load_prob2 = top_k_gates(clean, noise_std, noise, self.k_secondary)

        ks = self.k_secondary
        token_index = _repeat(primary.token_index, ks)
        expert_index = _repeat(primary.expert_index, ks) * per_group + tf.reshape(idx2, [-1])
        gate = _repeat(primary.gate, ks) * tf.reshape(gates2, [-1])
        row_weight = tf.gather(weight, primary.token_index)
        pair_weight = _repeat(row_weight, ks)
        num_experts = groups * per_group
        importance = losses.importance(expert_index, gate * pair_weight, num_experts)
        counts = losses.counts(expert_index, num_experts, pair_weight)
        if load_prob2 is None:
            secondary_load = tf.reshape(counts, [groups, per_group])
        else:
            secondary_load = tf.math.unsorted_segment_sum(
                load_prob2 * row_weight[:, None], primary.expert_index, groups
            )
        loss_stats = {
            "importance": importance,
            "primary_load": primary.load,
            "secondary_load": secondary_load,
            "primary_counts": primary.counts,
        }
        load = self.hierarchical_load(loss_stats)

        k_total = (k_primary or self.k_primary) * ks
        return GateDecision(
            token_index=token_index,
            expert_index=expert_index,
            gate=gate,
            top_indices=tf.reshape(expert_index, [-1, k_total]),
            top_gates=tf.reshape(gate, [-1, k_total]),
            importance=importance,
            load=load,
            counts=counts,
            aux_loss=self.balancing_loss(loss_stats),
            clean_logits=primary.clean_logits,
            noise_std=primary.noise_std,
            primary=primary,
            loss_stats=loss_stats,
            local_loss=tf.zeros([], tf.float32),
        )

    @staticmethod
    def hierarchical_load(loss_stats):
        """Load_H of Eq. 14, flattened: `Load_primary_i * Load_i_j / |X^(i)|`."""
        # A group that received no token has Load_i = 0.
        load = loss_stats["primary_load"][:, None] * tf.math.divide_no_nan(
            loss_stats["secondary_load"], loss_stats["primary_counts"][:, None]
        )
        return tf.reshape(load, [-1])

    def balancing_loss(self, loss_stats):
        """`w_importance CV(Importance_H)^2 + w_load CV(Load_H)^2` from batch sums."""
        aux = self.importance_weight * losses.cv_squared(loss_stats["importance"])
        return aux + self.load_weight * losses.cv_squared(self.hierarchical_load(loss_stats))

    def get_config(self):
        config = {
            "num_groups": self.num_groups,
            "experts_per_group": self.experts_per_group,
            "k_primary": self.k_primary,
            "k_secondary": self.k_secondary,
            "gating": self.gating,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "noise_epsilon": self.noise_epsilon,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalMoE(SparseMoEBase):
    """Hierarchical Mixture-of-Experts (Shazeer et al. 2017, App. B).

    `y = sum_i sum_j G_primary(x)_i G_i(x)_j E_ij(x)` (Eq. 12) over
    `num_groups * experts_per_group` experts; `k_primary` groups and
    `k_secondary` experts per group are chosen, so each position runs
    `k_primary * k_secondary` experts. The balancing losses use Eq. 13-14
    (see `HierarchicalGating`). Everything else (sparse dispatch, capacity,
    masking, metrics, routing output) is as in `keras_moe.MoE`; metrics of
    the first level are logged as `<layer name>_primary_<statistic>`.

    Args:
        num_groups: int >= 1, `a` in the paper.
        experts_per_group: int >= 1, `b` in the paper.
        expert_hidden_dim: int >= 1.
        k_primary: int, groups per position.
        k_secondary: int, experts per chosen group.
        output_dim: int or None.
        gating: `"noisy_top_k"` or `"top_k"`.
        importance_weight, load_weight, noise_epsilon, capacity_factor,
        expert_activation, use_bias, seed, balancing_scope,
        expert_hidden_layers, expert_parallel, expert_dropout: as for `MoE` (expert
            parallelism splits the `num_groups * experts_per_group` experts
            evenly over the replicas).
        pool_size, pool_size_range, pool_by: document pools as for `MoE`,
            but made of groups: `k_primary <= pool_size <= num_groups`, and
            a document's pool is its top `pool_size` groups by mean primary
            gate probability (`Softmax(x W_g_primary)`), with all their
            experts. The first level is restricted to the pool and the
            second level is unchanged, so no token leaves its pool. Groups
            rather than leaf experts: a leaf pool would need every group's
            secondary logits for every token (what the hierarchy avoids),
            and could leave a chosen group with fewer than `k_secondary`
            pool experts. `routing.pools` lists the pools' experts.
        **kwargs: base `Layer` arguments, and `recompute_hidden` as for `MoE`.

    Call arguments:
        As for `MoE`.

    Returns:
        As for `MoE`; `routing.expert_indices` holds flat expert ids
        `group * experts_per_group + j`, and `routing.primary_importance`
        / `routing.primary_load` the first level's statistics.

    Example:

    >>> layer = HierarchicalMoE(num_groups=4, experts_per_group=4, expert_hidden_dim=8)
    >>> layer(tf.random.normal([2, 3, 6])).shape
    TensorShape([2, 3, 6])
    """

    def __init__(
        self,
        num_groups,
        experts_per_group,
        expert_hidden_dim,
        k_primary=2,
        k_secondary=2,
        output_dim=None,
        gating="noisy_top_k",
        importance_weight=0.1,
        load_weight=0.1,
        noise_epsilon=1e-2,
        capacity_factor=None,
        expert_activation="relu",
        use_bias=True,
        seed=None,
        balancing_scope="global",
        expert_hidden_layers=1,
        expert_parallel=False,
        expert_dropout=0.0,
        pool_size=None,
        pool_size_range=None,
        pool_by="row",
        **kwargs,
    ):
        validate_hierarchical(
            num_groups, experts_per_group, k_primary, k_secondary, gating, importance_weight,
            load_weight, noise_epsilon,
        )
        super().__init__(
            num_experts=num_groups * experts_per_group, expert_hidden_dim=expert_hidden_dim,
            output_dim=output_dim, gating=gating, importance_weight=importance_weight,
            load_weight=load_weight, noise_epsilon=noise_epsilon,
            capacity_factor=capacity_factor, expert_activation=expert_activation,
            use_bias=use_bias, seed=seed, balancing_scope=balancing_scope,
            expert_hidden_layers=expert_hidden_layers, expert_parallel=expert_parallel,
            expert_dropout=expert_dropout, **kwargs,
        )
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.k_primary = k_primary
        self.k_secondary = k_secondary
        self.k = k_primary * k_secondary
        self.primary_routing_metrics = make_routing_metrics(f"{self.name}_primary")[:4]
        self.gating = HierarchicalGating(
            num_groups, experts_per_group, k_primary, k_secondary, gating,
            importance_weight, load_weight, noise_epsilon, seed=seed, name="gating",
        )
        self._init_routing_options(
            pool_size, pool_size_range, pool_by, num_groups, k_primary, experts_per_group,
            names=("num_groups", "k_primary"),
        )

    def get_config(self):
        config = {
            "num_groups": self.num_groups,
            "experts_per_group": self.experts_per_group,
            "k_primary": self.k_primary,
            "k_secondary": self.k_secondary,
        }
        return {**super().get_config(), **config}
