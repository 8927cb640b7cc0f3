"""Single-level gating networks: noisy top-k (Shazeer et al. 2017, Eq. 3-5), switch, softmax.

Every gate is a layer that maps `[N, d]` tokens to a `GateDecision` and
recomputes its balancing loss from batch sums (`balancing_loss`), which is
what `SparseMoEBase` needs of a gate. `top_k_routing` tells the dispatcher
whether a token's choices are ranked (laid out `[N, k]`, best first), so
that first choices can be served before second ones.
"""

import keras
import tensorflow as tf

from keras_moe import losses
from keras_moe.routing import GateDecision
from keras_moe.validation import check_int

GATING_TYPES = ("noisy_top_k", "top_k", "switch", "softmax", "batchwise")
# Logits masked out by a `logits_mask` (document pools, `keras_moe.pools`).
# Finite, so that `clean - threshold` in the smooth load estimator stays
# finite: its normal cdf is then exactly 0, where `-inf - -inf` gives NaN.
MASKED_LOGIT = -1e9


def mask_logits(logits, logits_mask):
    """`logits` with the entries where `logits_mask` (bool `[N, E]`) is False set to `MASKED_LOGIT`."""
    if logits_mask is None:
        return logits
    return tf.where(logits_mask, logits, tf.cast(MASKED_LOGIT, logits.dtype))


def validate_common(num_experts, k, importance_weight, load_weight, noise_epsilon):
    """Shared argument checks of the gating and MoE layers."""
    check_int("num_experts", num_experts)
    check_int("k", k)
    if k > num_experts:
        raise ValueError(
            f"`k` must be <= num_experts={num_experts}. Received: k={k}"
        )
    for name, value in (
        ("importance_weight", importance_weight),
        ("load_weight", load_weight),
        ("noise_epsilon", noise_epsilon),
    ):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(
                f"`{name}` must be a non-negative number. Received: {name}={value}"
            )


def top_k_gates(clean_logits, noise_std, noise, k, logits_mask=None):
    """Select k experts per row and weight them (Eq. 3-5, 8-9).

    Args:
        clean_logits: float32 `[N, E]`, `x W_g`.
        noise_std: float32 `[N, E]` or None (no noise).
        noise: float32 `[N, E]` standard normal sample, or None.
        k: int.
        logits_mask: optional bool `[N, E]` with at least k True per row:
            experts where it is False are never chosen (their clean and
            noisy logits become `MASKED_LOGIT`, so their load is 0).

    Returns:
        `(top_indices [N, k] int32, top_gates [N, k], load_prob [N, E] or
        None)`. `top_gates` is the softmax over the k kept logits (softmax
        after top-k, so each row sums to 1). `load_prob` is the smooth load
        estimator's per-token probability when noise is used and `k < E`.
    """
    num_experts = clean_logits.shape[-1]
    if noise_std is not None:
        logits = clean_logits + noise * noise_std
    else:
        logits = clean_logits
    logits = mask_logits(logits, logits_mask)
    clean_logits = mask_logits(clean_logits, logits_mask)
    top_values, top_indices = tf.math.top_k(logits, k)
    top_gates = tf.nn.softmax(top_values, axis=-1)
    load_prob = None
    if noise_std is not None and k < num_experts:
        load_prob = losses.smooth_load_probability(clean_logits, logits, noise_std, k)
    return tf.cast(top_indices, tf.int32), top_gates, load_prob


def decision_from_top_k(top_indices, top_gates, num_experts, weight, load_prob):
    """Flatten `[N, k]` choices into pairs and sum the batch statistics.

    Args:
        top_indices: int32 `[N, k]`.
        top_gates: float32 `[N, k]`.
        num_experts: int.
        weight: float32 `[N]`, 1 for tokens that count, 0 for masked ones.
        load_prob: float32 `[N, E]` or None (then load = counts).

    Returns:
        dict with `token_index`, `expert_index`, `gate`, `importance`,
        `load`, `counts`.
    """
    k = top_indices.shape[-1]
    n = tf.shape(top_indices)[0]
    token_index = tf.range(n * k, dtype=tf.int32) // k
    expert_index = tf.reshape(top_indices, [-1])
    gate = tf.reshape(top_gates, [-1])
    pair_weight = tf.gather(weight, token_index)
    importance = losses.importance(expert_index, gate * pair_weight, num_experts)
    counts = losses.counts(expert_index, num_experts, pair_weight)
    if load_prob is None:
        load = counts
    else:
        load = tf.reduce_sum(load_prob * weight[:, None], axis=0)
    return dict(
        token_index=token_index,
        expert_index=expert_index,
        gate=gate,
        importance=importance,
        load=load,
        counts=counts,
    )



