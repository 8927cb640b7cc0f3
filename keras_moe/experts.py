"""A bank of independent feed-forward experts with stacked weights."""

import math

import keras
import tensorflow as tf

from keras_moe import expert_parallel as ep
from keras_moe import grouped, recompute
from keras_moe.validation import check_int, check_rate


def _per_expert_glorot(fan_in, fan_out, seed):
    # Keras's GlorotUniform would count the expert axis into both fans for a
    # [E, d, h] kernel; each expert is its own d -> h matrix.
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return keras.initializers.RandomUniform(-limit, limit, seed=seed)


@keras.saving.register_keras_serializable(package="keras_moe")
class FeedForwardExperts(keras.layers.Layer):
    """`E` feed-forward experts `E_i(x) = act(x W_in_i + b_in_i) W_out_i + b_out_i`.

    The experts of the paper (Section 2.1, App. C): one hidden layer with a
    ReLU, each with its own parameters. Weights are stored stacked so that
    the layer has four variables (six for deep experts) whatever `E` is:
    `w_in [E, d, h]`, `b_in [E, h]`, `w_out [E, h, out]`, `b_out [E, out]`.

    Deep experts (the paper's MoE-1-Deep, App. C.1, has 4 hidden layers):
    with `L = num_hidden_layers > 1` each expert is
    `h_1 = act(x W_in + b_in)`, `h_{l+1} = act(h_l W_l + b_l)` for
    `l = 1 .. L-1`, `E_i(x) = h_L W_out + b_out`; the `L - 1` extra
    `h x h` layers are two more stacked variables,
    `w_hidden [E, L-1, h, h]` and `b_hidden [E, L-1, h]`.

    Two ways to evaluate them:
    - `call(x)` with `x: [E, C, d]` (each expert's own rows, e.g. a static
      capacity buffer) runs one batched matmul per layer;
    - `apply_partitioned(parts)` with a list of `E` tensors `[n_e, d]` of
      different lengths runs expert `e` on exactly its `n_e` rows, so the
      work is proportional to the rows routed, not to `E`.

    Args:
        num_experts: int >= 1.
        hidden_dim: int >= 1, `h`.
        output_dim: int >= 1 or None (then equal to the input width).
        activation: hidden activation, name or callable (default `"relu"`).
        use_bias: bool.
        seed: optional int seed of the initializers.
        num_hidden_layers: int >= 1, `L`, hidden layers of width `h` per expert.
        dropout: float in [0, 1) (default 0), dropout on every hidden
            layer's activations in training: Switch Transformer's "expert
            dropout" (Fedus et al. 2021, "Regularizing large sparse
            models"), which regularises the experts' extra parameters when
            the data are small. Applied after the activation and inverted,
            as `keras.layers.Dropout` is: kept units are scaled by
            `1 / (1 - dropout)`.
        recompute_hidden: bool (default False). Keep only the experts'
            inputs for the backward pass and compute their hidden
            activations again there (App. D): less memory (no `[rows, h]`
            activations kept per layer) for one more expert forward pass
            per step. Outputs and gradients are unchanged; see
            `keras_moe.recompute`.
        expert_parallel: bool. Built under a `MirroredStrategy` of `R > 1`
            replicas, each replica then holds `E / R` experts (variables of
            shape `[E / R, ...]`, replica `r`'s component holding experts
            `r E / R ...`), and the layer must be called through
            `keras_moe.expert_parallel.expert_parallel_dispatch` (the MoE
            layers do); train it with its optimizer wrapped in
            `keras_moe.ExpertParallelOptimizer`. Saved files hold all `E`
            experts either way, so a model saved from `R` replicas reloads
            on one device and back.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `[E, C, d]`.
        training: bool; `dropout` applies only in training.

    Returns:
        `[E, C, output_dim]`.

    Example:

    >>> experts = FeedForwardExperts(num_experts=3, hidden_dim=16, output_dim=4)
    >>> experts(tf.ones([3, 5, 8])).shape
    TensorShape([3, 5, 4])
    >>> deep = FeedForwardExperts(num_experts=3, hidden_dim=16, num_hidden_layers=3)
    >>> deep(tf.ones([3, 5, 8])).shape, tuple(deep.w_hidden.shape)
    (TensorShape([3, 5, 8]), (3, 2, 16, 16))
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        output_dim=None,
        activation="relu",
        use_bias=True,
        seed=None,
        num_hidden_layers=1,
        expert_parallel=False,
        dropout=0.0,
        recompute_hidden=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_rate("dropout", dropout)
        if not isinstance(recompute_hidden, bool):
            raise ValueError(
                f"`recompute_hidden` must be a bool. Received: recompute_hidden={recompute_hidden!r}"
            )
        self.recompute_hidden = recompute_hidden
        self.dropout = float(dropout)
        # Only a layer with dropout gets a seed generator, so a layer without
        # keeps exactly the state (and saved files) it had before.
        self.seed_generator = None
        if self.dropout:
            seed4 = None if seed is None else seed + 3
            self.seed_generator = keras.random.SeedGenerator(seed4)
        if not isinstance(expert_parallel, bool):
            raise ValueError(
                f"`expert_parallel` must be a bool. Received: expert_parallel={expert_parallel!r}"
            )
        self.expert_parallel = expert_parallel
        self.num_shards = 1
        check_int("num_experts", num_experts)
        check_int("hidden_dim", hidden_dim)
        check_int("output_dim", output_dim, allow_none=True)
        check_int("num_hidden_layers", num_hidden_layers)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.num_hidden_layers = num_hidden_layers
        self.output_dim = output_dim
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.seed = seed

    def build(self, input_shape):
        d = input_shape[-1]
        out = self.output_dim or d
        if self.expert_parallel:
            self.num_shards = ep.num_shards_for(self.num_experts)
        # Each replica's share: all experts unless expert parallel.
        e, h = self.num_experts // self.num_shards, self.hidden_dim
        seed2 = None if self.seed is None else self.seed + 1
        self.w_in = self.add_weight(
            name="w_in", shape=(e, d, h), initializer=_per_expert_glorot(d, h, self.seed)
        )
        self.w_out = self.add_weight(
            name="w_out", shape=(e, h, out), initializer=_per_expert_glorot(h, out, seed2)
        )
        if self.use_bias:
            self.b_in = self.add_weight(name="b_in", shape=(e, h), initializer="zeros")
            self.b_out = self.add_weight(name="b_out", shape=(e, out), initializer="zeros")
        else:
            self.b_in = self.b_out = None
        self.w_hidden = self.b_hidden = None
        extra = self.num_hidden_layers - 1
        if extra:
            seed3 = None if self.seed is None else self.seed + 2
            self.w_hidden = self.add_weight(
                name="w_hidden", shape=(e, extra, h, h), initializer=_per_expert_glorot(h, h, seed3)
            )
            if self.use_bias:
                self.b_hidden = self.add_weight(
                    name="b_hidden", shape=(e, extra, h), initializer="zeros"
                )
        if self.num_shards > 1:
            self._initialize_shards()

    def _initialize_shards(self):
        # The strategy gave every component the same initial value, which
        # would make the experts of different replicas identical copies.
        for variable in self.weights:
            ep.mark_sharded(variable)
        kernels = [(self.w_in, 0), (self.w_out, 1)]
        if self.w_hidden is not None:
            kernels.append((self.w_hidden, 2))
        for variable, offset in kernels:
            fan_in, fan_out = variable.shape[-2], variable.shape[-1]
            for shard, component in enumerate(ep.components(variable)):
                seed = None if self.seed is None else self.seed + offset + 7919 * shard
                init = _per_expert_glorot(fan_in, fan_out, seed)
                component.assign(init(variable.shape, dtype=variable.dtype))

    def _own_variables(self):
        # In creation order: the order of Keras's own `save_own_variables`,
        # so files saved with one shard and with several line up.
        variables = (self.w_in, self.w_out, self.b_in, self.b_out, self.w_hidden, self.b_hidden)
        return [v for v in variables if v is not None]

    def save_own_variables(self, store):
        """Saves all `E` experts, gathered from the replicas if expert parallel."""
        if self.num_shards == 1:
            return super().save_own_variables(store)
        for i, variable in enumerate(self._own_variables()):
            store[f"{i}"] = ep.full_value(variable)

    def load_own_variables(self, store):
        """Loads all `E` experts, giving each replica its share if expert parallel."""
        if self.num_shards == 1:
            return super().load_own_variables(store)
        variables = self._own_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' has {len(variables)} variables; the file lists "
                f"{len(store.keys())}"
            )
        for i, variable in enumerate(variables):
            ep.assign_shards(variable, store[f"{i}"])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def _activate(self, hidden, training):
        hidden = self.activation(hidden)
        if training and self.dropout:
            hidden = recompute.dropout(hidden, self.dropout, self.seed_generator)
        return hidden

    @recompute.recomputable
    def call(self, inputs, training=None):
        training = bool(training)
        x = tf.cast(inputs, self.compute_dtype)
        hidden = tf.einsum("ecd,edh->ech", x, self._cast(self.w_in))
        if self.use_bias:
            hidden += self._cast(self.b_in)[:, None, :]
        hidden = self._activate(hidden, training)
        for layer in range(self.num_hidden_layers - 1):
            hidden = tf.einsum("ech,ehk->eck", hidden, self._cast(self.w_hidden[:, layer]))
            if self.use_bias:
                hidden += self._cast(self.b_hidden[:, layer])[:, None, :]
            hidden = self._activate(hidden, training)
        y = tf.einsum("ech,eho->eco", hidden, self._cast(self.w_out))
        if self.use_bias:
            y += self._cast(self.b_out)[:, None, :]
        return y

    @recompute.recomputable
    def apply_partitioned(self, parts, training=False):
        """Run expert `e` on `parts[e]` (`[n_e, d]`) for every `e`.

        Args:
            parts: list of `E` tensors `[n_e, d]`.
            training: bool; `dropout` applies only in training.

        Returns:
            list of `E` tensors `[n_e, output_dim]`.
        """
        # Unstacking once gives a backward pass that stacks E gradients
        # (cost E*d*h); slicing w_in[e] E times would add E dense [E, d, h]
        # gradients instead.
        w_in = tf.unstack(self._cast(self.w_in))
        w_out = tf.unstack(self._cast(self.w_out))
        b_in = tf.unstack(self._cast(self.b_in)) if self.use_bias else None
        b_out = tf.unstack(self._cast(self.b_out)) if self.use_bias else None
        # Deep experts: the [E, L-1, ...] stacks are flattened to E*(L-1)
        # matrices and unstacked once too, for the same reason.
        extra = self.num_hidden_layers - 1
        w_hidden = b_hidden = None
        if extra:
            h = self.hidden_dim
            w_hidden = tf.unstack(tf.reshape(self._cast(self.w_hidden), [-1, h, h]))
            if self.use_bias:
                b_hidden = tf.unstack(tf.reshape(self._cast(self.b_hidden), [-1, h]))
        outputs = []
        for e, rows in enumerate(parts):
            hidden = tf.matmul(tf.cast(rows, self.compute_dtype), w_in[e])
            if self.use_bias:
                hidden = tf.nn.bias_add(hidden, b_in[e])
            hidden = self._activate(hidden, training)
            for layer in range(e * extra, (e + 1) * extra):
                hidden = tf.matmul(hidden, w_hidden[layer])
                if self.use_bias:
                    hidden = tf.nn.bias_add(hidden, b_hidden[layer])
                hidden = self._activate(hidden, training)
            y = tf.matmul(hidden, w_out[e])
            if self.use_bias:
                y = tf.nn.bias_add(y, b_out[e])
            outputs.append(y)
        return outputs

    @recompute.recomputable
    def apply_sorted(self, rows, counts, training=False):
        """Run the experts on rows sorted by expert, with a graph of constant size.

        The same computation as `apply_partitioned`, laid out differently:
        expert 0's `counts[0]` rows first, then expert 1's, ... Each layer is
        one `keras_moe.grouped.segment_matmul`, a `tf.while_loop` over the
        experts that received rows, so the traced graph (forward and
        backward) does not grow with `E` as `apply_partitioned`'s does.

        Args:
            rows: `[P, d]`, sorted by expert.
            counts: int32 `[E]`, rows per expert (summing to `P`).
            training: bool; `dropout` applies only in training.

        Returns:
            `[P, output_dim]`, in the order of `rows`.
        """
        counts = tf.cast(counts, tf.int32)
        expert_of_row = tf.repeat(tf.range(tf.size(counts)), counts)

        def layer(inputs, kernel, bias):
            out = grouped.segment_matmul(inputs, counts, self._cast(kernel))
            if self.use_bias:
                out += grouped.gather_rows(self._cast(bias), expert_of_row)
            return out

        hidden = layer(tf.cast(rows, self.compute_dtype), self.w_in, self.b_in)
        hidden = self._activate(hidden, training)
        for index in range(self.num_hidden_layers - 1):
            bias = self.b_hidden[:, index] if self.use_bias else None
            hidden = layer(hidden, self.w_hidden[:, index], bias)
            hidden = self._activate(hidden, training)
        return layer(hidden, self.w_out, self.b_out)

    def _cast(self, variable):
        return tf.cast(variable, self.compute_dtype)

    def get_config(self):
        config = {
            "num_experts": self.num_experts,
            "hidden_dim": self.hidden_dim,
            "output_dim": self.output_dim,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "seed": self.seed,
            "num_hidden_layers": self.num_hidden_layers,
            "expert_parallel": self.expert_parallel,
            "dropout": self.dropout,
            "recompute_hidden": self.recompute_hidden,
        }
        return {**super().get_config(), **config}
