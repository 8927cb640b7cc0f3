"""What a gate decided, as plain tensors, and the metrics derived from it.

`GateDecision` is the internal contract between a gating layer and the
dispatcher: a flat list of (token, expert, gate) pairs plus the sums the
balancing losses need. `Routing` is what an MoE layer reports of one call,
reshaped to the input's leading dimensions: it is the one way routing is
observed. `MoE(..., return_routing=True)` returns it, the layer's Keras
metrics are computed from it (`update_routing_metrics`), and routing
observers (`SparseMoEBase.add_routing_observer`, used by
`keras_moe.RoutingMonitor` and the routing inspector) receive it.
"""

from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from keras_moe.statistics import STATISTIC_NAMES, batch_statistics


class GateDecision(NamedTuple):
    """A gate's decision over `N` flattened tokens (internal).

    Attributes:
        token_index: int32 `[P]`, token of each routed pair.
        expert_index: int32 `[P]`, expert of each pair.
        gate: float32 `[P]`, the pair's gate value.
        top_indices: int32 `[N, k]`, the k experts of each token (for
            reporting; `-1` where a token has fewer than k).
        top_gates: float32 `[N, k]`.
        importance: float32 `[E]`, Eq. 6 (sum of gates).
        load: float32 `[E]`, Eq. 10 in noisy training, counts otherwise.
        counts: float32 `[E]`, tokens actually sent to each expert.
        aux_loss: float32 scalar, the weighted balancing losses.
        clean_logits: float32 `[N, E]` or None (hierarchical: primary level).
        noise_std: float32 `[N, E]` or None when no noise was used.
        primary: a `GateDecision` of the first level (hierarchical) or None.
        loss_stats: dict of float32 tensors that are *sums over tokens*, from
            which the gate's `balancing_loss` recomputes `aux_loss`; summed
            across replicas first, they give the loss of the global batch.
        local_loss: float32 scalar part of `aux_loss` that is a per-token
            mean rather than a function of sums (batchwise threshold loss).
    """

    token_index: tf.Tensor
    expert_index: tf.Tensor
    gate: tf.Tensor
    top_indices: tf.Tensor
    top_gates: tf.Tensor
    importance: tf.Tensor
    load: tf.Tensor
    counts: tf.Tensor
    aux_loss: tf.Tensor
    clean_logits: tf.Tensor | None = None
    noise_std: tf.Tensor | None = None
    primary: Optional["GateDecision"] = None
    loss_stats: dict | None = None
    local_loss: tf.Tensor | None = None


class Routing(NamedTuple):
    """Routing returned by `MoE(x, return_routing=True)`.

    Attributes:
        expert_indices: int32 `[..., k]`, the experts each position was sent
            to (`-1` for masked positions).
        gates: float32 `[..., k]`; each row of a non-masked position sums to 1
            (softmax after top-k, Eq. 3); zeros for masked positions.
        importance: float32 `[num_experts]`, Eq. 6 over non-masked positions.
        load: float32 `[num_experts]`, Eq. 10 (smooth estimator) in training
            with noise, token counts otherwise.
        counts: float32 `[num_experts]`, tokens actually routed to each expert.
        dropped_fraction: float32 scalar, share of (token, expert) pairs
            dropped by the capacity limit (0 when dropless).
        aux_loss: float32 scalar, the balancing loss of this call.
        clean_logits: float32 `[..., E]` (primary level for hierarchical), or
            None.
        noise_std: float32 `[..., E]` or None when no noise was applied.
        primary_importance: float32 `[num_groups]` or None (hierarchical).
        primary_load: float32 `[num_groups]` or None (hierarchical).
        exchanged_elements: int32 scalar or None: expert parallel only, the
            number of elements this replica put into the dispatch's
            collectives in the forward pass (see
            `keras_moe.expert_parallel.expert_parallel_dispatch`).
        primary_counts: float32 `[num_groups]` or None (hierarchical):
            tokens the first level sent to each group.
        pools: int32 `[documents, P]` or None (no pools): the experts of each
            document's pool (`keras_moe.pools`), by decreasing mean gate
            probability (a group's experts together, for hierarchical).
        document_index: int32 `[...]` or None: each position's row of
            `pools` (`-1` for masked positions).

    The per-expert vectors are sums over the call's non-masked positions;
    `keras_moe.statistics` turns them into balance statistics.
    """

    expert_indices: tf.Tensor
    gates: tf.Tensor
    importance: tf.Tensor
    load: tf.Tensor
    counts: tf.Tensor
    dropped_fraction: tf.Tensor
    aux_loss: tf.Tensor
    clean_logits: tf.Tensor | None = None
    noise_std: tf.Tensor | None = None
    primary_importance: tf.Tensor | None = None
    primary_load: tf.Tensor | None = None
    exchanged_elements: tf.Tensor | None = None
    primary_counts: tf.Tensor | None = None
    pools: tf.Tensor | None = None
    document_index: tf.Tensor | None = None


