"""Expert surgery and inference-time k on layers and models with document pools.

Expected outputs come from the dense NumPy reference (tests/keras_moe/reference.py):
each row's pool by a loop over documents, then top-k inside it.
"""

import numpy as np
import pytest

import keras_moe
from keras_moe import pruning, surgery
from keras_moe.models.lm import LanguageModel
from keras_moe.monitoring import find_moe_layers
from tests.keras_moe import reference as ref

D, H = 5, 4


def pooled_layer(num_experts=8, k=2, pool_size=3, pool_size_range=None, seed=0):
    """A row-pooled top-k MoE with random weights and biases."""
    layer = keras_moe.MoE(num_experts, H, k=k, gating="top_k", pool_size=pool_size,
                          pool_size_range=pool_size_range, pool_by="row", seed=seed)
    layer.build((None, None, D))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(size=v.shape).astype("float32") for v in layer.weights])
    return layer


def confine_gate(layer, inside, seed=2):
    """Gate columns outside `inside` at -5 per (positive) input unit: last in every ranking."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.3, size=(D, layer.num_experts)).astype("float32")
    w[:, [e for e in range(layer.num_experts) if e not in inside]] = -5.0
    layer.gating.w_gate.assign(w)


def positive_rows(rows, length, seed=1):
    x = np.abs(np.random.default_rng(seed).normal(size=(rows, length, D))) + 0.1
    return x.astype("float32")


def pooled_reference(layer, x, keep, pool_size):
    """The layer's experts `keep` alone, each row pooled among them (NumPy)."""
    w_in, b_in, w_out, b_out = ref.expert_weights(layer)
    w_gate = ref.as_np(layer.gating.w_gate)[:, keep]
    rows = np.repeat(np.arange(x.shape[0]), x.shape[1])
    logits = x.reshape(-1, D).astype(np.float64) @ w_gate
    pools, gaps = ref.document_pools(logits, rows, pool_size)
    assert min(gaps.values()) > 1e-4  # no near tie float32 could break otherwise
    mask = ref.pool_mask(rows, pools, len(keep))
    return ref.moe_reference(x, w_gate, w_in[keep], b_in[keep], w_out[keep], b_out[keep],
                             layer.k, logits_mask=mask)


@pytest.mark.parametrize("keep, pool_size", [([6, 1, 3, 4], 3), ([5, 2], 2)])
def test_pooled_subset_equals_the_full_layer_when_routing_stays_inside_the_subset(keep,
                                                                                   pool_size):
    # Pools of 3 among 8 experts; the 4-expert subset keeps pool_size 3, the
    # 2-expert one has it clamped to 2 (a pool of every kept expert).
    layer = pooled_layer(8, k=2, pool_size=3)
    confine_gate(layer, keep)
    x = positive_rows(4, 6)
    y_full, routing = layer(x, return_routing=True)
    assert set(np.unique(routing.expert_indices)) <= set(keep)  # the premise
    small = surgery.subset_layer(layer, keep)
    assert (small.num_experts, small.pool_size, small.pool_by) == (len(keep), pool_size, "row")
    y_small, small_routing = small(x, return_routing=True)
    np.testing.assert_allclose(y_small, y_full, atol=1e-5)
    np.testing.assert_allclose(y_small, pooled_reference(layer, x, keep, pool_size)["y"],
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(keep)[small_routing.expert_indices],
                                  routing.expert_indices)
    # The subset's pools are the full layer's pools, renumbered (3 of the 4 kept).
    if pool_size == 3:
        np.testing.assert_array_equal(np.sort(np.asarray(keep)[small_routing.pools], axis=1),
                                      np.sort(routing.pools, axis=1))


