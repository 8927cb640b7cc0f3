"""Attention of the translation model: GNMT's additive function and the paper's App. G one.

GNMT (Wu et al. 2016) scores a source vector `x_i` (an encoder output)
against a target vector `y_j` (the bottom decoder LSTM's output) with a
feed-forward net of one hidden layer of `n` units:

    A_GNMT(x_i, y_j) = sum_d V_d tanh((x_i U)_d + (y_j W)_d)

Shazeer et al. 2017 (App. G) replace it, "for performance reasons", with

    A(x_i, y_j) = sum_d V_d tanh((x_i U)_d) tanh((y_j W)_d)

whose source part `tanh(x U)` is computed once per sentence and whose
scores for all source positions (and any number of target positions) are
one batched matrix product, instead of a `tanh` per (source, target, unit)
triple. The paper found "little difference in quality between the two".

Both turn scores into probabilities with a softmax over the real source
positions, `p_ij = softmax_i(A(x_i, y_j))`, and return the context
`a_j = sum_i p_ij x_i` (the values are the encoder outputs themselves, as
in GNMT).
"""

import keras
import tensorflow as tf

from keras_moe.validation import check_int

ATTENTION_TYPES = ("additive", "multiplicative_tanh")


class SourceAttention(keras.layers.Layer):
    """Shared weights and masking of the two attention functions (not public).

    Subclasses define `project_memory` (the source side, computed once per
    sentence) and `score`.
    """

    def __init__(self, units, seed=None, **kwargs):
        super().__init__(**kwargs)
        check_int("units", units, 1)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be None or an integer. Received: seed={seed!r}")
        self.units = units
        self.seed = seed

    def build(self, query_shape, memory_shape):
        n = self.units
        self.memory_kernel = self.add_weight(
            name="memory_kernel", shape=(memory_shape[-1], n),
            initializer=keras.initializers.GlorotUniform(self._seed(0)),
        )
        self.query_kernel = self.add_weight(
            name="query_kernel", shape=(query_shape[-1], n),
            initializer=keras.initializers.GlorotUniform(self._seed(1)),
        )
        self.score_vector = self.add_weight(
            name="score_vector", shape=(n,),
            initializer=keras.initializers.RandomUniform(-(n**-0.5), n**-0.5, self._seed(2)),
        )

    def _seed(self, offset):
        # Distinct seeds per weight: one seed for all would correlate them.
        return None if self.seed is None else self.seed + offset

    def _weight(self, variable, like):
        # `attend` is also called outside `__call__` (by the decoder's step),
        # where Keras's autocast does not apply: cast to the inputs' dtype.
        return tf.cast(variable, like.dtype)

    def project_memory(self, memory):
        """The source side of the scores, `[b, s, units]`, computed once per sentence."""
        raise NotImplementedError

    def score(self, query, keys):
        """Scores `[b, s]` for a query `[b, dq]`, or `[b, t, s]` for `[b, t, dq]`."""
        raise NotImplementedError

    def attend(self, query, memory, keys, memory_mask=None):
        """Context and probabilities from precomputed `keys = project_memory(memory)`.

        Args:
            query: `[b, dq]` (one target step) or `[b, t, dq]`.
            memory: `[b, s, dm]`, the encoder outputs.
            keys: `[b, s, units]`.
            memory_mask: optional bool `[b, s]`, False at source padding.

        Returns:
            `(context, probs)`: context `[b, dm]` or `[b, t, dm]`; probs
            (float32) `[b, s]` or `[b, t, s]`, summing to 1 over the real
            source positions and exactly 0 on padding (all 0 for a row with
            no real position).
        """
        scores = tf.cast(self.score(query, keys), tf.float32)
        if memory_mask is not None:
            mask = memory_mask if len(query.shape) == 2 else memory_mask[:, None, :]
            scores = tf.where(mask, scores, -1e9)
            probs = tf.nn.softmax(scores, axis=-1) * tf.cast(mask, tf.float32)
        else:
            probs = tf.nn.softmax(scores, axis=-1)
        weights = tf.cast(probs, memory.dtype)
        if len(query.shape) == 2:
            context = tf.einsum("bs,bsd->bd", weights, memory)
        else:
            context = tf.einsum("bts,bsd->btd", weights, memory)
        return context, probs

    def call(self, query, memory, memory_mask=None):
        return self.attend(query, memory, self.project_memory(memory), memory_mask)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_moe")
