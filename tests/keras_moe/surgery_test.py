"""Expert surgery (keras_moe.surgery) on hand-built experts, against NumPy expectations."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import merging, pruning, surgery
from keras_moe.models.lm import LanguageModel
from tests.keras_moe import reference as ref

D, H = 5, 4


def built_layer(num_experts, k, seed=0, gating="top_k", use_bias=True):
    """An MoE with random expert weights and biases (zero biases would hide slicing bugs)."""
    layer = keras_moe.MoE(num_experts, H, k=k, gating=gating, use_bias=use_bias, seed=seed)
    layer.build((None, D))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(size=v.shape).astype("float32") for v in layer.weights])
    return layer


def positive_rows(n, seed=1):
    return (np.abs(np.random.default_rng(seed).normal(size=(n, D))) + 0.1).astype("float32")


def confine_gate(layer, inside, seed=2):
    """Gate columns outside `inside` at -5 per (positive) input unit: never in the top k."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.3, size=(D, layer.num_experts)).astype("float32")
    outside = [e for e in range(layer.num_experts) if e not in inside]
    w[:, outside] = -5.0
    layer.gating.w_gate.assign(w)


def sliced_reference(layer, x, keep, w_gate=None):
    w_in, b_in, w_out, b_out = ref.expert_weights(layer)
    w_gate = ref.as_np(layer.gating.w_gate) if w_gate is None else w_gate
    return ref.moe_reference(x, w_gate[:, keep], w_in[keep], b_in[keep], w_out[keep],
                             b_out[keep], layer.k)


def test_subset_equals_the_full_layer_when_routing_stays_inside_the_subset():
    layer = built_layer(6, k=2)
    keep = [4, 1, 3]  # any order: new expert i is old keep[i]
    confine_gate(layer, keep)
    x = positive_rows(40)
    y_full, routing = layer(x, return_routing=True)
    assert set(np.unique(routing.expert_indices)) <= set(keep)  # the premise
    small = surgery.subset_layer(layer, keep)
    assert type(small) is keras_moe.MoE and small.num_experts == 3 and small.k == 2
    y_small, small_routing = small(x, return_routing=True)
    np.testing.assert_allclose(y_small, y_full, atol=1e-5)
    np.testing.assert_allclose(y_small, sliced_reference(layer, x, keep)["y"], atol=1e-5)
    # Routing in the subset names the same experts, renumbered by position in `keep`.
    np.testing.assert_array_equal(np.asarray(keep)[small_routing.expert_indices],
                                  routing.expert_indices)


def test_subset_routing_never_leaves_the_kept_experts_and_is_top_k_among_them():
    layer = built_layer(8, k=2, gating="noisy_top_k")
    x = np.random.default_rng(3).normal(size=(64, D)).astype("float32")
    keep = [0, 5, 6]
    full_logits = x.astype(np.float64) @ ref.as_np(layer.gating.w_gate)
    assert not set(ref.top_k(full_logits, 2).reshape(-1)) <= set(keep)  # it would leave
    small = surgery.subset_layer(layer, keep)
    np.testing.assert_array_equal(small.gating.w_noise, ref.as_np(layer.gating.w_noise)[:, keep])
    for name in ("w_in", "b_in", "w_out", "b_out"):
        np.testing.assert_array_equal(getattr(small.experts, name),
                                      getattr(layer.experts, name).numpy()[keep])
    y, routing = small(x, return_routing=True)
    expected = sliced_reference(layer, x, keep)
    np.testing.assert_array_equal(routing.expert_indices, expected["indices"])
    np.testing.assert_allclose(y, expected["y"], atol=1e-5)
    # Also in training, where noise is added: every choice is a kept expert.
    _, noisy = small(x, training=True, return_routing=True)
    assert set(np.unique(noisy.expert_indices)) <= {0, 1, 2}


