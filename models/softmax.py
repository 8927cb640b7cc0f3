"""The output layer of the language models: full logits, or a sampled softmax loss.

The paper's 1B Word vocabulary has 793,471 words; scoring all of them for
every training position costs more than the rest of the model, so the
paper trains with importance sampling (Jean et al. 2015; App. C.1). At
evaluation the full softmax is used, so perplexities are exact.
"""

import keras
import tensorflow as tf


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftmaxOutput(keras.layers.Layer):
    """Vocabulary projection `logits = h W^T + b`, with a sampled softmax loss.

    `call` returns the full logits `[..., vocab_size]`. `sampled_loss`
    returns the sampled softmax loss of Jean et al. (2015), as
    `tf.nn.sampled_softmax_loss` computes it: each position scores its
    target and `num_sampled` words drawn once per call from a log-uniform
    (Zipfian) distribution, `P(w) = log((w + 2) / (w + 1)) / log(V + 1)`,
    which assumes ids are ranked by frequency (our vocabularies are, after
    the padding id 0 and `<eos>`); logits are corrected by `-log Q(w)`, and
    a sampled word equal to the position's target is removed (accidental
    hits).

    The kernel is stored `[vocab_size, d]`, the transpose of a `Dense`
    kernel, because `tf.nn.sampled_softmax_loss` takes `weights [num_classes,
    dim]`: with a `[d, V]` kernel each training step would transpose a
    793k x 512 matrix.

    Precision: the layer's dtype defaults to `"float32"` whatever the global
    dtype policy, so under mixed precision the hidden states are cast to
    float32 on the way in and logits and losses are float32 (a softmax over
    hundreds of thousands of words in float16/bfloat16 loses too much).
    Pass `dtype=` explicitly to override.

    Args:
        vocab_size: int >= 2, `V`.
        num_sampled: int, `0 <= num_sampled < vocab_size`; sampled negatives
            per call of `sampled_loss` (0: `sampled_loss` is the exact full
            softmax cross-entropy).
        seed: optional int, seeds the initializer and the sampler.
        **kwargs: base `Layer` arguments.

    Call arguments:
        hidden: `[..., d]`.

    Returns:
        Logits `[..., vocab_size]` (float32 by default).

    Example:

    >>> layer = SoftmaxOutput(10, num_sampled=3, seed=1)
    >>> hidden = tf.random.normal([2, 4, 6])
    >>> tuple(layer(hidden).shape), tuple(layer.kernel.shape)
    ((2, 4, 10), (10, 6))
    >>> loss = layer.sampled_loss(hidden, tf.ones([2, 4], tf.int32))
    >>> loss.shape, bool(loss > 0)
    (TensorShape([]), True)
    """

    def __init__(self, vocab_size, num_sampled=0, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        _check_int("vocab_size", vocab_size, 2)
        _check_int("num_sampled", num_sampled, 0)
        if num_sampled >= vocab_size:
            raise ValueError(
                f"`num_sampled` must be < vocab_size={vocab_size}. "
                f"Received: num_sampled={num_sampled}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be None or an integer. Received: seed={seed!r}")
        self.vocab_size = vocab_size
        self.num_sampled = num_sampled
        self.seed = seed
        # A Keras mask (padding) passes through to the logits, as with `Dense`.
        self.supports_masking = True

    def build(self, input_shape):
        d = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(self.vocab_size, d),
            initializer=keras.initializers.GlorotUniform(self.seed),
        )
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.vocab_size,)

    def call(self, hidden):
        hidden = tf.cast(hidden, self.compute_dtype)
        flat = tf.reshape(hidden, [-1, tf.shape(hidden)[-1]])
        logits = tf.matmul(flat, self._cast(self.kernel), transpose_b=True)
        logits = tf.nn.bias_add(logits, self._cast(self.bias))
        return tf.reshape(logits, tf.concat([tf.shape(hidden)[:-1], [self.vocab_size]], 0))

    def sampled_loss(self, hidden, labels, sample_weight=None, sampled_values=None):
        """Weighted mean sampled softmax loss `sum(w * loss) / max(sum(w), 1)`.

        Args:
            hidden: `[..., d]`, the inputs of the softmax.
            labels: int `[...]`, target ids.
            sample_weight: optional float `[...]` (default 1); positions of
                weight 0 (padding) do not count.
            sampled_values: optional `(sampled_candidates [S], true_expected_count
                [N, 1], sampled_expected_count [S])` as returned by a
                `tf.random.*_candidate_sampler`, replacing the layer's own
                log-uniform draw of `num_sampled` words (`N` = number of
                positions).

        Returns:
            Scalar float32 loss.
        """
        if not self.built:
            self.build(hidden.shape)
        d = hidden.shape[-1]
        flat = tf.reshape(tf.cast(hidden, self.compute_dtype), [-1, d])
        targets = tf.reshape(tf.cast(labels, tf.int64), [-1, 1])
        kernel, bias = self._cast(self.kernel), self._cast(self.bias)
        if sampled_values is not None:
            per_position = tf.nn.sampled_softmax_loss(
                kernel, bias, targets, flat, num_sampled=int(sampled_values[0].shape[0]),
                num_classes=self.vocab_size, sampled_values=sampled_values,
                remove_accidental_hits=True, seed=self.seed,
            )
        elif self.num_sampled:
            per_position = tf.nn.sampled_softmax_loss(
                kernel, bias, targets, flat, num_sampled=self.num_sampled,
                num_classes=self.vocab_size, remove_accidental_hits=True, seed=self.seed,
            )
        else:
            logits = tf.nn.bias_add(tf.matmul(flat, kernel, transpose_b=True), bias)
            per_position = tf.nn.sparse_softmax_cross_entropy_with_logits(targets[:, 0], logits)
        per_position = tf.cast(per_position, tf.float32)
        if sample_weight is None:
            weight = tf.ones_like(per_position)
        else:
            weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        # tf.where, not a product: a weight-0 position must not pass on a
        # NaN/inf loss (0 * inf = NaN).
        weighted = tf.where(weight > 0, weight * per_position, 0.0)
        return tf.reduce_sum(weighted) / tf.maximum(tf.reduce_sum(weight), 1.0)

    def _cast(self, variable):
        return tf.cast(variable, self.compute_dtype)

    def get_config(self):
        config = {
            "vocab_size": self.vocab_size,
            "num_sampled": self.num_sampled,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}
