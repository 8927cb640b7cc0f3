"""Tests of keras_moe.models.seq2seq.TranslationModel (tiny sizes, CPU)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose, assert_array_equal

import keras_moe
from keras_moe.models import decoding
from keras_moe.models.attention import AdditiveAttention, MultiplicativeTanhAttention
from keras_moe.models.seq2seq import TranslationModel

V, D = 23, 8
SOURCE = np.array([[5, 9, 12, 17, 2], [4, 8, 2, 0, 0]], np.int32)
TARGET = np.array([[1, 7, 3, 22, 6], [1, 11, 14, 0, 0]], np.int32)

# Three structures: the paper's (projected LSTMs, bidirectional encoder,
# flat MoE, App. G attention, context to the upper LSTM), a plain one with
# GNMT's additive attention and a dense block, and a hierarchical MoE.
CONFIGS = {
    "paper": dict(lstm_units=12, lstm_projection=D, num_experts=4, expert_hidden_dim=6, k=2),
    "plain": dict(bidirectional_encoder=False, upper_context=False, middle_block="ffn",
                  attention="additive", attention_units=5, k=2, expert_hidden_dim=6),
    "hierarchical": dict(num_experts=8, num_groups=2, k=2, expert_hidden_dim=6,
                         attention="additive"),
}


def tiny(config="paper", **kwargs):
    model = TranslationModel(V, model_dim=D, seed=3, **{**CONFIGS[config], **kwargs})
    # Gating weights start at zero; random ones make routing depend on the input.
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, (keras_moe.MoE, keras_moe.HierarchicalMoE)):
            for weight in layer.gating.weights:
                if "w_gate" in weight.path:
                    weight.assign(rng.normal(size=weight.shape) * 2.0)
    return model


def test_shapes_dict_input_and_layers():
    model = tiny()
    logits = model((SOURCE, TARGET))
    assert tuple(logits.shape) == (2, 5, V) and logits.dtype == tf.float32
    assert np.isfinite(np.asarray(logits)).all()
    as_dict = model({"source": SOURCE, "target_in": TARGET})
    assert_array_equal(np.asarray(as_dict), np.asarray(logits))
    assert tuple(model((SOURCE[:, :3], TARGET[:, :2])).shape) == (2, 2, V)
    names = [layer.name for layer in model.layers]
    for name in ("embedding", "encoder_lstm_1", "encoder_lstm_2", "encoder_moe", "encoder_lstm_3",
                 "decoder_lstm_1", "attention", "decoder_moe", "decoder_lstm_2", "softmax"):
        assert name in names
    assert isinstance(model.get_layer("encoder_lstm_1"), keras.layers.Bidirectional)
    assert isinstance(model.attention, MultiplicativeTanhAttention)
    assert isinstance(tiny("plain").attention, AdditiveAttention)
    assert isinstance(tiny("hierarchical").get_layer("decoder_moe"), keras_moe.HierarchicalMoE)


def test_parameter_count_by_hand():
    # "plain": LSTMs of D cells, no projection, unidirectional; dense block
    # of k * 6 = 12 hidden units; additive attention of 5 units.
    model = tiny("plain")
    lstm = 4 * D * (D + D) + 4 * D  # kernels [x, h] -> 4 gates, bias
    bottom = 4 * D * (2 * D + D) + 4 * D  # input [embedding; context]
    ffn = D * 12 + 12 + 12 * D + D
    attention = D * 5 + D * 5 + 5
    embedding, softmax = V * D, D * V + V
    expected = embedding + 3 * lstm + ffn + bottom + attention + ffn + lstm + softmax
    assert model.count_params() == expected
    # "paper": bidirectional first layer of two 12-cell LSTMs projected to D/2.
    paper = tiny()
    direction = 4 * 12 * (D + D // 2) + 4 * 12 + 12 * D // 2
    assert paper.get_layer("encoder_lstm_1").count_params() == 2 * direction
    moe = 4 * (D * 6 + 6 + 6 * D + D) + 2 * D * 4  # experts, w_gate and w_noise
    assert paper.get_layer("encoder_moe").count_params() == moe


def test_the_embedding_is_shared_and_the_softmax_is_not():
    model = tiny()
    embeddings = [w for w in model.weights if "embedding" in w.path]
    assert len(embeddings) == 1 and tuple(embeddings[0].shape) == (V, D)
    # Changing one embedding row changes both the encoder and the decoder.
    before = np.asarray(model.encode(SOURCE)["memory"])
    row = SOURCE[0, 1]
    table = np.asarray(model.embedding.embeddings).copy()
    table[row] += 1.0
    model.embedding.embeddings.assign(table)
    after = np.asarray(model.encode(SOURCE)["memory"])
    assert not np.allclose(before[0], after[0])
    assert_allclose(before[1], after[1], atol=1e-6)  # row 1 has no such token
    assert model.softmax.kernel is not model.embedding.embeddings


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_source_and_target_padding_change_nothing_at_real_positions(config):
    model = tiny(config)
    logits = np.asarray(model((SOURCE, TARGET)))
    padded_source = np.pad(SOURCE, [(0, 0), (0, 3)])
    padded_target = np.pad(TARGET, [(0, 0), (0, 2)])
    padded = np.asarray(model((padded_source, padded_target)))
    assert_allclose(padded[:, :5], logits, atol=1e-5)
    # Row 1 alone, without its padding, gives the same real positions.
    alone = np.asarray(model((SOURCE[1:, :3], TARGET[1:, :3])))
    assert_allclose(alone[0], logits[1, :3], atol=1e-5)


def test_attention_sums_to_one_over_real_source_positions_and_is_zero_on_padding():
    for config in ("paper", "plain"):
        _, extras = tiny(config)((SOURCE, TARGET), return_attention=True)
        probs = np.asarray(extras["attention"])
        assert probs.shape == (2, 5, 5)
        assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
        assert (probs[1, :, 3:] == 0.0).all() and (probs[1, :, :3] > 0).all()
    # The first query is the bottom LSTM's zero initial output: App. G's
    # scores sum_d V_d tanh((xU)_d) tanh(0) are all 0, so step 0 is uniform.
    _, extras = tiny("paper")((SOURCE, TARGET), return_attention=True)
    first = np.asarray(extras["attention"])[:, 0]
    assert_allclose(first, [[0.2] * 5, [1 / 3] * 3 + [0, 0]], atol=1e-7)


@pytest.mark.parametrize("activation, scale", [("sigmoid", 1.0), ("linear", 1.0),
                                               ("linear", 3.0), ("sigmoid", 0.5)])
def test_forward_pass_follows_the_paper_wiring(activation, scale):
    # The architecture restated with the model's own layers (inference, so
    # no dropout): residuals around every LSTM and MoE, a sigmoid on the MoE
    # output (none for the "linear" ablation) after `moe_output_scale`, the
    # bottom decoder LSTM reading [embedding; context] with the context
    # queried by its previous output, and the upper LSTM reading [x; context].
    model = tiny(moe_activation=activation, moe_output_scale=scale)
    f = tf.sigmoid if activation == "sigmoid" else tf.identity

    def act(y):
        return f(scale * y)

    source_mask, target_mask = SOURCE != 0, TARGET != 0
    x = model.embedding(SOURCE)
    x = x + model.get_layer("encoder_lstm_1")(x, mask=source_mask)
    x = x + model.get_layer("encoder_lstm_2")(x, mask=source_mask)
    x = x + act(model.get_layer("encoder_moe")(x, mask=source_mask))
    memory = x + model.get_layer("encoder_lstm_3")(x, mask=source_mask)
    cell = model.get_layer("decoder_lstm_1")
    states = [tf.zeros([2, D]), tf.zeros([2, 12])]  # r (projection D), c (12 cells)
    outputs, contexts = [], []
    embedded = model.embedding(TARGET)
    for j in range(TARGET.shape[1]):
        context, _ = model.attention(states[0], memory, memory_mask=source_mask)
        out, states = cell(tf.concat([embedded[:, j], context], -1), states)
        outputs.append(out)
        contexts.append(context)
    x = embedded + tf.stack(outputs, 1)
    x = x + act(model.get_layer("decoder_moe")(x, mask=target_mask))
    upper_in = tf.concat([x, tf.stack(contexts, 1)], -1)
    x = x + model.get_layer("decoder_lstm_2")(upper_in, mask=target_mask)
    expected = np.asarray(model.softmax(x))
    got = np.asarray(model((SOURCE, TARGET)))
    assert_allclose(got[target_mask], expected[target_mask], atol=1e-5)


def test_padding_positions_are_not_routed():
    model = tiny()
    _, extras = model((SOURCE, TARGET), return_routing=True)
    routing = extras["routing"]
    assert sorted(routing) == ["decoder_moe", "encoder_moe"]
    for name, ids in (("encoder_moe", SOURCE), ("decoder_moe", TARGET)):
        experts = np.asarray(routing[name].expert_indices)  # [b, t, k]
        assert_array_equal(experts[ids == 0], -1)
        assert (experts[ids != 0] >= 0).all()
        # Counts cover the real positions only: k pairs each.
        assert float(np.sum(routing[name].counts)) == 2 * np.sum(ids != 0)


def test_balancing_losses_and_routing_metrics_come_from_both_moe_layers():
    model = tiny()
    model((SOURCE, TARGET), training=True)
    assert len(model.losses) == 2
    assert all(float(loss) > 0 for loss in model.losses)
    metric_names = {m.name for layer in model.layers for m in layer.metrics}
    assert {"encoder_moe_cv_importance", "decoder_moe_cv_load"} <= metric_names
    model((SOURCE, TARGET), training=False)
    assert len(model.losses) == 0


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_teacher_forced_logits_equal_step_by_step_decoding(config, scale):
    # With `moe_output_scale`, too: decoding steps scale the MoE output as
    # the teacher-forced pass does (the wiring test checks the latter).
    model = tiny(config, moe_output_scale=scale)
    logits, extras = model((SOURCE, TARGET), return_attention=True)
    encoded = model.encode(SOURCE)
    assert tuple(encoded["memory"].shape) == (2, 5, D)
    state = model.initial_decoder_state(2)
    real = TARGET != 0
    for j in range(TARGET.shape[1]):
        step_logits, step_attention, state = model.decode_step(TARGET[:, j], state, encoded)
        assert tuple(step_logits.shape) == (2, V)
        rows = real[:, j]
        assert_allclose(np.asarray(step_logits)[rows], np.asarray(logits)[rows, j], atol=1e-5)
        assert_allclose(np.asarray(step_attention)[rows],
                        np.asarray(extras["attention"])[rows, j], atol=1e-6)


def test_training_reaches_every_weight_through_the_attention_loop():
    model = tiny(dropout=0.2)
    labels = np.roll(TARGET, -1, axis=1)
    with tf.GradientTape() as tape:
        logits = model((SOURCE, TARGET), training=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            labels, logits, sample_weight=(labels != 0).astype(np.float32)
        ) + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_weights)
    missing = [w.path for w, g in zip(model.trainable_weights, grads, strict=True) if g is None]
    assert missing == []
    by_path = {w.path: g for w, g in zip(model.trainable_weights, grads, strict=True)}
    for path in ("attention/query_kernel", "attention/memory_kernel",
                 "decoder_lstm_1/recurrent_kernel"):
        grad = next(g for p, g in by_path.items() if p.endswith(path))
        assert float(tf.reduce_max(tf.abs(grad))) > 0, path


def test_save_and_reload_keras_file(tmp_path):
    model = tiny()
    logits = np.asarray(model((SOURCE, TARGET)))
    path = str(tmp_path / "translation.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is TranslationModel
    assert_array_equal(np.asarray(loaded((SOURCE, TARGET))), logits)
    ids, _ = decoding.beam_search(model, SOURCE, bos_id=1, eos_id=2, beam_width=2, min_extra=2)
    loaded_ids, _ = decoding.beam_search(loaded, SOURCE, bos_id=1, eos_id=2, beam_width=2,
                                         min_extra=2)
    assert_array_equal(loaded_ids.numpy(), ids.numpy())


def test_config_round_trip():
    model = tiny("hierarchical", dropout=0.25, capacity_factor=2.0, moe_activation="linear",
                 moe_output_scale=2, expert_dropout=0.2)
    config = model.get_config()
    clone = TranslationModel.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()
    assert (clone.num_groups, clone.dropout, clone.capacity_factor, clone.moe_activation,
            clone.moe_output_scale, clone.expert_dropout) == (2, 0.25, 2.0, "linear", 2.0, 0.2)
    assert clone.get_layer("encoder_moe").experts.dropout == 0.2
    clone.set_weights(model.get_weights())
    assert_allclose(np.asarray(clone((SOURCE, TARGET))), np.asarray(model((SOURCE, TARGET))),
                    atol=1e-6)


def test_decoding_a_model_uses_the_step_api():
    model = tiny()
    ids, scores = decoding.greedy_decode(model, SOURCE, bos_id=1, eos_id=2, min_extra=1)
    # Limits floor(2 * 5) + 1 = 11 and floor(2 * 3) + 1 = 7.
    assert ids.shape == (2, 11)
    # Greedy by hand with decode_step: the same tokens and log-probabilities.
    encoded, state = model.encode(SOURCE), model.initial_decoder_state(2)
    tokens, total = np.array([1, 1]), np.zeros(2)
    for j in range(7):
        logits, _, state = model.decode_step(tokens, state, encoded)
        log_p = np.asarray(tf.nn.log_softmax(logits))
        tokens = log_p.argmax(-1)
        assert_array_equal(ids.numpy()[1, j], tokens[1])
        total += log_p[np.arange(2), tokens]
    assert_allclose(scores.numpy()[1], total[1], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=2), "Received: vocab_size=2"),
        (dict(model_dim=7), "Received: model_dim=7"),  # odd with a bidirectional encoder
        (dict(lstm_units=12), "lstm_units=12"),  # needs a projection
        (dict(lstm_units=12, lstm_projection=6), "lstm_projection=6"),
        (dict(middle_block="conv"), "Received: middle_block='conv'"),
        (dict(attention="dot"), "Received: attention='dot'"),
        (dict(attention_units=0), "Received: attention_units=0"),
        (dict(upper_context=1), "Received: upper_context=1"),
        (dict(bidirectional_encoder="yes"), "Received: bidirectional_encoder='yes'"),
        (dict(dropout=1.0), "Received: dropout=1.0"),
        (dict(moe_activation="relu"), "Received: moe_activation='relu'"),
        (dict(moe_output_scale=0), "Received: moe_output_scale=0"),
        (dict(moe_output_scale=-2.0), "Received: moe_output_scale=-2.0"),
        (dict(moe_output_scale=True), "Received: moe_output_scale=True"),
        (dict(moe_output_scale="4"), "Received: moe_output_scale='4'"),
        (dict(expert_dropout=1.0), "Received: expert_dropout=1.0"),
        (dict(expert_dropout=-0.2), "Received: expert_dropout=-0.2"),
        (dict(num_experts=6, num_groups=4), "num_experts=6, num_groups=4"),
        (dict(num_experts=4, k=5), "Received: k=5"),
        (dict(middle_block="ffn", k=0), "Received: k=0"),
        (dict(expert_hidden_dim=2.5), "Received: expert_hidden_dim=2.5"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"vocab_size": V, "model_dim": D, "num_experts": 4, "expert_hidden_dim": 4, "k": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TranslationModel(**args)


def test_invalid_inputs():
    model = tiny("plain")
    with pytest.raises(ValueError, match="'source' and 'target_in'"):
        model({"source": SOURCE})
    with pytest.raises(ValueError, match="source_ids, target_in_ids"):
        model(SOURCE)
