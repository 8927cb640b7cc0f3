"""Tests of keras_moe.models.lm.moe_lstm_language_model (tiny sizes, CPU)."""

import keras
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import keras_moe
from keras_moe.models.lm import LanguageModel, moe_lstm_language_model

V, D, E, H, K = 30, 8, 4, 6, 2


def tiny(**kwargs):
    args = dict(model_dim=D, num_experts=E, expert_hidden_dim=H, k=K, seed=3)
    args.update(kwargs)
    return moe_lstm_language_model(V, **args)


def randomize_gating(model, seed=0):
    """Non-zero gating weights (they start at zero), so routing depends on the input."""
    gating = model.get_layer("moe").gating
    gating.w_gate.assign(np.random.default_rng(seed).normal(size=gating.w_gate.shape) * 2.0)


TOKENS = np.array([[5, 9, 2, 17, 1, 29, 3], [4, 4, 4, 8, 2, 11, 6]], np.int32)


def test_output_shape_and_dtype():
    model = tiny()
    logits = model(TOKENS, training=False)
    assert tuple(logits.shape) == (2, 7, V)
    assert np.isfinite(np.asarray(logits)).all()
    assert tuple(model(TOKENS[:, :3], training=False).shape) == (2, 3, V)


def test_has_moe_layer_with_requested_configuration():
    model = tiny(importance_weight=0.3, load_weight=0.2)
    moe = model.get_layer("moe")
    assert isinstance(moe, keras_moe.MoE)
    assert (moe.num_experts, moe.k, moe.expert_hidden_dim) == (E, K, H)
    assert (moe.importance_weight, moe.load_weight) == (0.3, 0.2)
    assert sum(isinstance(layer, keras_moe.MoE) for layer in model.layers) == 1


def test_moe_parameter_count_matches_formula():
    model = tiny()
    model(TOKENS[:, :2], training=False)
    experts = E * (D * H + H + H * D + D)
    gating = 2 * D * E  # w_gate and w_noise, d x E each
    assert model.get_layer("moe").count_params() == experts + gating == 4 * 110 + 64


def test_whole_model_parameter_count_matches_formula():
    model = tiny()
    embedding = V * D
    lstm = 4 * (D * D + D * D + D)  # input, recurrent kernels and bias per gate
    moe = E * (D * H + H + H * D + D) + 2 * D * E
    softmax = D * V + V
    assert model.count_params() == embedding + 2 * lstm + moe + softmax


def test_dense_baseline_has_no_moe_and_k_times_hidden_units():
    model = tiny(moe=False)
    assert not any(isinstance(layer, keras_moe.MoE) for layer in model.layers)
    with pytest.raises(ValueError):
        model.get_layer("moe")
    ffn_in, ffn_out = model.get_layer("ffn").get_layer("ffn_in"), model.get_layer("ffn").get_layer(
        "ffn_out"
    )
    assert ffn_in.units == K * H
    assert ffn_out.units == D
    model(TOKENS[:, :2], training=False)
    # Same per-token compute as k experts of width H: d*kH + kH + kH*d + d.
    ffn = ffn_in.count_params() + ffn_out.count_params()
    assert ffn == D * K * H + K * H + K * H * D + D
    assert tuple(model(TOKENS, training=False).shape) == (2, 7, V)


def test_padding_positions_are_not_routed():
    model = tiny()
    randomize_gating(model)
    moe = model.get_layer("moe")
    seen = []
    original_call = moe.call

    def spy(inputs, training=None, mask=None):
        y, routing = original_call(inputs, training=training, mask=mask, return_routing=True)
        seen.append((mask, routing))
        return y

    moe.call = spy
    tokens = np.array([[7, 3, 12, 0, 0], [9, 0, 0, 0, 0], [4, 5, 6, 7, 8]], np.int32)
    model(tokens, training=False)
    assert len(seen) == 1
    mask, routing = seen[0]
    assert mask is not None, "the embedding's padding mask does not reach the MoE layer"
    real = tokens != 0
    assert_array_equal(np.asarray(mask), real)
    indices = np.asarray(routing.expert_indices)
    assert (indices[~real] == -1).all()
    assert ((indices[real] >= 0) & (indices[real] < E)).all()
    assert_allclose(np.asarray(routing.gates)[~real], 0.0)
    # 9 real positions, k = 2 experts each.
    assert float(np.sum(routing.counts)) == 9 * K


