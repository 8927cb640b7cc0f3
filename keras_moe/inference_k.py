"""Inference-time k: evaluate a model trained with k experts per position at k'.

The routing itself lives in the layers (`keras_moe.pools.RoutingOptions`,
`inference_k`); this walks a model's MoE layers to set it.
"""

import keras

from keras_moe.monitoring import find_moe_layers


def set_inference_k(model_or_layer, k):
    """Evaluate a model trained with `k` at `k'` experts per position.

    Every MoE layer of `model_or_layer` (found by
    `keras_moe.monitoring.find_moe_layers`; or the layer itself) routes
    each position to its top `k'` experts in calls with `training=False`,
    with gates `Softmax(KeepTopK(H(x), k'))` (Eq. 3: the softmax over the
    `k'` kept logits). Training calls keep the trained `k`. `k=None`
    restores the trained `k`. For `HierarchicalMoE`, `k'` must be a multiple
    of `k_secondary` and sets the groups per position to `k' / k_secondary`.
    With document pools, `k' <= pool_size`. The setting is not saved.

    A model's cached `predict` and `evaluate` functions are dropped, so the
    next call retraces them with `k'`; functions traced elsewhere (a
    `tf.function` of your own) keep the `k` they were traced with.

    Args:
        model_or_layer: a Keras model, or an MoE layer.
        k: int `1 <= k' <= num_experts`, or None.

    Returns:
        The list of MoE layers changed.

    Raises:
        ValueError: no MoE layer, or a `k'` a layer cannot route (its gating
            must be `"noisy_top_k"`, `"top_k"` or `"softmax"`, or
            hierarchical). Nothing is changed then.

    Example:

    >>> import keras_moe, tensorflow as tf
    >>> layer = keras_moe.MoE(num_experts=8, expert_hidden_dim=16, k=4)
    >>> _ = keras_moe.set_inference_k(layer, 1)
    >>> layer(tf.random.normal([2, 3, 12]), return_routing=True)[1].gates.shape
    TensorShape([2, 3, 1])
    """
    layers = find_moe_layers(model_or_layer)
    if not layers:
        raise ValueError(
            f"`model_or_layer` holds no MoE layer. Received: {type(model_or_layer).__name__} "
            f"{getattr(model_or_layer, 'name', '')!r}"
        )
    for layer in layers:  # all checked before any is changed
        layer.inference_k_arguments(k)
    for layer in layers:
        layer.inference_k = k
    if isinstance(model_or_layer, keras.Model):
        model_or_layer.predict_function = None
        model_or_layer.test_function = None
    return layers
