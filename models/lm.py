"""The MoE-LSTM language model of Shazeer et al. 2017 (App. C.1) and its baselines."""

import keras
import tensorflow as tf

from keras_moe.models.blocks import (
    block_seed,
    check_groups,
    check_moe_activation,
    check_moe_output_scale,
    feed_forward_block,
    moe_block,
    moe_output,
)
from keras_moe.models.lstmp import ProjectedLSTM
from keras_moe.models.softmax import SoftmaxOutput
from keras_moe.monitoring import find_moe_layers
from keras_moe.validation import check_int, check_rate

BLOCK_TYPES = ("lstm", "moe", "ffn")


@keras.saving.register_keras_serializable(package="keras_moe")
class LanguageModel(keras.Model):
    """Word-level language model: embedding, a stack of blocks, softmax.

    The paper's 1B Word models (App. C.1) are `blocks=("lstm", "moe",
    "lstm")`: every block's output goes through dropout and then has the
    block's input added to it (residual); an MoE block's output passes
    through a sigmoid before its dropout. The computationally matched
    baselines of Table 7 are other block stacks of the same class:
    `("lstm",)` with `lstm_units=2048, lstm_projection=512` (LSTM-2048-512),
    four `"lstm"` blocks (4xLSTM-512), an MoE with one wide or one deep
    expert (MoE-1-Wide, MoE-1-Deep), and `"ffn"`, a dense ReLU block with
    `k * expert_hidden_dim` hidden units (the same multiply-adds per token
    as `k` experts). See `keras_moe.models.presets` for the named models.

    In training with `num_sampled > 0` the loss is a sampled softmax
    (Jean et al. 2015; the paper trains its 793k-word softmax by importance
    sampling): only the target and `num_sampled` log-uniformly drawn words
    are scored. Inference (`model(tokens)`, `evaluate`, `predict`) always
    returns the full logits, so perplexities are exact.

    Args:
        vocab_size: int >= 3, including padding id 0 (masked) and `<eos>`.
        model_dim: width of the embedding, of every block's output and of the
            softmax input (the paper's 512).
        blocks: sequence of `"lstm"`, `"moe"` and `"ffn"`.
        lstm_units: LSTM cell width (default `model_dim`).
        lstm_projection: None, or the projection width of a projected LSTM
            (Sak et al. 2014), which must equal `model_dim`.
        num_experts: experts of each MoE block.
        expert_hidden_dim: hidden width of each expert.
        expert_hidden_layers: hidden layers per expert (1 in the paper,
            4 for MoE-1-Deep).
        k: experts per position; per level for a hierarchical MoE.
        num_groups: 0 for a flat MoE; otherwise a hierarchical MoE (App. B)
            of `num_groups` groups of `num_experts // num_groups` experts.
        gating: gating rule of the MoE blocks (see `keras_moe.MoE`).
        importance_weight, load_weight: balancing loss weights (Eq. 7, 11).
        capacity_factor: None (dropless) or the MoE capacity factor.
        ffn_hidden_dim: hidden width of `"ffn"` blocks (default
            `k * expert_hidden_dim`).
        dropout: float in [0, 1), after every block and the embedding.
        moe_activation: `"sigmoid"` (the paper's: an MoE block's output
            passes through a sigmoid before its dropout) or `"linear"` (no
            activation, as the `"ffn"` block; an ablation of that choice).
        moe_output_scale: float > 0, multiplies each MoE output before
            `moe_activation` (1.0, the paper's; `k` takes the gates' `1/k`
            out of the block's step size under Adam, see
            `blocks.moe_output`).
        expert_dropout: float in [0, 1) (default 0), dropout on the hidden
            units of every MoE expert (Switch Transformer's expert dropout;
            see `keras_moe.FeedForwardExperts`) and, so that the
            compute-matched baseline is regularised alike, of every `"ffn"`
            block.
        pool_size: None (default: no pools), or an int: document pools
            (EMO; see `keras_moe.pools`) in every MoE block, with each batch
            row one document (`pool_by="row"`): the row's tokens route
            within its top `pool_size` experts (groups, for a hierarchical
            MoE), the pool size of inference calls. `k <= pool_size <=
            num_experts` (`num_groups`).
        pool_size_range: None, or `(low, high)`: the pool size drawn
            uniformly from `[low, high]` at each training call (EMO's
            varying pool size), `k <= low <= high <= num_experts`; needs
            `pool_size`.
        num_sampled: 0 for a full softmax in training, else the number of
            sampled negative words.
        unroll: bool, unroll the LSTMs (faster on CPU for short windows).
        expert_parallel: bool; the MoE blocks' `expert_parallel` (see
            `keras_moe.MoE`): built under a `MirroredStrategy` of `R`
            replicas, each replica holds `num_experts / R` experts, and the
            model then runs only inside the strategy's replicas (`fit`,
            `predict`, `evaluate`, `strategy.run`). A saved model holds all
            experts and reloads outside a strategy as a one-device model.
        seed: optional int.
        name: model name.

    Call arguments:
        tokens: int `[batch, time]`, 0 = padding (masked).
        training: bool.
        return_hidden: bool; return the softmax input `[batch, time,
            model_dim]` instead of the logits.
        return_routing: bool; also return a dict mapping each MoE block's
            name to its `keras_moe.Routing` for this call.

    Returns:
        Logits `[batch, time, vocab_size]` (float32), or `(logits, routings)`
        with `return_routing=True`.

    Example:

    >>> model = LanguageModel(100, model_dim=16, num_experts=4, expert_hidden_dim=8, k=2)
    >>> tuple(model(keras.ops.ones((2, 5), dtype="int32")).shape)
    (2, 5, 100)
    """

    def __init__(
        self,
        vocab_size,
        model_dim=512,
        blocks=("lstm", "moe", "lstm"),
        lstm_units=None,
        lstm_projection=None,
        num_experts=32,
        expert_hidden_dim=1024,
        expert_hidden_layers=1,
        k=4,
        num_groups=0,
        gating="noisy_top_k",
        importance_weight=0.1,
        load_weight=0.1,
        capacity_factor=None,
        ffn_hidden_dim=None,
        dropout=0.1,
        num_sampled=0,
        unroll=False,
        expert_parallel=False,
        seed=None,
        name="language_model",
        moe_activation="sigmoid",
        moe_output_scale=1.0,
        expert_dropout=0.0,
        pool_size=None,
        pool_size_range=None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        check_int("vocab_size", vocab_size, 3)
        check_int("model_dim", model_dim, 1)
        check_int("lstm_units", lstm_units, 1, allow_none=True)
        check_int("lstm_projection", lstm_projection, 1, allow_none=True)
        check_int("num_groups", num_groups, 0)
        check_int("ffn_hidden_dim", ffn_hidden_dim, 1, allow_none=True)
        check_int("num_sampled", num_sampled, 0)
        blocks = tuple(blocks) if isinstance(blocks, (list, tuple)) else blocks
        if not isinstance(blocks, tuple) or not blocks or any(b not in BLOCK_TYPES for b in blocks):
            raise ValueError(
                f"`blocks` must be a non-empty sequence of {', '.join(map(repr, BLOCK_TYPES))}. "
                f"Received: blocks={blocks!r}"
            )
        check_rate("dropout", dropout)
        check_rate("expert_dropout", expert_dropout)
        check_moe_activation(moe_activation)
        check_moe_output_scale(moe_output_scale)
        units = lstm_units or model_dim
        if lstm_projection is None and units != model_dim:
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
        check_groups(num_experts, num_groups)
        if num_sampled >= vocab_size:
            raise ValueError(
                f"`num_sampled` must be < vocab_size={vocab_size}. Received: num_sampled={num_sampled}"
            )
        self.vocab_size = vocab_size
        self.model_dim = model_dim
        self.blocks = blocks
        self.lstm_units = lstm_units
        self.lstm_projection = lstm_projection
        self.num_experts = num_experts
        self.expert_hidden_dim = expert_hidden_dim
        self.expert_hidden_layers = expert_hidden_layers
        self.k = k
        self.num_groups = num_groups
        self.gating = gating
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.capacity_factor = capacity_factor
        self.ffn_hidden_dim = ffn_hidden_dim
        self.dropout = float(dropout)
        self.moe_activation = moe_activation
        self.moe_output_scale = float(moe_output_scale)
        self.expert_dropout = float(expert_dropout)
        self.num_sampled = num_sampled
        self.unroll = bool(unroll)
        if not isinstance(expert_parallel, bool):
            raise ValueError(
                f"`expert_parallel` must be a bool. Received: expert_parallel={expert_parallel!r}"
            )
        self.expert_parallel = expert_parallel
        self.seed = seed
        if pool_size_range is not None and not isinstance(pool_size_range, (list, tuple)):
            raise ValueError(
                "`pool_size_range` must be a pair (low, high) or None. "
                f"Received: pool_size_range={pool_size_range!r}"
            )
        if pool_size is not None and "moe" not in blocks:
            raise ValueError(
                f"`pool_size` needs an 'moe' block; blocks={list(blocks)!r} have none. "
                f"Received: pool_size={pool_size!r}"
            )
        self.pool_size = pool_size
        self.pool_size_range = None if pool_size_range is None else tuple(pool_size_range)

        self.embedding = keras.layers.Embedding(
            vocab_size, model_dim, mask_zero=True, name="embedding"
        )
        # Every dropout site and every block gets its own seed: Dropout
        # layers built with one seed draw the same mask at every call, which
        # would drop the same units of the residual stream at every site, and
        # blocks of one shape would start with equal weights.
        self.embedding_dropout = keras.layers.Dropout(
            dropout, seed=block_seed(self.seed, 0, 50), name="embedding_dropout"
        )
        self.block_layers = []
        self.block_dropouts = []
        names = _block_names(blocks)
        for index, (block, block_name) in enumerate(zip(blocks, names, strict=True)):
            self.block_layers.append(
                self._make_block(block, block_name, block_seed(self.seed, index + 1))
            )
            self.block_dropouts.append(
                keras.layers.Dropout(
                    dropout, seed=block_seed(self.seed, index + 1, 50),
                    name=f"{block_name}_dropout",
                )
            )
        self.softmax = SoftmaxOutput(vocab_size, num_sampled=num_sampled, seed=seed, name="softmax")
        # Weights exist from construction on, as in a functional model, so that
        # `count_params`, checkpoint restores and weight surgery work at once.
        self.build((None, None))

    def _make_block(self, block, name, seed):
        if block == "lstm":
            if self.lstm_projection:
                return ProjectedLSTM(
                    self.lstm_units or self.model_dim, self.lstm_projection,
                    unroll=self.unroll, seed=seed, name=name,
                )
            return keras.layers.LSTM(
                self.model_dim, return_sequences=True, unroll=self.unroll, seed=seed,
                name=name,
            )
        if block == "ffn":
            hidden = self.ffn_hidden_dim or self.k * self.expert_hidden_dim
            return feed_forward_block(
                hidden, self.model_dim, name, dropout=self.expert_dropout, seed=seed
            )
        return moe_block(
            self.num_experts, self.num_groups, self.k, name,
            expert_hidden_dim=self.expert_hidden_dim, gating=self.gating,
            importance_weight=self.importance_weight, load_weight=self.load_weight,
            capacity_factor=self.capacity_factor, expert_hidden_layers=self.expert_hidden_layers,
            expert_parallel=self.expert_parallel, seed=seed,
            expert_dropout=self.expert_dropout, pool_size=self.pool_size,
            pool_size_range=self.pool_size_range, pool_by="row",
        )

    def build(self, input_shape=(None, None)):
        if self.built:
            return
        width = self.model_dim
        for layer, shape in [(self.embedding, input_shape)] + [
            (layer, (None, None, width)) for layer in [*self.block_layers, self.softmax]
        ]:
            if not layer.built:
                layer.build(shape)
        self.built = True

    def call(self, tokens, training=None, return_hidden=False, return_routing=False):
        mask = tf.not_equal(tokens, 0)
        x = self.embedding_dropout(self.embedding(tokens), training=training)
        routings = {}
        for block, layer, dropout in zip(self.blocks, self.block_layers, self.block_dropouts,
                                         strict=True):
            if block == "ffn":
                y = layer(x, training=training)
            elif block == "moe" and return_routing:
                y, routings[layer.name] = layer(
                    x, training=training, mask=mask, return_routing=True
                )
            else:
                y = layer(x, training=training, mask=mask)
            if block == "moe":
                y = moe_output(y, self.moe_activation, self.moe_output_scale)
            x = dropout(y, training=training) + x
        out = x if return_hidden else self.softmax(x)
        return (out, routings) if return_routing else out

    def train_step(self, data):
        """Keras's step, or with `num_sampled > 0` one on the sampled softmax loss."""
        if not self.num_sampled:
            return super().train_step(data)
        # Keras lists the metrics passed to `compile` as one entry of `metrics`,
        # named "compile_metrics" (as `metrics_names` shows). (Overriding
        # `compile` to note them would stop `load_model` from compiling.)
        if "compile_metrics" in self.metrics_names:
            raise ValueError(
                "compiled metrics need the full logits, which training with `num_sampled="
                f"{self.num_sampled}` never computes; compile without `metrics` and "
                "`weighted_metrics` (validation uses the full softmax)"
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            hidden = self(x, training=True, return_hidden=True)
            loss = self.softmax.sampled_loss(hidden, y, sample_weight)
            if self.losses:
                loss += tf.add_n([tf.cast(term, loss.dtype) for term in self.losses])
            # Gradients are summed over replicas, so each replica's loss is
            # scaled by 1/replicas as Keras does for its own losses.
            scaled = self.optimizer.scale_loss(loss / replicas)
        variables = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables, strict=True))
        # Keras's own loss tracker (the `metrics` entry named "loss", which
        # `fit` reads its `loss` log from) gets the sampled loss, weighted by
        # the batch size as Keras weights it: `loss` is then logged exactly as
        # in the full-softmax path, and `evaluate` keeps its full-softmax loss.
        tracker = next(m for m in self.metrics if m.name == "loss")
        tracker.update_state(loss, sample_weight=tf.shape(x)[0])
        # Compiled metrics need the full logits, which this step never builds;
        # the routing metrics of the MoE layers are reported as usual.
        logs = {"loss": tracker.result()}
        for layer in find_moe_layers(self):
            logs.update({m.name: m.result() for m in layer.metrics})
        return logs


    def get_config(self):
        config = {
            "vocab_size": self.vocab_size,
            "model_dim": self.model_dim,
            "blocks": list(self.blocks),
            "lstm_units": self.lstm_units,
            "lstm_projection": self.lstm_projection,
            "num_experts": self.num_experts,
            "expert_hidden_dim": self.expert_hidden_dim,
            "expert_hidden_layers": self.expert_hidden_layers,
            "k": self.k,
            "num_groups": self.num_groups,
            "gating": self.gating,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "capacity_factor": self.capacity_factor,
            "ffn_hidden_dim": self.ffn_hidden_dim,
            "dropout": self.dropout,
            "moe_activation": self.moe_activation,
            "moe_output_scale": self.moe_output_scale,
            "expert_dropout": self.expert_dropout,
            "pool_size": self.pool_size,
            "pool_size_range": (None if self.pool_size_range is None
                                else list(self.pool_size_range)),
            "num_sampled": self.num_sampled,
            "unroll": self.unroll,
            "expert_parallel": self.expert_parallel,
            "seed": self.seed,
            "name": self.name,
        }
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("trainable", None)
        config.pop("dtype", None)
        return cls(**config)


def _block_names(blocks):
    """`lstm_1, moe, lstm_2`: numbered per type when a type occurs more than once."""
    names, seen = [], {}
    for block in blocks:
        seen[block] = seen.get(block, 0) + 1
        names.append(block if blocks.count(block) == 1 else f"{block}_{seen[block]}")
    return names


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
    """The paper's LSTM, MoE, LSTM model, or with `moe=False` its dense baseline.

    A shorthand for `LanguageModel(blocks=("lstm", "moe", "lstm"))`; with
    `moe=False` the MoE is replaced by a dense ReLU block of `k *
    expert_hidden_dim` hidden units (the same per-token multiply-adds).

    Example:

    >>> model = moe_lstm_language_model(100, model_dim=16, num_experts=4,
    ...                                 expert_hidden_dim=8, k=2)
    >>> tuple(model(keras.ops.ones((2, 5), dtype="int32")).shape)
    (2, 5, 100)
    """
    return LanguageModel(
        vocab_size, model_dim=model_dim, blocks=("lstm", "moe" if moe else "ffn", "lstm"),
        num_experts=num_experts, expert_hidden_dim=expert_hidden_dim, k=k, dropout=dropout,
        importance_weight=importance_weight, load_weight=load_weight, seed=seed, name=name,
    )