def test_trailing_padding_does_not_change_real_positions():
    model = tiny()
    randomize_gating(model)
    short = np.array([[7, 3, 12], [9, 1, 2]], np.int32)
    padded = np.concatenate([short, np.zeros((2, 4), np.int32)], axis=1)
    a = np.asarray(model(short, training=False))
    b = np.asarray(model(padded, training=False))
    assert_allclose(b[:, :3], a, rtol=1e-5, atol=1e-6)


def test_training_adds_the_balancing_loss():
    model = tiny()
    model(TOKENS, training=True)
    assert len(model.losses) == 1
    assert np.isfinite(float(model.losses[0])) and float(model.losses[0]) >= 0.0


def test_keras_save_and_reload_predicts_identically(tmp_path):
    model = tiny()
    randomize_gating(model)
    before = np.asarray(model(TOKENS, training=False))
    path = tmp_path / "lm.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("moe"), keras_moe.MoE)
    assert_array_equal(
        np.asarray(loaded.get_layer("moe").gating.w_gate),
        np.asarray(model.get_layer("moe").gating.w_gate),
    )
    after = np.asarray(loaded(TOKENS, training=False))
    assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab_size", [1, 0, -5, 2.5, "100", None])
def test_invalid_vocab_size_is_named(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        moe_lstm_language_model(vocab_size, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K)


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.1])
def test_invalid_dropout_is_named(dropout):
    with pytest.raises(ValueError, match="dropout"):
        moe_lstm_language_model(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K,
                                dropout=dropout)


def test_invalid_moe_arguments_are_named():
    with pytest.raises(ValueError, match="`k`"):
        moe_lstm_language_model(V, model_dim=D, num_experts=2, expert_hidden_dim=H, k=3)


@pytest.mark.parametrize("activation, scale", [("sigmoid", 1.0), ("linear", 1.0),
                                               ("linear", 4.0), ("sigmoid", 0.5)])
def test_hidden_state_is_the_residual_stack_by_hand(activation, scale):
    # App. C.1 without dropout: x1 = e + lstm_1(e); x2 = x1 + sigmoid(s * moe(x1))
    # (or x1 + s * moe(x1) for the "linear" ablation; s = moe_output_scale,
    # the paper's 1); x3 = x2 + lstm_2(x2).
    model = LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K, seed=3,
                          moe_activation=activation, moe_output_scale=scale)
    randomize_gating(model)
    mask = TOKENS != 0
    x = model.get_layer("embedding")(TOKENS)
    x = x + model.get_layer("lstm_1")(x, mask=mask)
    y = scale * np.asarray(model.get_layer("moe")(x, mask=mask))
    x = x + (1.0 / (1.0 + np.exp(-y)) if activation == "sigmoid" else y)
    x = x + model.get_layer("lstm_2")(x, mask=mask)
    hidden = model(TOKENS, training=False, return_hidden=True)
    assert_allclose(np.asarray(hidden), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_moe_activation_round_trips_and_bad_values_are_named():
    model = LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K,
                          moe_activation="linear")
    assert LanguageModel.from_config(model.get_config()).moe_activation == "linear"
    with pytest.raises(ValueError, match="moe_activation.*'relu'"):
        LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K,
                      moe_activation="relu")


@pytest.mark.parametrize("block", ["moe", "ffn"])
def test_expert_dropout_reaches_the_middle_block_and_only_in_training(block):
    # The MoE's experts get it, and so does the dense twin's hidden layer.
    args = dict(model_dim=D, num_experts=E, expert_hidden_dim=H, k=K, seed=3, dropout=0.0,
                blocks=("lstm", block, "lstm"))
    model = LanguageModel(V, expert_dropout=0.5, **args)
    plain = LanguageModel(V, **args)
    plain.set_weights(model.get_weights())
    if block == "moe":
        randomize_gating(model)
        randomize_gating(plain)
        assert model.get_layer("moe").experts.dropout == 0.5
    else:
        assert model.get_layer("ffn").get_layer("ffn_dropout").rate == 0.5
    clone = LanguageModel.from_config(model.get_config())
    assert clone.expert_dropout == 0.5 and clone.get_config() == model.get_config()
    # Inference: exactly the model without it. Training (model dropout 0,
    # gating noise aside): only the expert dropout makes the outputs differ.
    assert_allclose(np.asarray(model(TOKENS, training=False)),
                    np.asarray(plain(TOKENS, training=False)), rtol=1e-6, atol=1e-6)
    gap = np.abs(np.asarray(model(TOKENS, training=True, return_hidden=True))
                 - np.asarray(plain(TOKENS, training=True, return_hidden=True)))
    assert gap.max() > 1e-3
    for bad in (-0.1, 1.0, True, "0.3", None):
        with pytest.raises(ValueError, match=f"expert_dropout.*Received: expert_dropout={bad!r}"):
            LanguageModel(V, expert_dropout=bad, **args)


