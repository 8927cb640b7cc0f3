"""Tests of `keras_moe.pipelines.inspection.routes`: route() against the layers' own routing and NumPy.

Every model gets random gating weights (they start at zero, which would make
every logit equal and every choice a tie). The reference numbers come from
calling the MoE layer itself on its input, computed here from the model's
sublayers without the inspector, and from the gating weights in float64
NumPy: clean logits `x W_g`, noise std `softplus(x W_noise) + noise_epsilon`
(keras_moe/gating.py), top-k choices and the softmax over the kept logits.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe.models.lm import LanguageModel
from keras_moe.pipelines.inspection import routes as ki

TEXTS = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 3], [4]]  # unequal: rows get padded


def _randomize(*weights, seed=0):
    rng = np.random.default_rng(seed)
    for w in weights:
        w.assign(rng.normal(0.0, 1.0, w.shape).astype("float32"))


def _softplus(z):
    return np.logaddexp(0.0, z)


def _check_flat_layer(result, moe, hidden_per_text, texts=TEXTS):
    """route()'s numbers for `moe` against the layer on `hidden_per_text` and NumPy."""
    w_gate = moe.gating.w_gate.numpy().astype(np.float64)
    w_noise = moe.gating.w_noise.numpy().astype(np.float64)
    counts = np.zeros(moe.num_experts)
    importance = np.zeros(moe.num_experts)
    for text_index, hidden in enumerate(hidden_per_text):
        _, routing = moe(hidden[None], training=False, return_routing=True)
        tokens = result["tokens"][text_index]
        assert len(tokens) == hidden.shape[0]
        counts += routing.counts.numpy()
        importance += routing.importance.numpy()
        x = hidden.numpy().astype(np.float64)
        logits = x @ w_gate
        for t, token in enumerate(tokens):
            assert token["experts"] == routing.expert_indices[0, t].numpy().tolist()
            np.testing.assert_allclose(token["gates"], routing.gates[0, t], rtol=1e-5)
            np.testing.assert_allclose(token["clean_logits"], logits[t], rtol=1e-4, atol=1e-5)
            # Inference: the k largest clean logits, weighted by their softmax.
            top = np.argsort(-logits[t])[: moe.k]
            assert sorted(token["experts"]) == sorted(top.tolist())
            kept = np.exp(logits[t][token["experts"]] - logits[t][top].max())
            np.testing.assert_allclose(token["gates"], kept / kept.sum(), rtol=1e-4)
            ordered = np.sort(logits[t])[::-1]
            assert token["margin"] == pytest.approx(ordered[moe.k - 1] - ordered[moe.k], abs=1e-4)
            assert token["margin"] > 0
            np.testing.assert_allclose(
                token["noise_std"], _softplus(x[t] @ w_noise) + moe.noise_epsilon, rtol=1e-4
            )
    assert [e["count"] for e in result["experts"]] == counts.astype(int).tolist()
    np.testing.assert_allclose([e["importance"] for e in result["experts"]], importance,
                               rtol=1e-5)
    pairs = sum(len(row) for row in texts) * moe.k
    assert result["pairs"] == pairs
    np.testing.assert_allclose([e["share"] for e in result["experts"]], counts / pairs)


def test_language_model_routes_like_its_moe_layer():
    # Unrolled LSTMs need a static time axis: route() must trace with one.
    model = LanguageModel(30, model_dim=8, blocks=("lstm", "moe"), num_experts=4,
                          expert_hidden_dim=6, k=2, unroll=True, seed=1)
    moe = model.get_layer("moe")
    _randomize(moe.gating.w_gate, moe.gating.w_noise)
    # Three texts per batch: padding, empty rows and batch boundaries change nothing.
    result = ki.route(model, TEXTS, batch_size=3)
    json.dumps(result)  # plain data
    assert result["token_ids"] == TEXTS and list(result["layers"]) == ["moe"]
    layer = result["layers"]["moe"]
    assert layer["type"] == "MoE" and layer["logits_level"] == "experts"
    assert layer["tokens_routed"] == sum(len(row) for row in TEXTS)
    assert [t["id"] for t in layer["tokens"][0]] == TEXTS[0]
    # The MoE block's input, rebuilt from the model's own sublayers (inference:
    # dropout is the identity): embedding, then the LSTM block plus its residual.
    hidden = []
    for row in TEXTS:
        tokens = tf.constant([row])
        x = model.embedding(tokens)
        mask = tf.not_equal(tokens, 0)
        hidden.append((model.block_layers[0](x, mask=mask) + x)[0])
    _check_flat_layer(layer, moe, hidden)


