"""The MoE-LSTM language model of Shazeer et al. 2017 (App. C.1)."""

import keras

import keras_moe


def moe_lstm_language_model(
    vocab_size,
    model_dim=512,
    num_experts=32,
    expert_hidden_dim=1024,
    k=4,
    dropout=0.1,
    importance_weight=0.1,
    load_weight=0.1,
    moe=True,
    seed=None,
    name="moe_lstm_lm",
):
    """Word-level language model: embedding, LSTM, MoE, LSTM, softmax.

    The architecture of the paper's 1B Word models (App. C.1): every layer's
    output goes through dropout and then has the layer's input added to it
    (residual); the MoE output passes through a sigmoid before its dropout.
    With `moe=False` the MoE is replaced by a dense feed-forward block of the
    same per-token compute (`k * expert_hidden_dim` hidden units), the
    computationally matched baseline.

    Args:
        vocab_size: int, including padding id 0 (masked) and `<eos>`.
        model_dim: width of the embedding, the LSTMs and the MoE (paper 512).
        num_experts: int, experts of the MoE layer.
        expert_hidden_dim: int, hidden width of each expert.
        k: int, experts per position.
        dropout: float in [0, 1).
        importance_weight, load_weight: balancing loss weights.
        moe: bool, False for the compute-matched dense baseline.
        seed: optional int.
        name: model name.

    Returns:
        A functional `keras.Model` mapping int token ids `[batch, time]`
        (0 = padding, masked) to logits `[batch, time, vocab_size]`.

    Example:

    >>> model = moe_lstm_language_model(100, model_dim=16, num_experts=4,
    ...                                 expert_hidden_dim=8, k=2)
    >>> tuple(model(keras.ops.ones((2, 5), dtype="int32")).shape)
    (2, 5, 100)
    """
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"`vocab_size` must be an integer >= 2. Received: vocab_size={vocab_size}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, model_dim, mask_zero=True, name="embedding")(tokens)

    def residual(layer_output, layer_input, tag):
        dropped = keras.layers.Dropout(dropout, seed=seed, name=f"{tag}_dropout")(layer_output)
        return keras.layers.Add(name=f"{tag}_residual")([dropped, layer_input])

    h = keras.layers.LSTM(model_dim, return_sequences=True, seed=seed, name="lstm_1")(x)
    h = residual(h, x, "lstm_1")
    if moe:
        m = keras_moe.MoE(
            num_experts, expert_hidden_dim, k=k, importance_weight=importance_weight,
            load_weight=load_weight, seed=seed, name="moe",
        )(h)
    else:
        m = keras.layers.Dense(k * expert_hidden_dim, activation="relu", name="ffn_in")(h)
        m = keras.layers.Dense(model_dim, name="ffn_out")(m)
    m = keras.layers.Activation("sigmoid", name="moe_sigmoid")(m)
    h2 = residual(m, h, "moe")
    h3 = keras.layers.LSTM(model_dim, return_sequences=True, seed=seed, name="lstm_2")(h2)
    h3 = residual(h3, h2, "lstm_2")
    logits = keras.layers.Dense(vocab_size, name="softmax")(h3)
    return keras.Model(tokens, logits, name=name)