def test_dropout_sites_draw_independent_masks_and_blocks_start_apart():
    # With a seed, every dropout site has its own: at rate 0.5 two sites'
    # masks agree on about half the units (they agreed on all of them when
    # every site was built with the same seed), and two projected LSTMs of
    # the same shape start with different weights.
    model = LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K, seed=3,
                          dropout=0.5, lstm_units=12, lstm_projection=D)
    ones = np.ones((8, 7, D), np.float32)
    sites = [model.embedding_dropout, *model.block_dropouts]
    masks = [np.asarray(site(ones, training=True)) > 0 for site in sites]
    for i in range(len(masks)):
        for j in range(i):
            agreement = (masks[i] == masks[j]).mean()
            # 448 units: four binomial standard deviations of 0.5 are 0.095.
            assert abs(agreement - 0.5) < 0.095, (i, j, agreement)
    first, second = model.get_layer("lstm_1"), model.get_layer("lstm_2")
    assert not np.allclose(np.asarray(first.weights[0]), np.asarray(second.weights[0]))


def test_moe_output_scale_round_trips_and_bad_values_are_named():
    model = LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K,
                          moe_output_scale=4)
    clone = LanguageModel.from_config(model.get_config())
    assert clone.moe_output_scale == 4.0 and clone.get_config() == model.get_config()
    for bad in (0, -1.5, float("inf"), float("nan"), False, "4", None):
        with pytest.raises(ValueError, match=f"moe_output_scale.*Received: moe_output_scale={bad!r}"):
            LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K,
                          moe_output_scale=bad)


def test_sampled_softmax_fit_logs_the_per_epoch_mean_loss_and_routing_metrics():
    # The sampled step feeds Keras's loss tracker (found through `metrics`); `fit`
    # resets it at each epoch, so epoch 2's loss covers epoch 2 only.
    model = LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K, seed=3,
                          num_sampled=5)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: every epoch sees the same model
    x = np.random.default_rng(0).integers(1, V, size=(12, 7)).astype("int32")
    y = np.roll(x, -1, axis=1)
    seen = []

    class Batches(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(float(logs["loss"]))

    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                        callbacks=[Batches()])
    # 3 batches of 4 rows per epoch, counted once: a tracker never reset would hold 24.
    tracker = next(m for m in model.metrics if m.name == "loss")
    assert float(tracker.count.numpy()) == 12
    # The epoch's loss is the running mean at its last batch.
    assert history.history["loss"] == pytest.approx([seen[2], seen[5]], rel=1e-6)
    # The MoE layer's routing metrics reach the logs of the sampled step.
    assert "moe_cv_load" in history.history
    # `evaluate` reports the full softmax's cross-entropy, not the sampled step's mean.
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    logits = model(x, training=False)
    full = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert model.evaluate(x, y, batch_size=12, verbose=0, return_dict=True)["loss"] \
        == pytest.approx(float(full) + sum(float(v) for v in model.losses), rel=1e-4)


def test_sampled_softmax_refuses_compiled_metrics_by_name():
    # Metrics need the full logits, which the sampled step never builds.
    model = LanguageModel(V, model_dim=D, num_experts=E, expert_hidden_dim=H, k=K, seed=3,
                          num_sampled=5)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), weighted_metrics=["accuracy"])
    x = np.ones((4, 7), "int32")
    with pytest.raises(ValueError, match="num_sampled=5"):
        model.fit(x, x, epochs=1, verbose=0)
