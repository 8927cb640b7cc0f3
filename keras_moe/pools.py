"""Document-level expert pools (after AllenAI's EMO) and inference-time k.

**Pools.** All tokens of one document choose their experts from a shared
pool of `P` experts; different documents may use different pools. The
pool of document `D` is the top `P` experts by the document's mean gate
probability

    pbar_D = (1 / |D|) sum_{x in D, x not masked} Softmax(x W_g)

(the softmax over all experts of the *clean* logits `x W_g`: without the
noise for `gating="noisy_top_k"`, as for `"top_k"`; the router
probabilities for `"switch"`, whose router softmax is then taken over the
pool; `"softmax"` mixes all experts, so only `P = E` is possible there;
`"batchwise"` has no pools. For `HierarchicalMoE`, the primary gate's
clean logits: pools are made of groups, see there). Each token then
applies its layer's usual gating with the logits outside its document's
pool set to `keras_moe.gating.MASKED_LOGIT` before the top-k and the
softmax, so

    G(x) = Softmax(KeepTopK(H(x) + M_pool(x), k)),  M_pool(x)_i = 0 if i in
    pool(x) else -inf,

and no token ever reaches an expert outside its pool (`k <= P`). With
`P = num_experts` every mask entry is 0 and the layer is the plain layer,
noise draws included. The balancing losses (Importance and Load, Eq. 6-10)
are taken as before over all the tokens of the batch, across documents;
the smooth load estimator of an expert outside a token's pool is 0.

The pool choice (a top-P) is piecewise constant: no gradient flows
through it (the probabilities are computed under `stop_gradient`). The
gradient reaches `W_g` through each token's softmax over its kept,
in-pool logits, exactly as in the plain layer.

`pool_by="row"` makes each batch row (the first axis of the inputs) one
document; `pool_by="document_ids"` takes the document of each position from
the call argument `document_ids` (int, the inputs' shape without the
feature axis; any values, equal values are one document, also across
rows). Masked positions count in no document's mean. In training
`pool_size_range=(low, high)` draws `P` uniformly from `[low, high]` once
per call (seeded by the layer's `seed`); inference uses `pool_size`.

**Inference-time k.** `keras_moe.set_inference_k(model_or_layer, k)`
(keras_moe/inference_k.py) makes the MoE
layers of a model trained with `k` route `k'` experts per position in
calls with `training=False` (evaluate, predict, decoding): the top `k'`
logits and the softmax over those `k'` (Eq. 3), so `k' = k` is the trained
model. Training calls keep the trained `k`.

Example:

>>> import keras_moe
>>> layer = keras_moe.MoE(num_experts=8, expert_hidden_dim=16, k=2, pool_size=4,
...                       pool_by="document_ids")
>>> x = tf.random.normal([2, 6, 12])
>>> documents = [[0, 0, 0, 1, 1, 1], [1, 1, 2, 2, 2, 2]]
>>> y, routing = layer(x, document_ids=documents, return_routing=True)
>>> routing.pools.shape  # 3 documents, 4 experts each
TensorShape([3, 4])
>>> routing.document_index.numpy().tolist()
[[0, 0, 0, 1, 1, 1], [1, 1, 2, 2, 2, 2]]
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from keras_moe.validation import check_int

POOL_BY = ("row", "document_ids")
# Gating rules with a top-k over logits, where a mask and another k apply.
POOLED_GATINGS = ("noisy_top_k", "top_k", "switch", "softmax")
INFERENCE_K_GATINGS = ("noisy_top_k", "top_k", "softmax")


class Tokens(NamedTuple):
    """The positions of one call, flattened to rows (internal).

    `rows` are the rows the gate sees: every position, or (dropless with a
    mask) only the non-masked ones, whose places are `kept`. In capacity
    mode masked rows are routed but `weight` (1 / 0) keeps them out of the
    statistics and the experts' queues.
    """

    rows: tf.Tensor
    weight: tf.Tensor | None
    kept: tf.Tensor | None
    num_positions: tf.Tensor
    lead_shape: tf.Tensor


class Pools(NamedTuple):
    """The pools of one call (internal): units `[D, P]`, the pool mask of each row."""

    pools: tf.Tensor
    row_mask: tf.Tensor
    document_index: tf.Tensor  # [num_positions], -1 for masked positions


def validate_pool_options(pool_size, pool_size_range, pool_by, k, num_units, gating,
                          units="num_experts", k_name="k"):
    """Check the pool arguments: `1 <= k <= P <= num_units` for every `P` used.

    Returns `(pool_size, pool_size_range)` normalised (a tuple of two ints or None).
    """
    if pool_by not in POOL_BY:
        raise ValueError(
            f"`pool_by` must be one of {', '.join(map(repr, POOL_BY))}. Received: pool_by={pool_by!r}"
        )
    if pool_size is None:
        if pool_size_range is not None:
            raise ValueError(
                "`pool_size_range` needs `pool_size` (the pool size at inference). "
                f"Received: pool_size=None, pool_size_range={pool_size_range!r}"
            )
        return None, None
    if gating not in POOLED_GATINGS:
        raise ValueError(
            f"`pool_size` needs a gating of {', '.join(map(repr, POOLED_GATINGS))}. "
            f"Received: gating={gating!r}, pool_size={pool_size!r}"
        )
    check_int("pool_size", pool_size)
    if not k <= pool_size <= num_units:
        raise ValueError(
            f"`pool_size` must be in [{k_name}={k}, {units}={num_units}]. "
            f"Received: pool_size={pool_size}"
        )
    if pool_size_range is None:
        return pool_size, None
    ok = (isinstance(pool_size_range, (list, tuple)) and len(pool_size_range) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in pool_size_range))
    if not ok or not k <= pool_size_range[0] <= pool_size_range[1] <= num_units:
        raise ValueError(
            f"`pool_size_range` must be two integers (low, high) with {k_name}={k} <= low "
            f"<= high <= {units}={num_units}. Received: pool_size_range={pool_size_range!r}"
        )
    return pool_size, tuple(pool_size_range)


def document_pools(logits, document_index, weight, num_documents, pool_size):
    """Each document's pool: its top `pool_size` units by mean softmax probability.

    Args:
        logits: float32 `[N, U]` clean logits of the rows (no gradient is taken).
        document_index: int32 `[N]`, each row's document in `[0, num_documents)`.
        weight: float32 `[N]`, 0 for masked rows (they count in no mean).
        num_documents: int32 scalar.
        pool_size: int or int32 scalar `P`.

    Returns:
        `(pools [D, P] int32, by decreasing mean probability (ties: lower
        unit first), membership bool [D, U])`.
    """
    probs = tf.nn.softmax(tf.stop_gradient(tf.cast(logits, tf.float32)), axis=-1)
    sums = tf.math.unsorted_segment_sum(probs * weight[:, None], document_index, num_documents)
    sizes = tf.math.unsorted_segment_sum(weight, document_index, num_documents)
    mean = tf.math.divide_no_nan(sums, sizes[:, None])
    _, pools = tf.math.top_k(mean, pool_size)
    pools = tf.cast(pools, tf.int32)
    num_units = logits.shape[-1]
    membership = tf.reduce_any(tf.one_hot(pools, num_units, on_value=True, off_value=False,
                                          dtype=tf.bool), axis=1)
    return pools, membership


class RoutingOptions:
    """Document pools and inference-time k for `SparseMoEBase` (mixin, internal).

    A layer made of units (experts for `MoE`, groups for `HierarchicalMoE`)
    sets, through `_init_routing_options`, what its pools are made of;
    `_gate_options` gives the gate call's extra arguments (`logits_mask`,
    `k`) and `_with_pools` adds the pools to the call's `Routing`.
    """

    def _init_routing_options(self, pool_size, pool_size_range, pool_by, num_units, k_units,
                              experts_per_unit=None, names=("num_experts", "k")):
        """Validate and keep the pool arguments (called by the subclass's `__init__`).

        `experts_per_unit`: None for a flat layer (units are experts), the
        experts per group for a two-level one (units are groups); `names`
        are the units' and their k's argument names, for errors.
        """
        pool_size, pool_size_range = validate_pool_options(
            pool_size, pool_size_range, pool_by, k_units, num_units, self.gating_type, *names
        )
        self.pool_size, self.pool_size_range, self.pool_by = pool_size, pool_size_range, pool_by
        self._pool_units = (num_units, k_units, experts_per_unit)
        self._inference_k = None
        if pool_size is not None and (pool_by == "document_ids" or pool_size_range is not None):
            # `tf.unique` and a drawn top-P have data-dependent shapes (no XLA).
            self.supports_jit = False
        if pool_size_range is not None:
            seed = None if self.seed is None else self.seed + 13
            self.pool_seed_generator = keras.random.SeedGenerator(seed)

    def routing_options_config(self):
        return {"pool_size": self.pool_size, "pool_by": self.pool_by,
                "pool_size_range": self.pool_size_range}

    # --- inference-time k ------------------------------------------------

    @property
    def inference_k(self):
        """Experts per position in calls with `training=False` (None: the trained `k`)."""
        return self._inference_k

    @inference_k.setter
    def inference_k(self, k):
        self.inference_k_arguments(k)  # validates
        self._inference_k = k

    def inference_k_arguments(self, k):
        """The gate's call arguments that route `k` experts per position.

        Raises `ValueError` naming `k` when the layer cannot route it (see
        `keras_moe.set_inference_k`); `k=None` gives `{}` (the trained k).
        """
        if k is None:
            return {}
        check_int("k", k)
        if self.gating_type not in INFERENCE_K_GATINGS:
            raise ValueError(
                f"An inference-time k needs a gating of {', '.join(map(repr, INFERENCE_K_GATINGS))}"
                f"; layer {self.name!r} has gating={self.gating_type!r}. Received: k={k}"
            )
        num_units, _, per_unit = self._pool_units
        if per_unit is not None:  # two levels: k' = k_primary' * k_secondary
            if k % self.k_secondary or not k // self.k_secondary <= num_units:
                raise ValueError(
                    f"An inference-time k of layer {self.name!r} must be a multiple of "
                    f"k_secondary={self.k_secondary} of at most num_groups={num_units} groups. "
                    f"Received: k={k}"
                )
            k_units, args = k // self.k_secondary, {"k_primary": k // self.k_secondary}
        else:
            k_units, args = k, {"k": k}
        if self.pool_size is not None and k_units > self.pool_size:
            raise ValueError(
                f"An inference-time k of layer {self.name!r} must fit its pools "
                f"(pool_size={self.pool_size}). Received: k={k}"
            )
        if k_units > num_units:
            raise ValueError(
                f"An inference-time k of layer {self.name!r} must be <= "
                f"num_experts={num_units}. Received: k={k}"
            )
        return args

    # --- pools -------------------------------------------------------------

    def _gate_options(self, tokens, training, document_ids):
        """`(extra gate call arguments, Pools or None)` of one call."""
        options = {} if training else self.inference_k_arguments(self._inference_k)
        if self.pool_size is None:
            if document_ids is not None:
                raise ValueError(
                    f"`document_ids` needs pools; layer {self.name!r} has pool_size=None. "
                    "Received: document_ids of shape "
                    f"{tuple(getattr(document_ids, 'shape', ()))}"
                )
            return options, None
        pools = self._document_pools(tokens, training, document_ids)
        return {**options, "logits_mask": pools.row_mask}, pools

    def _document_index(self, tokens, document_ids):
        """`(document of each position [num_positions] int32, number of documents)`."""
        if self.pool_by == "row":
            if document_ids is not None:
                raise ValueError(
                    f"Layer {self.name!r} has pool_by='row' (one document per batch row); pass "
                    "pool_by='document_ids' to give documents. Received: document_ids of shape "
                    f"{tuple(getattr(document_ids, 'shape', ()))}"
                )
            rows = tokens.lead_shape[0]
            per_row = tokens.num_positions // tf.maximum(rows, 1)
            index = tf.range(tokens.num_positions) // tf.maximum(per_row, 1)
            return index, rows
        if document_ids is None:
            raise ValueError(
                f"Layer {self.name!r} has pool_by='document_ids': pass `document_ids` (int, the "
                "inputs' shape without the feature axis). Received: document_ids=None"
            )
        document_ids = tf.convert_to_tensor(document_ids)
        if not document_ids.dtype.is_integer:
            raise ValueError(
                f"`document_ids` must be integers. Received: dtype {document_ids.dtype.name}"
            )
        flat = tf.reshape(document_ids, [-1])
        static = tf.get_static_value(tokens.num_positions)
        if static is not None and flat.shape[0] is not None and flat.shape[0] != static:
            raise ValueError(
                "`document_ids` must have the inputs' shape without the feature axis "
                f"({static} positions). Received: document_ids of shape "
                f"{tuple(document_ids.shape)}"
            )
        values, index = tf.unique(tf.cast(flat, tf.int64), out_idx=tf.int32)
        return index, tf.shape(values)[0]

    def _document_pools(self, tokens, training, document_ids):
        positions, num_documents = self._document_index(tokens, document_ids)
        doc = positions if tokens.kept is None else tf.gather(positions, tokens.kept)
        weight = tokens.weight
        if weight is None:
            weight = tf.ones(tf.shape(doc), tf.float32)
        size = self.pool_size
        if training and self.pool_size_range is not None:
            low, high = self.pool_size_range
            size = keras.random.randint([], low, high + 1, seed=self.pool_seed_generator)
        logits = self.gating.clean_logits(tokens.rows)
        pools, membership = document_pools(logits, doc, weight, num_documents, size)
        # Reported per position, -1 where masked (as the routing's experts).
        valid = tf.ones(tf.shape(positions), tf.bool)
        if tokens.weight is not None:
            valid = tokens.weight > 0
        elif tokens.kept is not None:
            valid = tf.scatter_nd(tokens.kept[:, None], tf.ones(tf.shape(tokens.kept), tf.bool),
                                  tf.shape(positions))
        return Pools(pools, tf.gather(membership, doc), tf.where(valid, positions, -1))

    def _with_pools(self, routing, pools):
        """`routing` with `pools` (expert ids `[D, P]`) and `document_index` (`[...]`)."""
        if pools is None:
            return routing
        experts = pools.pools
        per_unit = self._pool_units[2]
        if per_unit is not None:  # a pool of groups holds all their experts
            experts = experts[:, :, None] * per_unit + tf.range(per_unit, dtype=tf.int32)
            experts = tf.reshape(experts, [tf.shape(experts)[0], -1])
        lead = routing.expert_indices.shape[:-1]
        index = tf.reshape(pools.document_index, tf.shape(routing.expert_indices)[:-1])
        index.set_shape(lead)
        return routing._replace(pools=experts, document_index=index)