def make_routing_metrics(prefix):
    """One Keras `Mean` metric per routing statistic, named `<prefix>_<stat>`.

    A layer that keeps this list as an attribute has its metrics collected
    by `Model.metrics`, so they appear in `fit` and `evaluate` logs,
    averaged over the batches of the epoch.
    """
    return [keras.metrics.Mean(name=f"{prefix}_{name}") for name in STATISTIC_NAMES]


def update_routing_metrics(metrics, importance, counts, dropped_fraction):
    """Add one call's statistics (`keras_moe.statistics.batch_statistics`) to `metrics`."""
    values = batch_statistics(importance, counts, dropped_fraction)
    for name, metric in zip(STATISTIC_NAMES, metrics, strict=False):
        metric.update_state(values[name])


def scatter_rows(rows, index, num_rows, fill):
    """Put `rows[i]` at row `index[i]` of a `[num_rows, ...]` tensor of `fill`."""
    shape = tf.concat([[num_rows], tf.shape(rows)[1:]], axis=0)
    base = tf.fill(shape, tf.cast(fill, rows.dtype))
    return tf.tensor_scatter_nd_update(base, index[:, None], rows)


def make_routing(decision, aux_loss, dropped, exchanged, lead_shape, kept=None, weight=None,
                 num_positions=None):
    """The `Routing` of one call from its flat `GateDecision`.

    Args:
        decision: the gate's `GateDecision` over the routed rows.
        aux_loss, dropped, exchanged: the call's loss, dropped share and
            expert-parallel traffic (or None).
        lead_shape: int32 `[rank - 1]`, the input's leading dimensions.
        kept: int32 `[n]` or None: the positions the rows came from (masked
            positions were not routed); they are scattered back among
            `num_positions`, the others get expert `-1`, gate 0.
        weight: float32 `[N]` or None: 0 for masked positions that were
            routed (capacity mode); they are reported as `-1` / 0 too.
    """
    indices, gates = decision.top_indices, decision.top_gates
    logits, noise_std = decision.clean_logits, decision.noise_std
    if kept is not None:
        indices = scatter_rows(indices, kept, num_positions, -1)
        gates = scatter_rows(gates, kept, num_positions, 0.0)
        logits = scatter_rows(logits, kept, num_positions, 0.0)
        if noise_std is not None:
            noise_std = scatter_rows(noise_std, kept, num_positions, 0.0)
    elif weight is not None:
        valid = weight[:, None] > 0
        indices = tf.where(valid, indices, -1)
        gates = tf.where(valid, gates, 0.0)

    def unflatten(t):
        if t is None:
            return None
        return tf.reshape(t, tf.concat([lead_shape, tf.shape(t)[1:]], axis=0))

    primary = decision.primary
    return Routing(
        expert_indices=unflatten(indices),
        gates=unflatten(gates),
        importance=decision.importance,
        load=decision.load,
        counts=decision.counts,
        dropped_fraction=dropped,
        aux_loss=aux_loss,
        clean_logits=unflatten(logits),
        noise_std=unflatten(noise_std),
        primary_importance=None if primary is None else primary.importance,
        primary_load=None if primary is None else primary.load,
        exchanged_elements=exchanged,
        primary_counts=None if primary is None else primary.counts,
    )
