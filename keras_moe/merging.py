"""Merging near-duplicate experts of an MoE (expert surgery, part two).

Experts that compute nearly the same function waste memory. Here each
expert is run on the same sample rows; two experts whose outputs have
cosine similarity at least a threshold are near-duplicates, clustered by
complete linkage, and each cluster becomes one expert of a new layer or
model (`keras_moe.surgery.regroup_layer` / `regroup_model`: the rebuild
through `get_config` / `from_config` and `set_weights`).

Example:

>>> layer = MoE(num_experts=4, expert_hidden_dim=3, k=1)
>>> layer.build((None, 2))
>>> merged, clusters = merge_layer(layer, np.ones((5, 2)), [1, 1, 1, 1], similarity=0.999)
>>> merged.num_experts == len(clusters)
True
"""

import numpy as np
import tensorflow as tf

from keras_moe.moe import MoE  # noqa: F401 (the example's)
from keras_moe.pruning import check_counts, check_threshold, layer_entry
from keras_moe.surgery import (
    GATE_MODES,
    MERGE_MODES,
    check_flat,
    moe_layers,
    regroup_layer,
    regroup_model,
)


def expert_similarity(layer, rows):
    """Cosine similarity `[E, E]` of the experts' outputs on the same rows.

    Every expert is run on all `rows` (`[N, d]`, inference mode); expert
    `i`'s outputs, flattened to one vector `o_i` of `N * out` numbers, give
    `S_ij = <o_i, o_j> / (|o_i| |o_j|)` (0 where an expert outputs zeros).
    """
    check_flat(layer)
    rows = np.asarray(rows, np.float32)
    if rows.ndim != 2 or rows.shape[0] < 1:
        raise ValueError(f"`rows` must be [N >= 1, d]. Received shape {rows.shape}")
    x = tf.broadcast_to(tf.constant(rows)[None], [layer.num_experts, *rows.shape])
    out = np.asarray(layer.experts(x, training=False), np.float64).reshape(layer.num_experts, -1)
    norms = np.linalg.norm(out, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = out / safe[:, None]
    similarity = unit @ unit.T
    similarity[norms == 0, :] = 0.0
    similarity[:, norms == 0] = 0.0
    np.fill_diagonal(similarity, 1.0)
    return similarity


def merge_clusters(similarity, threshold, max_merges=None):
    """Groups of near-duplicate experts: complete-linkage clustering at `threshold`.

    Starting from one cluster per expert, the two clusters whose *least*
    similar members are the most similar are merged, as long as that
    similarity is `>= threshold` (and at most `max_merges` times): every
    two experts of a cluster are then at least `threshold` similar, so no
    chain of small steps merges two different experts.

    Returns:
        list of clusters (sorted lists of expert indices), ordered by their
        first expert.

    Example:

    >>> s = np.array([[1.0, 0.99, 0.1], [0.99, 1.0, 0.2], [0.1, 0.2, 1.0]])
    >>> merge_clusters(s, 0.95)
    [[0, 1], [2]]
    """
    similarity = np.asarray(similarity, np.float64)
    check_threshold("similarity", threshold, -1.0, 1.0)
    clusters = [[i] for i in range(similarity.shape[0])]
    linkage = similarity.copy()
    np.fill_diagonal(linkage, -np.inf)
    merges = 0
    while len(clusters) > 1 and (max_merges is None or merges < max_merges):
        a, b = np.unravel_index(np.argmax(linkage), linkage.shape)
        if linkage[a, b] < threshold:
            break
        a, b = min(a, b), max(a, b)
        clusters[a] = sorted(clusters[a] + clusters[b])
        merged = np.minimum(linkage[a], linkage[b])
        linkage[a, :], linkage[:, a] = merged, merged
        linkage[a, a] = -np.inf
        linkage = np.delete(np.delete(linkage, b, axis=0), b, axis=1)
        del clusters[b]
        merges += 1
    return sorted(clusters, key=lambda c: c[0])


def _check_merge_modes(mode, gate):
    if mode not in MERGE_MODES:
        raise ValueError(f"`mode` must be one of {MERGE_MODES}. Received: mode={mode!r}")
    if gate not in GATE_MODES:
        raise ValueError(f"`gate` must be one of {GATE_MODES}. Received: gate={gate!r}")


def merge_layer(layer, rows, counts, similarity=0.95, mode="average", gate="busier",
                max_merges=None):
    """A new `MoE` in which each cluster of near-duplicate experts is one expert.

    Clusters are `merge_clusters(expert_similarity(layer, rows),
    similarity)`. A cluster becomes one expert:

    - `mode="average"`: its feed-forward weights (`w_in`, `b_in`, `w_out`,
      `b_out`, deep experts' hidden layers) are the plain mean of the
      members'. Near-duplicates compute nearly the same function, so the
      mean stays close to each; identical experts merge into themselves.
    - `mode="busier"`: the weights of the member with most routed pairs
      (`counts`), the others dropped.

    The merged expert's gate column (`W_g`, and `W_noise`, batchwise
    thresholds alike):

    - `gate="busier"` (default): the busier member's column. Tokens that
      chose the busier member still choose the merged one, with the same
      logit; the other member's tokens fall to their next choice. The gate
      stays one the model was trained with.
    - `gate="mean"`: the mean of the columns. The merged expert should
      receive the union of its members' traffic, i.e. the probability
      `p_a + p_b`: a logit `log(exp(l_a) + exp(l_b))`. A linear gate without
      bias cannot hold that log-sum-exp (it depends on `x` nonlinearly and
      needs a `log 2` offset where `l_a = l_b`); the mean column is its
      first-order part, `(l_a + l_b) / 2`, exact when the columns are equal.

    Args:
        layer: a built `MoE`.
        rows: `[N, d]` sample inputs of the layer (`record_routing`).
        counts: `[E]` routed pairs per expert on sample data.
        similarity: float in [-1, 1], the cosine threshold.
        mode: `"average"` or `"busier"`.
        gate: `"busier"` or `"mean"`.
        max_merges: None or int, at most this many pairwise merges.

    Returns:
        `(new layer, clusters)`.
    """
    check_flat(layer)
    _check_merge_modes(mode, gate)
    counts = check_counts(counts, layer)
    clusters = merge_clusters(expert_similarity(layer, rows), similarity, max_merges)
    return regroup_layer(layer, clusters, counts, mode, gate), clusters


def merge_model(model, rows, counts, similarity=0.95, mode="average", gate="busier"):
    """`merge_layer` on every MoE layer of `model`, rebuilt as one model.

    The model holds one `num_experts`, so every layer makes the same number
    `m` of merges: the smallest number any layer can make at `similarity`
    (the others make their `m` most similar merges). With one MoE layer
    this is exactly `merge_layer`.

    Args:
        model: a built Keras model with flat `MoE` layers.
        rows: `{layer name: [N, d] sample inputs}`.
        counts: `{layer name: [E] routed pairs}`.
        similarity, mode, gate: as for `merge_layer`.

    Returns:
        `(new model, {layer name: clusters})`.
    """
    _check_merge_modes(mode, gate)
    layers = moe_layers(model)
    scores, layer_counts = {}, {}
    for layer in layers:
        layer_counts[layer.name] = check_counts(layer_entry(counts, layer, "counts"), layer)
        scores[layer.name] = expert_similarity(layer, layer_entry(rows, layer, "rows"))
    merges = min(
        layer.num_experts - len(merge_clusters(scores[layer.name], similarity))
        for layer in layers
    )
    plans = {name: merge_clusters(s, similarity, merges) for name, s in scores.items()}
    return regroup_model(model, plans, layer_counts, mode, gate), plans


__all__ = ["expert_similarity", "merge_clusters", "merge_layer", "merge_model"]