def test_subset_refuses_bad_keep_lists_a_too_large_k_and_hierarchical_layers():
    layer = built_layer(4, k=2)
    for keep, match in (([], "at least one"), ([0, 0], "repeat"), ([4], r"\[0, 4\)"),
                        ([1.5], "integers"), ([3], "k=2")):
        with pytest.raises(ValueError, match=match):
            surgery.subset_layer(layer, keep)
    hierarchical = keras_moe.HierarchicalMoE(num_groups=2, experts_per_group=2,
                                             expert_hidden_dim=H)
    hierarchical.build((None, D))
    with pytest.raises(ValueError, match="HierarchicalMoE"):
        surgery.subset_layer(hierarchical, [0, 1])


def functional_model(num_experts, k, layers=1):
    inputs = keras.Input((None, D))
    x = inputs
    for i in range(layers):
        moe = keras_moe.MoE(num_experts, H, k=k, gating="top_k", name=f"moe_{i}")
        x = keras.layers.Dense(D, activation="relu", name=f"dense_{i}")(moe(x))
    return keras.Model(inputs, x)


def test_subset_model_of_a_functional_model_matches_the_full_model_inside_the_subset():
    model = functional_model(6, k=2)
    moe = model.get_layer("moe_0")
    rng = np.random.default_rng(4)
    moe.set_weights([rng.normal(size=v.shape).astype("float32") for v in moe.weights])
    keep = [0, 2, 5]
    confine_gate(moe, keep)
    x = positive_rows(24).reshape(4, 6, D)
    small = surgery.subset_model(model, keep)
    assert small.get_layer("moe_0").num_experts == 3
    np.testing.assert_allclose(small(x), model(x), atol=1e-5)
    np.testing.assert_array_equal(small.get_layer("dense_0").kernel,
                                  model.get_layer("dense_0").kernel)
    assert surgery.weight_bytes(small) < surgery.weight_bytes(model)
    with pytest.raises(ValueError, match="k=2"):
        surgery.subset_model(model, [1])


def test_subset_model_rebuilds_a_language_model_through_its_config():
    model = LanguageModel(30, model_dim=D, num_experts=6, expert_hidden_dim=H, k=2, seed=0)
    rng = np.random.default_rng(5)
    moe = keras_moe.monitoring.find_moe_layers(model)[0]
    moe.set_weights([rng.normal(size=v.shape).astype("float32") for v in moe.weights])
    tokens = rng.integers(1, 30, size=(3, 7)).astype("int32")
    # All experts, permuted: routing trivially stays inside, the output is the model's.
    permuted = surgery.subset_model(model, [5, 3, 1, 0, 2, 4])
    np.testing.assert_allclose(permuted(tokens), model(tokens), atol=1e-5)
    small = surgery.subset_model(model, [1, 4])
    assert isinstance(small, LanguageModel)
    assert small.get_config()["num_experts"] == 2 and small.num_experts == 2
    np.testing.assert_array_equal(keras_moe.monitoring.find_moe_layers(small)[0].experts.w_out,
                                  moe.experts.w_out.numpy()[[1, 4]])
    np.testing.assert_array_equal(small.embedding.embeddings, model.embedding.embeddings)
    with pytest.raises(ValueError, match="k=2"):
        surgery.subset_model(model, [1])


def counted_layer():
    """k=1, gate = 5 I: a one-hot row e_i goes to expert i; counts 10, 1, 5, 0, 4."""
    layer = built_layer(5, k=1)
    layer.gating.w_gate.assign(5.0 * np.eye(D, dtype="float32"))
    per_expert = [10, 1, 5, 0, 4]
    x = np.concatenate([np.tile(np.eye(D, dtype="float32")[i], (n, 1))
                        for i, n in enumerate(per_expert)])
    return layer, x, per_expert