def test_subset_merge_and_prune_clamp_the_pool_size_and_its_range():
    layer = pooled_layer(8, k=2, pool_size=6, pool_size_range=(3, 6))
    for keep, size, span in (([0, 1, 2, 3, 4, 5, 6], 6, (3, 6)), ([0, 2, 4, 6], 4, (3, 4)),
                             ([7, 1], 2, (2, 2))):
        small = surgery.subset_layer(layer, keep)
        assert (small.pool_size, small.pool_size_range) == (size, span), keep
        config = small.get_config()
        assert (config["pool_size"], tuple(config["pool_size_range"])) == (size, span)
        small(positive_rows(2, 3), training=True)  # the drawn sizes fit: it runs
    merged = surgery.regroup_layer(layer, [[0, 1, 2], [3, 4], [5], [6, 7]],
                                   counts=np.arange(8.0))
    assert (merged.num_experts, merged.pool_size, merged.pool_size_range) == (4, 4, (3, 4))
    pruned, kept = pruning.prune_layer(layer, [9, 0, 9, 0, 9, 0, 0, 9], threshold=0.1)
    assert kept == [0, 2, 4, 7] and (pruned.pool_size, pruned.pool_size_range) == (4, (3, 4))
    assert surgery.clamp_pools({"pool_size": None, "pool_size_range": None}, 2) == {
        "pool_size": None, "pool_size_range": None}


def pooled_lm(pool_size=6, pool_size_range=(3, 6)):
    model = LanguageModel(30, model_dim=D, num_experts=8, expert_hidden_dim=H, k=2, seed=0,
                          gating="top_k", pool_size=pool_size, pool_size_range=pool_size_range)
    rng = np.random.default_rng(5)
    moe = find_moe_layers(model)[0]
    moe.set_weights([rng.normal(size=v.shape).astype("float32") for v in moe.weights])
    return model


def test_language_model_surgery_writes_the_clamped_pools_into_the_model_config():
    model = pooled_lm()
    tokens = np.random.default_rng(6).integers(1, 30, size=(3, 7)).astype("int32")
    # All experts, permuted: pools and routing are the same experts, the output the model's.
    permuted = surgery.subset_model(model, [5, 3, 1, 0, 2, 4, 7, 6])
    np.testing.assert_allclose(permuted(tokens), model(tokens), atol=1e-5)
    small = surgery.subset_model(model, [1, 4, 6, 7])
    config = small.get_config()
    assert (config["num_experts"], config["pool_size"], config["pool_size_range"]) == (
        4, 4, [3, 4])
    moe = find_moe_layers(small)[0]
    assert (moe.pool_size, moe.pool_size_range, moe.pool_by) == (4, (3, 4), "row")
    # Merging builds its model the same way (regroup_model): 4 groups of 2.
    merged = surgery.regroup_model(model, {"moe": [[0, 1], [2, 3], [4, 5], [6, 7]]},
                                   counts={"moe": np.arange(8.0)})
    assert (merged.get_config()["pool_size"], merged.get_config()["pool_size_range"]) == (
        4, [3, 4])
    pruned, kept = pruning.prune_model(model, {"moe": [0, 9, 0, 9, 9, 0, 9, 0]}, 0.1)
    assert kept == {"moe": [1, 3, 4, 6]} and pruned.get_config()["pool_size"] == 4


def test_inference_k_must_fit_the_pool_and_the_clamped_pool_of_a_subset():
    model = pooled_lm(pool_size=3, pool_size_range=None)
    with pytest.raises(ValueError, match=r"must fit its pools \(pool_size=3\). Received: k=4"):
        keras_moe.set_inference_k(model, 4)
    assert find_moe_layers(model)[0].inference_k is None  # nothing changed
    assert keras_moe.set_inference_k(model, 3) == find_moe_layers(model)
    small = surgery.subset_model(model, [0, 5])
    assert find_moe_layers(small)[0].pool_size == 2
    with pytest.raises(ValueError, match=r"pool_size=2\). Received: k=3"):
        keras_moe.set_inference_k(small, 3)
    keras_moe.set_inference_k(small, 1)
    tokens = np.ones((2, 4), "int32")
    assert small(tokens, return_routing=True)[1]["moe"].expert_indices.shape == (2, 4, 1)