def _check_weight(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative number. Received: {name}={value}")


class _LinearGating(keras.layers.Layer):
    """A gate on the logits `x W_g` with `W_g` starting at zero (App. A).

    Holds what the single-level gates share: the arguments, `W_g`, the float32
    cast of the tokens and of their weights.
    """

    top_k_routing = True
    noisy = False

    def __init__(self, num_experts, k, importance_weight, load_weight, seed, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        validate_common(num_experts, k, importance_weight, load_weight, 0.0)
        self.num_experts = num_experts
        self.k = k
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.seed = seed

    def build(self, input_shape):
        d = input_shape[-1]
        self.w_gate = self.add_weight(
            name="w_gate", shape=(d, self.num_experts), initializer="zeros"
        )

    def _logits(self, inputs, weight):
        x = tf.cast(inputs, tf.float32)
        if weight is None:
            weight = tf.ones(tf.shape(x)[:1], tf.float32)
        weight = tf.cast(weight, tf.float32)
        return x, tf.matmul(x, tf.cast(self.w_gate, tf.float32)), weight

    def clean_logits(self, inputs):
        """The noise-free logits `x W_g`, float32 `[N, E]` (what document pools rank by)."""
        return self._logits(inputs, None)[1]

    def balancing_loss(self, loss_stats):
        """`w_importance CV(Importance)^2 + w_load CV(Load)^2` (Eq. 7, 11) from batch sums."""
        aux = self.importance_weight * losses.cv_squared(loss_stats["importance"])
        return aux + self.load_weight * losses.cv_squared(loss_stats["load"])

    def _decision(self, top_indices, top_gates, clean_logits, weight, noise_std=None,
                  load_prob=None, loss_stats=None):
        """The `GateDecision` of chosen experts and gates, its statistics and loss.

        `loss_stats` defaults to Importance and Load, the terms of
        `balancing_loss` above; a gate with another loss passes its own.
        """
        stats = decision_from_top_k(top_indices, top_gates, self.num_experts, weight, load_prob)
        if loss_stats is None:
            loss_stats = {"importance": stats["importance"], "load": stats["load"]}
        else:
            loss_stats = loss_stats(stats)
        return GateDecision(
            top_indices=top_indices,
            top_gates=top_gates,
            aux_loss=self.balancing_loss(loss_stats),
            clean_logits=clean_logits,
            noise_std=noise_std,
            loss_stats=loss_stats,
            local_loss=tf.zeros([], tf.float32),
            **stats,
        )

    def get_config(self):
        config = {
            "num_experts": self.num_experts,
            "k": self.k,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}


class _WithoutNoiseWeights(_LinearGating):
    def load_own_variables(self, store):
        # `.keras` files saved before this gate had its own class hold the
        # unused `W_noise` of `NoisyTopKGating` as a second variable.
        if len(store.keys()) == 2:
            store = {"0": store["0"]}
        super().load_own_variables(store)


@keras.saving.register_keras_serializable(package="keras_moe")
class NoisyTopKGating(_LinearGating):
    """Noisy top-k gating network of the sparsely-gated MoE layer.

    Implements `G(x) = Softmax(KeepTopK(H(x), k))` with
    `H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)`
    (Shazeer et al. 2017, Eq. 3-5; the noise std also gets `noise_epsilon`
    added so it never reaches 0). The softmax is taken after the top-k, so
    the k kept gates of a token sum to 1. Noise is added only in training.
    `W_g` and `W_noise` start at zero (App. A), so the first training steps
    route by noise alone.

    The layer also sums what the balancing losses need (Section 4):
    `Importance(X) = sum_x G(x)` (Eq. 6) and the smooth load estimator
    `Load(X)_i = sum_x P(x, i)` (Eq. 8-10), and returns
    `w_importance * CV(Importance)^2 + w_load * CV(Load)^2` as `aux_loss`.
    Without noise (inference, or `gating="top_k"`) Load is the count of
    tokens per expert, which has no gradient; nothing divides by zero.

    Routing is always computed in float32, whatever the dtype policy of the
    enclosing layer. For the switch and dense softmax rules see
    `SwitchGating` and `SoftmaxGating`.

    Args:
        num_experts: int, number of experts `E`.
        k: int, experts per token, `1 <= k <= E`.
        gating: `"noisy_top_k"`, or `"top_k"` (the same without noise).
        importance_weight: float >= 0, `w_importance`.
        load_weight: float >= 0, `w_load`.
        noise_epsilon: float >= 0, added to the noise std.
        seed: optional int seed of the gating noise.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[N, d]` tokens (cast to float32).
        training: bool, whether noise is applied.
        weight: optional float `[N]`; 0 excludes a token from the statistics.
        logits_mask: optional bool `[N, E]`; experts where it is False are
            never chosen (document pools, see `keras_moe.pools`).
        k: optional int, experts per token instead of the layer's `k`
            (inference-time k).

    Returns:
        A `keras_moe.routing.GateDecision`.

    Example:

    >>> gating = NoisyTopKGating(num_experts=4, k=2)
    >>> d = gating(tf.ones([3, 8]), training=True)
    >>> d.top_gates.shape
    TensorShape([3, 2])
    """

    def __init__(
        self,
        num_experts,
        k=4,
        gating="noisy_top_k",
        importance_weight=0.1,
        load_weight=0.1,
        noise_epsilon=1e-2,
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, k, importance_weight, load_weight, seed, **kwargs)
        _check_weight("noise_epsilon", noise_epsilon)
        if gating not in ("noisy_top_k", "top_k"):
            hint = {"switch": " (use SwitchGating)", "softmax": " (use SoftmaxGating)"}
            raise ValueError(
                "`gating` of NoisyTopKGating must be 'noisy_top_k' or 'top_k'"
                f"{hint.get(gating, '')}. Received: gating={gating!r}"
            )
        self.gating = gating
        self.noise_epsilon = float(noise_epsilon)
        self.noisy = gating == "noisy_top_k"
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def from_config(cls, config):
        # A gate saved with `gating="switch"` or `"softmax"` before those
        # rules had classes of their own.
        rule = {"switch": SwitchGating, "softmax": SoftmaxGating}.get(config.get("gating"))
        if rule is not None:
            config = {
                key: value for key, value in config.items()
                if key not in ("gating", "noise_epsilon")
            }
            return rule.from_config(config)
        return super().from_config(config)

    def build(self, input_shape):
        super().build(input_shape)
        self.w_noise = self.add_weight(
            name="w_noise", shape=(input_shape[-1], self.num_experts), initializer="zeros"
        )

    def call(self, inputs, training=False, weight=None, logits_mask=None, k=None):
        x, clean_logits, weight = self._logits(inputs, weight)
        noise_std = noise = None
        if self.noisy and training:
            w_noise = tf.cast(self.w_noise, tf.float32)
            noise_std = tf.nn.softplus(tf.matmul(x, w_noise)) + self.noise_epsilon
            noise = keras.random.normal(
                tf.shape(clean_logits), seed=self.seed_generator, dtype="float32"
            )
        top_indices, top_gates, load_prob = top_k_gates(
            clean_logits, noise_std, noise, k or self.k, logits_mask
        )
        return self._decision(top_indices, top_gates, clean_logits, weight, noise_std, load_prob)

    def get_config(self):
        config = {"gating": self.gating, "noise_epsilon": self.noise_epsilon}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="keras_moe")
class SwitchGating(_WithoutNoiseWeights):
    """Top-1 routing of Switch Transformers (Fedus et al. 2021), `gating="switch"`.

    Each token goes to the expert of largest router probability
    `p(x) = Softmax(x W_g)`, with that probability as its gate (not 1), in
    training and inference alike (no noise). The auxiliary loss is
    `w_importance CV(Importance)^2 + w_load E sum_i f_i P_i`, `f_i` the
    share of tokens sent to expert `i` and `P_i` its mean router
    probability (Fedus et al. 2021, Eq. 4-6).

    Args:
        num_experts: int, number of experts `E`.
        k: must be 1 (kept as an argument so that a wrong `k` is named).
        importance_weight: float >= 0, `w_importance`.
        load_weight: float >= 0, `w_load`.
        seed: optional int (the gate is deterministic; kept for symmetry).
        **kwargs: base `Layer` arguments.

    Call arguments, returns: as for `NoisyTopKGating` (no `k`; with a
    `logits_mask` the router softmax is taken over the unmasked experts).

    Example:

    >>> gating = SwitchGating(num_experts=4)
    >>> d = gating(tf.ones([3, 8]))
    >>> d.top_indices.shape, float(d.top_gates[0, 0])
    (TensorShape([3, 1]), 0.25)
    """

    def __init__(self, num_experts, k=1, importance_weight=0.1, load_weight=0.1, seed=None,
                 **kwargs):
        super().__init__(num_experts, k, importance_weight, load_weight, seed, **kwargs)
        if k != 1:
            raise ValueError(
                "gating='switch' sends each token to exactly one expert; pass k=1. "
                f"Received: k={k}"
            )

    def call(self, inputs, training=False, weight=None, logits_mask=None):
        _, clean_logits, weight = self._logits(inputs, weight)
        probs = tf.nn.softmax(mask_logits(clean_logits, logits_mask), axis=-1)
        top_gates, top_indices = tf.math.top_k(probs, 1)
        top_indices = tf.cast(top_indices, tf.int32)
        return self._decision(
            top_indices, top_gates, clean_logits, weight,
            loss_stats=lambda stats: {
                "importance": stats["importance"],
                "counts": stats["counts"],
                "router_prob_sum": tf.reduce_sum(probs * weight[:, None], axis=0),
                "tokens": tf.reduce_sum(weight),
            },
        )

    def balancing_loss(self, loss_stats):
        """`w_importance CV(Importance)^2 + w_load E sum_i f_i P_i` from batch sums.

        `f_i = counts_i / tokens` and `P_i = router_prob_sum_i / tokens`.
        """
        aux = self.importance_weight * losses.cv_squared(loss_stats["importance"])
        return aux + self.load_weight * losses.switch_loss_from_sums(
            loss_stats["counts"], loss_stats["router_prob_sum"], loss_stats["tokens"]
        )


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftmaxGating(_WithoutNoiseWeights):
    """A dense mixture of all experts (Jacobs et al. 1991), `gating="softmax"`.

    `G(x) = Softmax(x W_g)` over every expert, in training and inference
    (no noise); `top_indices` / `top_gates` list the experts by decreasing
    gate. The auxiliary loss is `w_importance CV(Importance)^2 + w_load
    CV(Load)^2` with Load the token counts (every expert gets every token).

    Args:
        num_experts: int, number of experts `E`.
        k: None or `num_experts` (a dense mixture uses every expert).
        importance_weight, load_weight, seed: as for `SwitchGating`.
        **kwargs: base `Layer` arguments.

    Call arguments, returns: as for `NoisyTopKGating`.

    Example:

    >>> gating = SoftmaxGating(num_experts=4)
    >>> gating(tf.ones([3, 8])).top_gates.numpy()[0].tolist()
    [0.25, 0.25, 0.25, 0.25]
    """

    def __init__(self, num_experts, k=None, importance_weight=0.1, load_weight=0.1, seed=None,
                 **kwargs):
        k = num_experts if k is None else k
        super().__init__(num_experts, k, importance_weight, load_weight, seed, **kwargs)
        if k != num_experts:
            raise ValueError(
                "gating='softmax' mixes all experts; pass k=num_experts="
                f"{num_experts}. Received: k={k}"
            )

    def call(self, inputs, training=False, weight=None, logits_mask=None, k=None):
        _, clean_logits, weight = self._logits(inputs, weight)
        # The top-k of all E logits sorts them; its softmax is the full softmax.
        top_indices, top_gates, _ = top_k_gates(
            clean_logits, None, None, k or self.k, logits_mask
        )
        return self._decision(top_indices, top_gates, clean_logits, weight)