# A nested functional model drops the Keras mask: the padding of short rows is
# then routed too, and route() must still count real tokens only.
@pytest.mark.filterwarnings("ignore:Layer 'block' .* was passed an input with a mask")
def test_functional_model_with_nested_block_and_text_vocabulary():
    class Vocabulary:
        words = ["<pad>", "<unk>", "<eos>", "the", "cat", "sat", "on", "a", "mat"]

        def encode_line(self, line):
            return [self.words.index(w) if w in self.words else 1 for w in line.split()] + [2]

    inputs = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(9, 6, mask_zero=True, name="embedding")(inputs)
    block_in = keras.Input((None, 6))
    block = keras.Model(block_in, keras_moe.MoE(5, 4, k=2, name="moe")(block_in), name="block")
    model = keras.Model(inputs, keras.layers.Dense(9)(block(embedded)))
    moe = block.get_layer("moe")
    _randomize(moe.gating.w_gate, moe.gating.w_noise, seed=2)
    texts = ["the cat sat on a mat", "a dog sat", "the mat", "cat"]
    result = ki.route(model, texts, Vocabulary())
    assert result["texts"] == texts
    layer = result["layers"]["moe"]
    assert [t["token"] for t in layer["tokens"][1]] == ["a", "<unk>", "sat", "<eos>"]
    ids = [Vocabulary().encode_line(t) for t in texts]
    assert result["token_ids"] == ids
    embedding = model.get_layer("embedding")
    _check_flat_layer(layer, moe, [embedding(tf.constant(row)) for row in ids], ids)