class AdditiveAttention(SourceAttention):
    """GNMT's attention function (Bahdanau et al. 2015; Wu et al. 2016).

    `A(x_i, y_j) = sum_d V_d tanh((x_i U)_d + (y_j W)_d)`; `x U` is
    computed once per sentence, but the `tanh` runs for every (source
    position, target step, unit).

    Weights: `memory_kernel U [dm, units]`, `query_kernel W [dq, units]`,
    `score_vector V [units]`, no biases (as in the formula).

    Args:
        units: int >= 1, `n`, the hidden width of the attention function.
        seed: optional int seed of the initializers.
        **kwargs: base `Layer` arguments.

    Call arguments:
        query: `[b, dq]` (one target step) or `[b, t, dq]` (all steps).
        memory: `[b, s, dm]`, the encoder outputs (scored and averaged).
        memory_mask: optional bool `[b, s]`, False at source padding.

    Returns:
        `(context, probs)`: context `[b, dm]` / `[b, t, dm]`, probs float32
        `[b, s]` / `[b, t, s]` (0 on padding, summing to 1 over the rest).

    Example:

    >>> layer = AdditiveAttention(4, seed=1)
    >>> context, probs = layer(tf.ones([2, 3]), tf.ones([2, 5, 6]))
    >>> tuple(context.shape), tuple(probs.shape), float(tf.reduce_sum(probs[0]))
    ((2, 6), (2, 5), 1.0)
    """

    def project_memory(self, memory):
        return tf.matmul(memory, self._weight(self.memory_kernel, memory))

    def score(self, query, keys):
        q = tf.matmul(query, self._weight(self.query_kernel, query))  # [b, (t,) n]
        if len(query.shape) == 2:
            hidden = tf.tanh(keys + q[:, None, :])  # [b, s, n]
        else:
            hidden = tf.tanh(keys[:, None, :, :] + q[:, :, None, :])  # [b, t, s, n]
        return tf.tensordot(hidden, self._weight(self.score_vector, hidden), axes=[[-1], [0]])


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiplicativeTanhAttention(SourceAttention):
    """The attention function of Shazeer et al. 2017, App. G.

    `A(x_i, y_j) = sum_d V_d tanh((x_i U)_d) tanh((y_j W)_d)`: the source
    factor `tanh(x U)` `[b, s, n]` is computed once per sentence, and the
    scores of every source position are one batched product with the
    target factor `V * tanh(y W)` (no `tanh` per source position and step).

    Weights: `memory_kernel U [dm, units]`, `query_kernel W [dq, units]`,
    `score_vector V [units]`, no biases (as in the formula).

    Args:
        units: int >= 1, `n`, the hidden width of the attention function.
        seed: optional int seed of the initializers.
        **kwargs: base `Layer` arguments.

    Call arguments:
        query: `[b, dq]` (one target step) or `[b, t, dq]` (all steps).
        memory: `[b, s, dm]`, the encoder outputs (scored and averaged).
        memory_mask: optional bool `[b, s]`, False at source padding.

    Returns:
        `(context, probs)`: context `[b, dm]` / `[b, t, dm]`, probs float32
        `[b, s]` / `[b, t, s]` (0 on padding, summing to 1 over the rest).

    Example:

    >>> layer = MultiplicativeTanhAttention(4, seed=1)
    >>> context, probs = layer(tf.ones([2, 7, 3]), tf.ones([2, 5, 6]))
    >>> tuple(context.shape), tuple(probs.shape)
    ((2, 7, 6), (2, 7, 5))
    """

    def project_memory(self, memory):
        return tf.tanh(tf.matmul(memory, self._weight(self.memory_kernel, memory)))

    def score(self, query, keys):
        q = tf.tanh(tf.matmul(query, self._weight(self.query_kernel, query)))
        q = q * self._weight(self.score_vector, q)  # [b, (t,) n]
        if len(query.shape) == 2:
            return tf.einsum("bn,bsn->bs", q, keys)
        return tf.einsum("btn,bsn->bts", q, keys)


def make_attention(kind, units, seed=None, name="attention"):
    """`AdditiveAttention` for `kind="additive"`, `MultiplicativeTanhAttention` for
    `"multiplicative_tanh"`.

    Example:

    >>> type(make_attention("multiplicative_tanh", 8)).__name__
    'MultiplicativeTanhAttention'
    """
    if kind not in ATTENTION_TYPES:
        raise ValueError(
            f"`attention` must be one of {', '.join(map(repr, ATTENTION_TYPES))}. "
            f"Received: attention={kind!r}"
        )
    cls = AdditiveAttention if kind == "additive" else MultiplicativeTanhAttention
    return cls(units, seed=seed, name=name)