def test_record_routing_counts_and_prune_removes_exactly_the_under_threshold_experts():
    layer, x, per_expert = counted_layer()
    recorded = pruning.record_routing(layer, lambda: layer(x))[layer.name]
    np.testing.assert_array_equal(recorded["counts"], per_expert)
    np.testing.assert_array_equal(recorded["rows"], x)
    assert not layer.routing_observers  # removed again
    # Shares 0.5, 0.05, 0.25, 0, 0.2: a share equal to the threshold is kept.
    for threshold, expected in ((0.1, [0, 2, 4]), (0.2, [0, 2, 4]), (0.21, [0, 2]),
                                (0.0, [0, 1, 2, 3, 4]), (0.05, [0, 1, 2, 4])):
        pruned, keep = pruning.prune_layer(layer, recorded["counts"], threshold)
        assert keep == expected
        assert pruned.num_experts == len(expected)
        np.testing.assert_array_equal(pruned.experts.w_in, layer.experts.w_in.numpy()[expected])
    with pytest.raises(ValueError, match="every expert"):
        pruning.prune_layer(layer, recorded["counts"], 0.9)
    with pytest.raises(ValueError, match="threshold"):
        pruning.prune_layer(layer, recorded["counts"], 1.5)


def test_prune_model_keeps_one_expert_count_for_all_layers():
    model = functional_model(4, k=1, layers=2)
    counts = {"moe_0": [9, 1, 0, 10], "moe_1": [5, 5, 5, 5]}
    # At 0.2: moe_0 keeps 2 experts (0, 3), moe_1 all 4; n = 4 everywhere.
    small, keep = pruning.prune_model(model, counts, 0.2)
    assert keep == {"moe_0": [0, 1, 2, 3], "moe_1": [0, 1, 2, 3]}
    # At 0.3: moe_0 keeps 0 and 3, moe_1 none, so n = 2 and moe_1 keeps its 2 busiest (ties: first).
    small, keep = pruning.prune_model(model, counts, 0.3)
    assert keep == {"moe_0": [0, 3], "moe_1": [0, 1]}
    assert small.get_layer("moe_1").num_experts == 2


def test_merging_identical_experts_keeps_the_outputs():
    layer = built_layer(4, k=1)
    weights = {v.path: v.numpy() for v in layer.weights}
    for v in layer.weights:  # expert 3 := expert 1, FFN and gate columns alike
        value = weights[v.path]
        axis = 0 if "experts" in v.path else 1
        index = [slice(None)] * value.ndim
        source = list(index)
        index[axis], source[axis] = 3, 1
        value[tuple(index)] = value[tuple(source)]
        v.assign(value)
    x = np.random.default_rng(6).normal(size=(50, D)).astype("float32")
    counts = pruning.record_routing(layer, lambda: layer(x))[layer.name]["counts"]
    assert counts[3] == 0 and counts[1] > 0  # ties go to the lower index
    for gate in merging.GATE_MODES:
        merged, clusters = merging.merge_layer(layer, x, counts, 0.999, "average", gate)
        assert clusters == [[0], [1, 3], [2]]
        assert merged.num_experts == 3
        np.testing.assert_allclose(merged(x), layer(x), atol=1e-5)