def test_hierarchical_layer_reports_both_levels():
    groups, per_group, d = 3, 2, 6
    inputs = keras.Input((None,), dtype="int32")
    embedding = keras.layers.Embedding(20, d, mask_zero=True)
    moe = keras_moe.HierarchicalMoE(groups, per_group, 4, k_primary=2, k_secondary=1,
                                    name="hmoe")
    model = keras.Model(inputs, moe(embedding(inputs)))
    _randomize(moe.gating.primary.w_gate, moe.gating.primary.w_noise, moe.gating.w_gate,
               moe.gating.w_noise, seed=3)
    result = ki.route(model, TEXTS)["layers"]["hmoe"]
    assert result["logits_level"] == "groups" and result["k"] == 2
    primary_gate = moe.gating.primary.w_gate.numpy().astype(np.float64)
    primary_noise = moe.gating.primary.w_noise.numpy().astype(np.float64)
    w_gate = moe.gating.w_gate.numpy().astype(np.float64)
    w_noise = moe.gating.w_noise.numpy().astype(np.float64)
    counts = np.zeros(groups * per_group)
    for row, tokens in zip(TEXTS, result["tokens"], strict=True):
        hidden = embedding(tf.constant([row]))
        _, routing = moe(hidden, training=False, return_routing=True)
        counts += routing.counts.numpy()
        x = hidden[0].numpy().astype(np.float64)
        for t, token in enumerate(tokens):
            assert token["experts"] == routing.expert_indices[0, t].numpy().tolist()
            np.testing.assert_allclose(token["gates"], routing.gates[0, t], rtol=1e-5)
            np.testing.assert_allclose(token["clean_logits"], routing.clean_logits[0, t],
                                       rtol=1e-5)
            logits = x[t] @ primary_gate
            np.testing.assert_allclose(token["clean_logits"], logits, rtol=1e-4, atol=1e-5)
            chosen = np.argsort(-logits)[:2]
            assert token["groups"] == [e // per_group for e in token["experts"]]
            assert sorted(token["groups"]) == sorted(chosen.tolist())
            assert token["margin"] == pytest.approx(
                np.sort(logits)[::-1][1] - np.sort(logits)[::-1][2], abs=1e-4
            )
            np.testing.assert_allclose(
                token["noise_std"], _softplus(x[t] @ primary_noise) + moe.noise_epsilon,
                rtol=1e-4,
            )
            assert [s["group"] for s in token["secondary"]] == sorted(chosen.tolist())
            for s in token["secondary"]:
                g = s["group"]
                inner = x[t] @ w_gate[g]
                np.testing.assert_allclose(s["clean_logits"], inner, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(
                    s["noise_std"], _softplus(x[t] @ w_noise[g]) + moe.noise_epsilon, rtol=1e-4
                )
                assert s["margin"] == pytest.approx(abs(inner[0] - inner[1]), abs=1e-4)
                # k_secondary = 1: the chosen expert of the group is its best logit.
                assert g * per_group + int(np.argmax(inner)) in token["experts"]
    assert [e["count"] for e in result["experts"]] == counts.astype(int).tolist()
    assert [e["group"] for e in result["experts"]] == [0, 0, 1, 1, 2, 2]


def test_batchwise_layer_has_no_margin_or_noise():
    inputs = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(20, 6, mask_zero=True)(inputs)
    moe = keras_moe.MoE(4, 4, k=2, gating="batchwise", name="moe")
    model = keras.Model(inputs, moe(hidden))
    moe.gating.thresholds.assign([-0.5, 0.0, 0.2, 10.0])  # expert 3 is never chosen
    result = ki.route(model, TEXTS)["layers"]["moe"]
    assert not result["has_margin"] and not result["has_noise"]
    chosen = [e for text in result["tokens"] for token in text for e in token["experts"]]
    assert chosen and 3 not in chosen
    for text in result["tokens"]:
        for token in text:
            assert token["margin"] is None and token["noise_std"] is None
            logits = np.array(token["clean_logits"])
            # Inference rule of App. F: every expert whose logit is above its threshold.
            expected = np.flatnonzero(logits > moe.gating.thresholds.numpy())
            assert sorted(token["experts"]) == expected.tolist()


def _small_model():
    inputs = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
    return keras.Model(inputs, keras_moe.MoE(4, 4, k=2, name="moe")(hidden))


def test_unknown_layer_names_it_and_the_available_ones():
    with pytest.raises(ValueError, match=r"available: moe\. Received: layer='nope'"):
        ki.route(_small_model(), TEXTS, layer="nope")
    with pytest.raises(ValueError, match="no MoE layer"):
        ki.route(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), TEXTS)
    with pytest.raises(ValueError, match=r"texts\[1\].*0 is padding"):
        ki.route(_small_model(), [[3], [0, 4]])
    with pytest.raises(ValueError, match="need a `vocabulary`"):
        ki.route(_small_model(), ["a b"])


def test_a_layer_called_twice_is_refused():
    inputs = keras.Input((None,), dtype="int32")
    moe = keras_moe.MoE(4, 4, k=2, name="moe")
    hidden = keras.layers.Embedding(20, 4, mask_zero=True)(inputs)
    model = keras.Model(inputs, moe(moe(hidden)))
    with pytest.raises(ValueError, match="'moe' was called 2 times"):
        ki.route(model, TEXTS)
    assert "call" not in moe.__dict__


def test_forward_hook_for_a_model_with_two_inputs():
    # An encoder-decoder shape: "enc" routes the source tokens, "dec" one target step.
    source = keras.Input((None,), dtype="int32")
    target = keras.Input((None,), dtype="int32")
    embedding = keras.layers.Embedding(20, 4, mask_zero=True, name="embedding")
    enc = keras_moe.MoE(4, 4, k=2, name="enc")
    dec = keras_moe.MoE(4, 4, k=2, name="dec")
    model = keras.Model([source, target], [enc(embedding(source)), dec(embedding(target))])
    _randomize(enc.gating.w_gate, enc.gating.w_noise, seed=4)

    def forward(m, tokens):
        return m([tokens, tokens[:, :1]], training=False)

    result = ki.route(model, TEXTS, layer="enc", forward=forward)["layers"]["enc"]
    _check_flat_layer(result, enc, [embedding(tf.constant(row)) for row in TEXTS])
    with pytest.raises(ValueError, match="'dec' routed positions of shape"):
        ki.route(model, TEXTS, forward=forward)
    assert "call" not in enc.__dict__ and "call" not in dec.__dict__


def test_the_original_call_is_restored():
    model = _small_model()
    moe = model.get_layer("moe")
    _randomize(moe.gating.w_gate)
    tokens = tf.constant([[3, 4, 5]])
    before = model(tokens).numpy()
    ki.route(model, TEXTS)
    assert "call" not in moe.__dict__ and moe.call.__func__ is keras_moe.MoE.call
    np.testing.assert_array_equal(model(tokens).numpy(), before)
    # Also when the model fails mid-way (an id outside the embedding) ...
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        ki.route(model, [[3, 4], [99]])
    assert "call" not in moe.__dict__
    # ... and a `call` the user had put on the instance comes back as it was.
    seen = []

    def own_call(*args, **kwargs):
        seen.append(1)
        return keras_moe.MoE.call(moe, *args, **kwargs)

    moe.call = own_call
    ki.route(model, TEXTS)
    assert moe.__dict__["call"] is own_call and seen  # route() went through it too


def test_characteristic_tokens_on_known_counts():
    # Pairs: a 6 on expert 0; b 2 and 4; c 4 on expert 1; d once on expert 0.
    # Totals: C = 17, C_0 = 9, C_1 = 8; ratio = (c[t, e] / C_e) / (C_t / C).
    counts = {"a": [6, 0], "b": [2, 4], "c": [0, 4], "d": [1, 0]}
    table = ki.characteristic_tokens(counts, min_count=2)
    assert [entry["count"] for entry in table] == [9, 8]
    # b on expert 0: (2/9) / (6/17) = 0.63 < 1, not characteristic; d: one pair < min_count.
    assert [(t["token"], t["count"], t["total"]) for t in table[0]["tokens"]] == [("a", 6, 6)]
    assert table[0]["tokens"][0]["ratio"] == pytest.approx(17 / 9)
    assert [t["token"] for t in table[1]["tokens"]] == ["c", "b"]
    assert [t["ratio"] for t in table[1]["tokens"]] == pytest.approx([17 / 8, 17 / 12])
    # min_count=1 lets d in with the same ratio as a: the larger count ranks first.
    assert [t["token"] for t in ki.characteristic_tokens(counts, min_count=1)[0]["tokens"]] == [
        "a", "d"]
    assert [t["token"] for t in ki.characteristic_tokens(counts, top=1)[1]["tokens"]] == ["c"]
    # The same counts as a route() layer result, token by token.
    tokens = [{"token": t, "experts": [e], "gates": [1.0]}
              for t, row in counts.items() for e, n in enumerate(row) for _ in range(n)]
    layer = {"num_experts": 2, "tokens": [tokens]}
    assert ki.pair_counts(layer) == counts
    assert ki.characteristic_tokens(layer) == table
    with pytest.raises(ValueError, match="min_count"):
        ki.characteristic_tokens(counts, min_count=0)


def test_expert_contexts_and_gate_matrix():
    layer = {"num_experts": 3, "tokens": [
        [{"token": w, "experts": [e], "gates": [g]}
         for w, e, g in [("a", 0, 0.5), ("b", 1, 0.9), ("c", 0, 0.8), ("d", 1, 0.1)]],
    ]}
    contexts = ki.expert_contexts(layer, top=2, window=1)
    assert [c["context"] for c in contexts[0]] == ["b [c] d", "[a] b"]
    assert [c["gate"] for c in contexts[1]] == [0.9, 0.1] and contexts[2] == []
    np.testing.assert_array_equal(
        ki.gate_matrix(layer, 0), [[0.5, 0, 0], [0, 0.9, 0], [0.8, 0, 0], [0, 0.1, 0]]
    )


def test_route_observes_the_layers_without_replacing_their_call():
    """route() records through routing observers; `call` stays the class's own."""
    model = _small_model()
    moe = model.get_layer("moe")
    _randomize(moe.gating.w_gate, moe.gating.w_noise, seed=5)
    during = []

    def forward(m, tokens):
        during.append(("call" in moe.__dict__, len(moe.routing_observers)))
        return m(tokens, training=False)

    result = ki.route(model, TEXTS, forward=forward)["layers"]["moe"]
    # While route() runs the layer has one observer and no instance `call`.
    assert during and all(entry == (False, 1) for entry in during)
    assert moe.routing_observers == ()
    # The results are those of the layer's own Routing (and NumPy).
    embedding = model.layers[1]
    _check_flat_layer(result, moe, [embedding(tf.constant(row)) for row in TEXTS])
    # An observer of the user's stays, and sees route()'s calls as well.
    seen = []
    moe.add_routing_observer(lambda inputs, routing, training: seen.append(routing))
    ki.route(model, TEXTS)
    assert len(moe.routing_observers) == 1 and seen
