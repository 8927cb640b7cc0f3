"""Pruning by usage: record what each MoE layer saw, drop the experts it hardly used.

An expert that the gate sends almost no tokens to costs memory and buys
nothing. Its *usage share* is its routed (token, expert) pairs over all
routed pairs on sample data; with the counts `c_e` of `Routing.counts`
summed over the sample (`record_routing`),

    share_e = c_e / sum_e' c_e'

and pruning keeps the experts with `share_e >= threshold`, through
`keras_moe.surgery.subset_layer` / `subset_model`. The new gate has only
the kept columns, so a token's top-k is taken among the kept experts
(Shazeer et al. 2017, Eq. 3-5 with `E` the kept experts); a token that
went only to kept experts is routed exactly as before.

- `record_routing(model, run)`: each MoE layer's per-expert counts and
  input rows over eager calls of the model, what pruning and merging
  (`keras_moe.merging`) need;
- `prune_keep(counts, threshold)`: the experts kept;
- `prune_layer` / `prune_model`: the layer or model without the others.

Example:

>>> layer = MoE(num_experts=4, expert_hidden_dim=3, k=1)
>>> layer.build((None, 2))
>>> small, kept = prune_layer(layer, [10, 0, 5, 1], threshold=0.1)
>>> small.num_experts, kept
(2, [0, 2])
"""

import numpy as np
import tensorflow as tf

from keras_moe.moe import MoE, SparseMoEBase  # noqa: F401 (MoE: the example's)
from keras_moe.monitoring import find_moe_layers
from keras_moe.surgery import check_flat, moe_layers, subset_layer, subset_model

# --- usage shares and the experts kept ------------------------------------------


def usage_share(counts):
    """Each expert's share of the routed pairs, `counts / sum(counts)` (zeros if none)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def check_threshold(name, value, low=0.0, high=1.0):
    """ValueError naming `name` unless `value` is a number in `[low, high]`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"`{name}` must be a number in [{low}, {high}]. Received: {name}={value!r}")


def prune_keep(counts, threshold):
    """The experts whose usage share is at least `threshold`, in index order.

    Example:

    >>> prune_keep([10, 0, 5, 1], threshold=0.1)
    [0, 2]
    """
    check_threshold("threshold", threshold)
    share = usage_share(counts)
    return [int(e) for e in np.flatnonzero(share >= threshold)]


def prune_layer(layer, counts, threshold):
    """`subset_layer` of the experts with usage share `>= threshold` (`prune_keep`).

    Args:
        layer: a built `MoE`.
        counts: `[E]` routed pairs per expert on sample data (e.g. summed
            `Routing.counts` in inference mode: `record_routing`).
        threshold: float in [0, 1].

    Returns:
        `(new layer, kept indices)`.
    """
    check_flat(layer)
    counts = check_counts(counts, layer)
    keep = prune_keep(counts, threshold)
    if not keep:
        raise ValueError(f"`threshold`={threshold} removes every expert of layer {layer.name!r}")
    return subset_layer(layer, keep), keep


def check_counts(counts, layer):
    """`counts` as float64 `[E]`; ValueError naming the layer when it has another size."""
    counts = np.asarray(counts, np.float64).reshape(-1)
    if counts.shape != (layer.num_experts,):
        raise ValueError(
            f"counts of layer {layer.name!r} must have {layer.num_experts} entries. "
            f"Received: {counts.shape[0]}"
        )
    return counts


def prune_model(model, counts, threshold):
    """`model` without the experts used less than `threshold` (share of routed pairs).

    The model holds one `num_experts` for all its MoE layers, so every
    layer keeps the same number `n` of experts: the largest number of
    experts at or above the threshold in any layer. A layer with fewer
    such experts also keeps its busiest experts under the threshold up to
    `n`; with one MoE layer, exactly the under-threshold experts go.

    Args:
        model: a built Keras model with flat `MoE` layers.
        counts: `{layer name: [E] routed pairs}` on sample data.
        threshold: float in [0, 1].

    Returns:
        `(new model, {layer name: kept indices, in index order}}`.
    """
    layers = moe_layers(model)
    check_threshold("threshold", threshold)
    counts = {layer.name: check_counts(layer_entry(counts, layer, "counts"), layer)
              for layer in layers}
    n = max(len(prune_keep(counts[layer.name], threshold)) for layer in layers)
    if n == 0:
        raise ValueError(f"`threshold`={threshold} removes every expert of every MoE layer")
    keep = {}
    for layer in layers:
        order = np.argsort(-counts[layer.name], kind="stable")[:n]
        keep[layer.name] = sorted(int(e) for e in order)
    return subset_model(model, keep), keep


def layer_entry(mapping, layer, what):
    """`mapping[layer.name]`; ValueError naming `what` and the layer when missing."""
    if not isinstance(mapping, dict) or layer.name not in mapping:
        raise ValueError(f"`{what}` must have an entry for MoE layer {layer.name!r}")
    return mapping[layer.name]


# --- what the MoE layers saw --------------------------------------------------------


def record_routing(model, run, max_rows=4096):
    """Each MoE layer's summed counts and (some of) its input rows over `run()`.

    Registers a routing observer (`add_routing_observer`) on every MoE layer
    of `model`, calls `run()`, which must call the model *eagerly* (not
    inside `tf.function`: the observer needs concrete tensors), in
    inference mode, and removes the observers again, also on failure.

    Args:
        model: a Keras model (or layer) with MoE layers.
        run: a callable without arguments that calls the model.
        max_rows: int >= 1, input rows kept per layer (the first ones).

    Returns:
        `{layer name: {"counts": [E] float64, "rows": [n, d] float32}}`;
        masked positions are neither counted nor kept.
    """
    layers = [layer for layer in find_moe_layers(model) if isinstance(layer, SparseMoEBase)]
    records = {layer.name: {"counts": 0.0, "rows": []} for layer in layers}
    kept = dict.fromkeys(records, 0)

    def observer_for(name):
        def observe(inputs, routing, training):
            if not tf.executing_eagerly():
                raise ValueError(
                    "record_routing needs `run` to call the model eagerly, not in a tf.function"
                )
            record = records[name]
            record["counts"] = record["counts"] + np.asarray(routing.counts, np.float64)
            x = np.asarray(tf.cast(inputs, tf.float32))
            x = x.reshape(-1, x.shape[-1])
            indices = np.asarray(routing.expert_indices).reshape(x.shape[0], -1)
            x = x[(indices >= 0).any(axis=1)][: max_rows - kept[name]]
            kept[name] += len(x)
            record["rows"].append(x)

        return observe

    observers = {layer.name: observer_for(layer.name) for layer in layers}
    try:
        for layer in layers:
            layer.add_routing_observer(observers[layer.name])
        run()
    finally:
        for layer in layers:
            if observers[layer.name] in layer.routing_observers:
                layer.remove_routing_observer(observers[layer.name])
    out = {}
    for layer in layers:
        record = records[layer.name]
        counts = np.broadcast_to(np.asarray(record["counts"], np.float64), (layer.num_experts,))
        rows = (np.concatenate(record["rows"]) if record["rows"]
                else np.zeros((0, 0), np.float32))
        out[layer.name] = {"counts": counts.copy(), "rows": rows}
    return out


__all__ = [
    "prune_keep",
    "prune_layer",
    "prune_model",
    "record_routing",
    "usage_share",
]
