"""The GNMT-style MoE translation model of Shazeer et al. 2017 (Section 5.3, App. E)."""

import keras
import tensorflow as tf

from keras_moe.models.attention import ATTENTION_TYPES, make_attention
from keras_moe.models.blocks import (
    block_seed,
    check_groups,
    check_moe_activation,
    check_moe_output_scale,
    feed_forward_block,
    moe_block,
    moe_output,
)
from keras_moe.models.lstmp import ProjectedLSTM, ProjectedLSTMCell
from keras_moe.models.softmax import SoftmaxOutput
from keras_moe.validation import check_int, check_rate

MIDDLE_BLOCKS = ("moe", "ffn", "none")


@keras.saving.register_keras_serializable(package="keras_moe")
class TranslationModel(keras.Model):
    """GNMT (Wu et al. 2016) reduced to 3 + 2 LSTM layers, with MoE layers (App. E).

    Encoder: embedding, LSTM 1 (bidirectional as in GNMT: two directions of
    `model_dim / 2` outputs, concatenated), LSTM 2, MoE, LSTM 3. Decoder:
    embedding, LSTM 1 with attention, MoE, LSTM 2, softmax. Every block's
    output goes through dropout and then has the block's input added
    (residual connections "around all LSTM and MoE layers"); an MoE output
    passes through a sigmoid first. Source and target share the vocabulary
    and one embedding matrix (the paper's shared WordPiece vocabulary); the
    output softmax has its own weights (not tied).

    Attention follows GNMT: at target step `j` the bottom decoder LSTM's
    previous output `y_{j-1}` queries the top encoder outputs `x_i`,
    `p_ij = softmax_i A(x_i, y_{j-1})`, and the context `a_j = sum_i p_ij x_i`
    is an input of the bottom LSTM at step `j` (so the bottom LSTM both
    feeds and receives the attention) and, with `upper_context=True`, of
    the upper decoder LSTM (GNMT sends it to "all the remaining decoder
    layers"). `A` is GNMT's additive function or the paper's App. G one
    (`attention="multiplicative_tanh"`, see `keras_moe.models.attention`).
    The decoder starts from zero states.

    The middle blocks are `"moe"` (a flat `keras_moe.MoE`, or with
    `num_groups > 0` a `keras_moe.HierarchicalMoE` of `num_groups` groups,
    `k` per level), `"ffn"` (a dense ReLU block of `k * expert_hidden_dim`
    hidden units: the same multiply-adds per token as `k` experts) or
    `"none"` (the 3 + 2 LSTM model without MoE layers). MoE routing is
    masked: padding positions are not routed and not counted; the
    balancing losses are added in training (`model.losses`) and the routing
    metrics are logged by `fit`.

    Decoding runs one target token at a time with `encode`,
    `initial_decoder_state` and `decode_step` (carried LSTM states; the
    encoder side of the attention is computed once): see
    `keras_moe.models.decoding`.

    Args:
        vocab_size: int >= 3, the shared vocabulary, including padding id 0.
        model_dim: width of the embedding and of every block's output (the
            paper's 512); even when `bidirectional_encoder`.
        lstm_units: LSTM cell width (default `model_dim`).
        lstm_projection: None, or the output projection of the LSTMs
            (`keras_moe.models.lstmp`, the paper's 2048 units projected to
            512), which must equal `model_dim`.
        bidirectional_encoder: bool; the first encoder LSTM is
            bidirectional (GNMT), each direction of `lstm_units` cells
            projected to `model_dim / 2` (without `lstm_projection`: an
            LSTM of `model_dim / 2` cells), outputs concatenated.
        middle_block: `"moe"`, `"ffn"` or `"none"`.
        num_experts: experts of each MoE layer.
        expert_hidden_dim: hidden width of each expert (the paper's 2048).
        k: experts per position; per level for a hierarchical MoE.
        num_groups: 0 for a flat MoE, else the groups of a hierarchical one.
        gating: gating of the MoE layers (see `keras_moe.MoE`; `"batchwise"`
            is App. F's, which the paper used for single-pair models).
        importance_weight, load_weight: balancing loss weights (the paper's
            0.01 for translation).
        capacity_factor: None (dropless) or the MoE capacity factor.
        ffn_hidden_dim: hidden width of `"ffn"` blocks (default
            `k * expert_hidden_dim`).
        attention: `"additive"` (GNMT) or `"multiplicative_tanh"` (App. G).
        attention_units: hidden width `n` of the attention (default
            `model_dim`).
        upper_context: bool, feed the attention context to the upper
            decoder LSTM too (GNMT).
        dropout: float in [0, 1), on the embedding and every block output
            (the paper's 0.4).
        moe_activation: `"sigmoid"` (the paper's, on each MoE output before
            its dropout) or `"linear"` (none, as the `"ffn"` block; an
            ablation).
        moe_output_scale: float > 0, multiplies each MoE output before
            `moe_activation` (1.0, the paper's; `k` takes the gates' `1/k`
            out of the block's step size under Adam, see
            `blocks.moe_output`).
        expert_dropout: float in [0, 1) (default 0), dropout on the hidden
            units of every MoE expert (Switch Transformer's expert dropout;
            see `keras_moe.FeedForwardExperts`) and, so that the
            compute-matched baseline is regularised alike, of every `"ffn"`
            block.
        expert_parallel: bool; the MoE layers' `expert_parallel` (see
            `keras_moe.MoE`): under a `MirroredStrategy` of `R` replicas
            each replica holds `num_experts / R` experts, and the model runs
            only inside the strategy's replicas. Saved files hold all
            experts; reloaded outside a strategy it is a one-device model.
        seed: optional int.
        name: model name.

    Call arguments:
        inputs: `(source_ids [b, s], target_in_ids [b, t])` or a dict with
            keys `"source"` and `"target_in"`; int, 0 = padding (masked).
            `target_in_ids` is the target shifted right (teacher forcing).
        training: bool.
        return_attention: bool; also return the attention probabilities
            `[b, t, s]` (float32).
        return_routing: bool; also return `{layer name: keras_moe.Routing}`
            of the MoE layers.

    Returns:
        Logits `[b, t, vocab_size]` (float32), or `(logits, extras)` where
        `extras` is a dict with `"attention"` and/or `"routing"`.

    Example:

    >>> model = TranslationModel(20, model_dim=8, num_experts=4, expert_hidden_dim=6, k=2)
    >>> source = tf.constant([[5, 6, 7, 2], [8, 2, 0, 0]])
    >>> tuple(model((source, tf.constant([[1, 9, 4], [1, 3, 0]]))).shape)
    (2, 3, 20)
    """

    def __init__(
        self,
        vocab_size,
        model_dim=512,
        lstm_units=None,
        lstm_projection=None,
        bidirectional_encoder=True,
        middle_block="moe",
        num_experts=32,
        expert_hidden_dim=2048,
        k=4,
        num_groups=0,
        gating="noisy_top_k",
        importance_weight=0.01,
        load_weight=0.01,
        capacity_factor=None,
        ffn_hidden_dim=None,
        attention="multiplicative_tanh",
        attention_units=None,
        upper_context=True,
        dropout=0.4,
        expert_parallel=False,
        seed=None,
        name="translation_model",
        moe_activation="sigmoid",
        moe_output_scale=1.0,
        expert_dropout=0.0,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        check_int("vocab_size", vocab_size, 3)
        check_int("model_dim", model_dim, 1)
        check_int("lstm_units", lstm_units, 1, allow_none=True)
        check_int("lstm_projection", lstm_projection, 1, allow_none=True)
        check_int("num_experts", num_experts, 1)
        check_int("expert_hidden_dim", expert_hidden_dim, 1)
        check_int("k", k, 1)
        check_int("num_groups", num_groups, 0)
        check_int("ffn_hidden_dim", ffn_hidden_dim, 1, allow_none=True)
        check_int("attention_units", attention_units, 1, allow_none=True)
        for flag, value in (("bidirectional_encoder", bidirectional_encoder),
                            ("upper_context", upper_context), ("expert_parallel", expert_parallel)):
            if not isinstance(value, bool):
                raise ValueError(f"`{flag}` must be a bool. Received: {flag}={value!r}")
        if middle_block not in MIDDLE_BLOCKS:
            raise ValueError(
                f"`middle_block` must be one of {', '.join(map(repr, MIDDLE_BLOCKS))}. "
                f"Received: middle_block={middle_block!r}"
            )
        if attention not in ATTENTION_TYPES:
            raise ValueError(
                f"`attention` must be one of {', '.join(map(repr, ATTENTION_TYPES))}. "
                f"Received: attention={attention!r}"
            )
        check_rate("dropout", dropout)
        check_rate("expert_dropout", expert_dropout)
        if lstm_projection is None and lstm_units not in (None, model_dim):
            raise ValueError(
                "`lstm_units` must equal `model_dim` unless `lstm_projection` is set (the "
                f"residual needs equal widths). Received: lstm_units={lstm_units}, "
                f"model_dim={model_dim}"
            )
        if lstm_projection is not None and lstm_projection != model_dim:
            raise ValueError(
                "`lstm_projection` must equal `model_dim` (the residual needs equal widths). "
                f"Received: lstm_projection={lstm_projection}, model_dim={model_dim}"
            )
        if bidirectional_encoder and model_dim % 2:
            raise ValueError(
                "`model_dim` must be even with `bidirectional_encoder=True` (two halves). "
                f"Received: model_dim={model_dim}"
            )
        if middle_block == "moe":
            check_groups(num_experts, num_groups)
        check_moe_activation(moe_activation)
        check_moe_output_scale(moe_output_scale)
        self.vocab_size = vocab_size
        self.model_dim = model_dim
        self.lstm_units = lstm_units
        self.lstm_projection = lstm_projection
        self.bidirectional_encoder = bidirectional_encoder
        self.middle_block = middle_block
        self.num_experts = num_experts
        self.expert_hidden_dim = expert_hidden_dim
        self.k = k
        self.num_groups = num_groups
        self.gating = gating
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.capacity_factor = capacity_factor
        self.ffn_hidden_dim = ffn_hidden_dim
        self.attention_type = attention
        self.attention_units = attention_units
        self.upper_context = upper_context
        self.dropout = float(dropout)
        self.moe_activation = moe_activation
        self.moe_output_scale = float(moe_output_scale)
        self.expert_dropout = float(expert_dropout)
        self.expert_parallel = expert_parallel
        self.seed = seed

        # One embedding for source and target: the vocabulary is shared.
        self.embedding = keras.layers.Embedding(
            vocab_size, model_dim, mask_zero=True, name="embedding"
        )
        # One layer for every dropout site: its seed generator advances on
        # each call, so the masks of different sites are independent.
        self.dropout_layer = keras.layers.Dropout(dropout, seed=seed, name="dropout")
        self.encoder_lstm_1 = self._encoder_bottom()
        self.encoder_lstm_2 = self._lstm("encoder_lstm_2", 2)
        self.encoder_middle = self._middle_layer("encoder", 3)
        self.encoder_lstm_3 = self._lstm("encoder_lstm_3", 4)
        self.decoder_lstm_1 = self._cell("decoder_lstm_1", 5)
        self.attention = make_attention(
            attention, attention_units or model_dim, seed=block_seed(self.seed, 6), name="attention"
        )
        self.decoder_middle = self._middle_layer("decoder", 7)
        self.decoder_lstm_2 = self._lstm("decoder_lstm_2", 8)
        self.softmax = SoftmaxOutput(vocab_size, seed=block_seed(self.seed, 9), name="softmax")
        # Weights exist from construction on, so that `count_params`,
        # checkpoint restores and `encode`/`decode_step` work at once.
        self.build()

    def _lstm(self, name, seed_offset, width=None, **kwargs):
        width = width or self.model_dim
        seed = block_seed(self.seed, seed_offset)
        if self.lstm_projection:
            return ProjectedLSTM(self.lstm_units or width, width, seed=seed, name=name, **kwargs)
        return keras.layers.LSTM(width, return_sequences=True, seed=seed, name=name, **kwargs)

    def _encoder_bottom(self):
        if not self.bidirectional_encoder:
            return self._lstm("encoder_lstm_1", 1)
        half = self.model_dim // 2
        forward = self._lstm("forward", 1, width=half)
        backward = self._lstm("backward", 11, width=half, go_backwards=True)
        return keras.layers.Bidirectional(forward, backward_layer=backward, name="encoder_lstm_1")

    def _cell(self, name, seed_offset):
        if self.lstm_projection:
            return ProjectedLSTMCell(
                self.lstm_units or self.model_dim, self.model_dim,
                seed=block_seed(self.seed, seed_offset),
                name=name,
            )
        return keras.layers.LSTMCell(
            self.model_dim, seed=block_seed(self.seed, seed_offset), name=name
        )

    def _middle_layer(self, side, seed_offset):
        name, seed = f"{side}_{self.middle_block}", block_seed(self.seed, seed_offset)
        if self.middle_block == "none":
            return None
        if self.middle_block == "ffn":
            hidden = self.ffn_hidden_dim or self.k * self.expert_hidden_dim
            return feed_forward_block(
                hidden, self.model_dim, name, dropout=self.expert_dropout, seed=seed
            )
        return moe_block(
            self.num_experts, self.num_groups, self.k, name,
            expert_hidden_dim=self.expert_hidden_dim, gating=self.gating,
            importance_weight=self.importance_weight, load_weight=self.load_weight,
            capacity_factor=self.capacity_factor, expert_parallel=self.expert_parallel, seed=seed,
            expert_dropout=self.expert_dropout,
        )

    def build(self, input_shape=None):
        if self.built:
            return
        d = self.model_dim
        sequence = (None, None, d)
        self.embedding.build((None, None))
        for layer in (self.encoder_lstm_1, self.encoder_lstm_2, self.encoder_middle,
                      self.encoder_lstm_3, self.decoder_middle, self.softmax):
            if layer is not None:
                layer.build(sequence)
        # The bottom decoder cell reads [embedding; context].
        self.decoder_lstm_1.build((None, 2 * d))
        self.attention.build((None, d), sequence)
        self.decoder_lstm_2.build((None, None, 2 * d if self.upper_context else d))
        self.built = True

    # ----- encoder -------------------------------------------------------

    def encode(self, source_ids, training=False):
        """Run the encoder once per sentence.

        Args:
            source_ids: int `[b, s]`, 0 = padding.
            training: bool.

        Returns:
            dict: `"memory"` `[b, s, model_dim]` (top encoder outputs),
            `"keys"` `[b, s, attention_units]` (the attention's source
            side), `"mask"` bool `[b, s]`.
        """
        return self._encode(source_ids, training, None)

    def _encode(self, source_ids, training, routings):
        mask = tf.not_equal(source_ids, 0)
        x = self.dropout_layer(self.embedding(source_ids), training=training)
        x = self._residual(self.encoder_lstm_1(x, mask=mask, training=training), x, training)
        x = self._residual(self.encoder_lstm_2(x, mask=mask, training=training), x, training)
        x = self._middle(self.encoder_middle, x, mask, training, routings)
        x = self._residual(self.encoder_lstm_3(x, mask=mask, training=training), x, training)
        return {"memory": x, "keys": self.attention.project_memory(x), "mask": mask}

    def _residual(self, y, x, training):
        return x + self.dropout_layer(y, training=training)

    def _middle(self, layer, x, mask, training, routings):
        if layer is None:
            return x
        if self.middle_block == "ffn":
            return self._residual(layer(x, training=training), x, training)
        if routings is None:
            y = layer(x, training=training, mask=mask)
        else:
            y, routings[layer.name] = layer(x, training=training, mask=mask, return_routing=True)
        return self._residual(moe_output(y, self.moe_activation, self.moe_output_scale), x, training)

    # ----- decoder -------------------------------------------------------

    def initial_decoder_state(self, batch_size):
        """Zero states of both decoder LSTMs.

        Returns:
            `{"bottom": [r [b, model_dim], c [b, cell]], "upper": [...]}`.
        """
        def zeros(cell):
            return [tf.zeros([batch_size, size], self.compute_dtype) for size in cell.state_size]

        return {"bottom": zeros(self.decoder_lstm_1), "upper": zeros(self.decoder_lstm_2.cell)}

    def _bottom_step(self, x, states, encoded):
        """Attention queried by the previous bottom output, then the bottom LSTM step."""
        # states[0] is the cell's previous output (r_{j-1} or h_{j-1}).
        context, probs = self.attention.attend(
            states[0], encoded["memory"], encoded["keys"], encoded["mask"]
        )
        out, new_states = self.decoder_lstm_1(tf.concat([x, context], axis=-1), states)
        return out, list(new_states), context, probs

    def decode_step(self, tokens, state, encoded, training=False):
        """One target step of the decoder, for decoding.

        Equal to `call`'s logits at the same position when fed the same
        previous tokens (teacher forcing), at O(1) cost per step.

        Args:
            tokens: int `[n]`, the previous target token of each row.
            state: as `initial_decoder_state(n)` or a previous step's.
            encoded: `encode`'s dict, rows aligned with `tokens`.
            training: bool.

        Returns:
            `(logits [n, vocab_size] float32, attention [n, s] float32,
            new_state)`.
        """
        x = self.embedding(tokens)
        out, bottom, context, probs = self._bottom_step(x, state["bottom"], encoded)
        x = self._residual(out, x, training)
        # A length-1 sequence: the dense block is built for `[b, t, d]`.
        x = self._middle(self.decoder_middle, x[:, None, :], None, training, None)[:, 0, :]
        upper_in = tf.concat([x, context], axis=-1) if self.upper_context else x
        out, upper = self.decoder_lstm_2.cell(upper_in, state["upper"])
        x = self._residual(out, x, training)
        return self.softmax(x), probs, {"bottom": bottom, "upper": list(upper)}

    def _decode_bottom(self, x, mask, encoded):
        """The bottom decoder LSTM over all target steps: `(out, context, probs)`."""
        time_major = (tf.transpose(x, [1, 0, 2]), tf.transpose(mask))
        batch = tf.shape(x)[0]
        states = self.initial_decoder_state(batch)["bottom"]
        source_len = tf.shape(encoded["memory"])[1]
        first = (
            states,
            tf.zeros([batch, self.model_dim], x.dtype),
            tf.zeros([batch, tf.shape(encoded["memory"])[2]], encoded["memory"].dtype),
            tf.zeros([batch, source_len], tf.float32),
        )

        def step(carry, inputs):
            x_t, m_t = inputs
            out, new_states, context, probs = self._bottom_step(x_t, carry[0], encoded)
            # At a padded target step the state is carried over, as Keras's
            # RNNs do with a mask.
            new_states = [tf.where(m_t[:, None], n, o) for n, o in zip(new_states, carry[0],
                                                                        strict=True)]
            return new_states, out, context, probs

        _, out, context, probs = tf.scan(step, time_major, initializer=first)
        return [tf.transpose(t, [1, 0, 2]) for t in (out, context, probs)]

    def call(self, inputs, training=None, return_attention=False, return_routing=False):
        source_ids, target_ids = _unpack(inputs)
        routings = {} if return_routing else None
        encoded = self._encode(source_ids, training, routings)
        mask = tf.not_equal(target_ids, 0)
        x = self.dropout_layer(self.embedding(target_ids), training=training)
        out, context, probs = self._decode_bottom(x, mask, encoded)
        x = self._residual(out, x, training)
        x = self._middle(self.decoder_middle, x, mask, training, routings)
        upper_in = tf.concat([x, context], axis=-1) if self.upper_context else x
        x = self._residual(self.decoder_lstm_2(upper_in, mask=mask, training=training), x,
                           training)
        logits = self.softmax(x)
        extras = {}
        if return_attention:
            extras["attention"] = probs
        if return_routing:
            extras["routing"] = routings
        return (logits, extras) if extras else logits

    def get_config(self):
        return {
            "vocab_size": self.vocab_size,
            "model_dim": self.model_dim,
            "lstm_units": self.lstm_units,
            "lstm_projection": self.lstm_projection,
            "bidirectional_encoder": self.bidirectional_encoder,
            "middle_block": self.middle_block,
            "num_experts": self.num_experts,
            "expert_hidden_dim": self.expert_hidden_dim,
            "k": self.k,
            "num_groups": self.num_groups,
            "gating": self.gating,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "capacity_factor": self.capacity_factor,
            "ffn_hidden_dim": self.ffn_hidden_dim,
            "attention": self.attention_type,
            "attention_units": self.attention_units,
            "upper_context": self.upper_context,
            "dropout": self.dropout,
            "moe_activation": self.moe_activation,
            "moe_output_scale": self.moe_output_scale,
            "expert_dropout": self.expert_dropout,
            "expert_parallel": self.expert_parallel,
            "seed": self.seed,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("trainable", None)
        config.pop("dtype", None)
        return cls(**config)


def _unpack(inputs):
    """`(source_ids, target_in_ids)` from a pair or a dict."""
    if isinstance(inputs, dict):
        missing = {"source", "target_in"} - set(inputs)
        if missing:
            raise ValueError(
                "A dict input needs the keys 'source' and 'target_in'. "
                f"Received keys: {sorted(inputs)}"
            )
        return inputs["source"], inputs["target_in"]
    if isinstance(inputs, (list, tuple)) and len(inputs) == 2:
        return inputs[0], inputs[1]
    raise ValueError(
        "`inputs` must be (source_ids, target_in_ids) or a dict with 'source' and "
        f"'target_in'. Received: {type(inputs).__name__}"
    )