def test_merging_distinct_experts_is_computed_as_documented():
    layer = built_layer(3, k=2)
    w_in, b_in, w_out, b_out = (v.numpy() for v in (
        layer.experts.w_in, layer.experts.b_in, layer.experts.w_out, layer.experts.b_out))
    # Expert 1 = 2 x expert 0 (same hidden layer, doubled output layer): cosine 1.
    w_in[1], b_in[1], w_out[1], b_out[1] = w_in[0], b_in[0], 2 * w_out[0], 2 * b_out[0]
    layer.experts.set_weights([w_in, w_out, b_in, b_out])
    w_gate = layer.gating.w_gate.numpy()
    x = np.random.default_rng(7).normal(size=(30, D)).astype("float32")
    similarity = merging.expert_similarity(layer, x)
    assert similarity[0, 1] == pytest.approx(1.0) and similarity[0, 2] < 0.99
    counts = np.array([3.0, 7.0, 5.0])  # expert 1 is the busier of the pair
    cases = {
        ("average", "busier"): (1.5 * w_out[0], 1.5 * b_out[0], w_gate[:, 1]),
        ("busier", "busier"): (w_out[1], b_out[1], w_gate[:, 1]),
        ("average", "mean"): (1.5 * w_out[0], 1.5 * b_out[0], w_gate[:, :2].mean(axis=1)),
    }
    for (mode, gate), (m_w_out, m_b_out, m_gate) in cases.items():
        merged, clusters = merging.merge_layer(layer, x, counts, 0.99, mode, gate)
        assert clusters == [[0, 1], [2]]
        new_w_in = np.stack([w_in[0], w_in[2]])
        new_b_in = np.stack([b_in[0], b_in[2]])
        new_w_out = np.stack([m_w_out, w_out[2]])
        new_b_out = np.stack([m_b_out, b_out[2]])
        new_gate = np.stack([m_gate, w_gate[:, 2]], axis=1)
        np.testing.assert_allclose(merged.experts.w_out, new_w_out, rtol=1e-6)
        np.testing.assert_allclose(merged.gating.w_gate, new_gate, rtol=1e-6)
        expected = ref.moe_reference(x, new_gate, new_w_in, new_b_in, new_w_out, new_b_out, 2)
        np.testing.assert_allclose(merged(x), expected["y"], atol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        merging.merge_layer(layer, x, counts, 0.99, "sum")


def test_merge_clusters_use_complete_linkage_and_the_model_merges_the_same_number():
    s = np.array([[1.0, 0.97, 0.5], [0.97, 1.0, 0.96], [0.5, 0.96, 1.0]])
    # Single linkage would chain 0-1-2; 0 and 2 are not similar.
    assert merging.merge_clusters(s, 0.95) == [[0, 1], [2]]
    assert merging.merge_clusters(s, 0.95, max_merges=0) == [[0], [1], [2]]
    assert merging.merge_clusters(s, 0.4) == [[0, 1, 2]]
    model = functional_model(3, k=1, layers=2)
    first = model.get_layer("moe_0")
    w_in, w_out, b_in, b_out = first.experts.get_weights()
    w_in[2], b_in[2], w_out[2], b_out[2] = w_in[0], b_in[0], w_out[0], b_out[0]
    first.experts.set_weights([w_in, w_out, b_in, b_out])
    x = np.random.default_rng(8).normal(size=(20, D)).astype("float32")
    rows = {"moe_0": x, "moe_1": x}
    counts = {"moe_0": [1, 1, 1], "moe_1": [1, 1, 1]}
    # moe_0 can merge 0 and 2; moe_1 (random experts) cannot: no merge anywhere.
    _, plans = merging.merge_model(model, rows, counts, 0.999)
    assert plans == {"moe_0": [[0], [1], [2]], "moe_1": [[0], [1], [2]]}


def test_docstring_examples():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for module in (surgery, merging):
        for test in finder.find(module, module.__name__, globs=dict(vars(module))):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 7
    assert tf.executing_eagerly()


@pytest.mark.parametrize("gating,k", [("batchwise", 2), ("switch", 1), ("softmax", 6)])
def test_every_gate_is_sliced_and_a_dense_mixture_keeps_all_it_has(gating, k):
    layer = built_layer(6, k=k, gating=gating)
    keep = [5, 0, 2]
    small = surgery.subset_layer(layer, keep)
    assert small.gating_type == gating
    assert small.k == (3 if gating == "softmax" else k)
    for old, new in zip(layer.gating.weights, small.gating.weights, strict=True):
        np.testing.assert_array_equal(new, np.take(old.numpy(), keep, axis=-1))
    x = np.random.default_rng(9).normal(size=(16, D)).astype("float32")
    _, routing = small(x, return_routing=True)
    assert set(np.unique(routing.expert_indices)) <= {-1, 0, 1, 2}
    if gating == "softmax":  # the dense mixture of the kept experts, by NumPy
        expected = sliced_reference(layer, x, keep)
        w_in, b_in, w_out, b_out = ref.expert_weights(layer)
        y, _ = ref.all_experts(x, w_in[keep], b_in[keep], w_out[keep], b_out[keep])
        gates = ref.softmax(expected["logits"])
        np.testing.assert_allclose(small(x), np.einsum("ne,neo->no", gates, y), atol=1e-5)
