"""LSTM with a recurrent projection layer (LSTMP, Sak et al. 2014).

The LSTM-2048-512 baseline of the MoE paper (Table 7, after Jozefowicz et
al. 2016) is a 2048-unit LSTM whose output is projected down to 512 before
it is fed back and passed on: the recurrent matrices are `[512, 4 * 2048]`
instead of `[2048, 4 * 2048]`, so a wide cell costs little more than a
narrow one.
"""

import keras
import tensorflow as tf


def _check_units(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")


def _seed(seed, offset):
    # Distinct seeds per weight: one seed for all three would give
    # correlated initial kernels.
    return None if seed is None else seed + offset


@keras.saving.register_keras_serializable(package="keras_moe")
class ProjectedLSTMCell(keras.layers.Layer):
    """One step of an LSTM with a recurrent projection (Sak et al. 2014).

    With `[i, f, g, o] = [x_t, r_{t-1}] [W; U] + b` (gate order as in
    Keras's `LSTMCell`):
    `c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)`,
    `m_t = sigmoid(o) * tanh(c_t)`, `r_t = m_t P`. The output and the
    recurrent input of the next step are `r_t` (width `projection_units`);
    the state is `(r_t, c_t)`.

    Weights: `kernel W [d, 4 * units]`, `recurrent_kernel U
    [projection_units, 4 * units]`, `bias b [4 * units]` (the forget gate's
    part starts at 1, as Keras's `unit_forget_bias`), `projection P [units,
    projection_units]` without bias: `4 * units * (d + projection_units) +
    4 * units + units * projection_units` parameters.

    Args:
        units: int >= 1, width of the cell `c` and of `m`.
        projection_units: int >= 1, width of `r`.
        seed: optional int seed of the initializers.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `[batch, d]`.
        states: `[r [batch, projection_units], c [batch, units]]`.

    Returns:
        `(r_t, [r_t, c_t])`.

    Example:

    >>> cell = ProjectedLSTMCell(8, 3)
    >>> r, (r_state, c) = cell(tf.ones([2, 5]), [tf.zeros([2, 3]), tf.zeros([2, 8])])
    >>> tuple(r.shape), tuple(c.shape)
    ((2, 3), (2, 8))
    """

    def __init__(self, units, projection_units, seed=None, **kwargs):
        super().__init__(**kwargs)
        _check_units("units", units)
        _check_units("projection_units", projection_units)
        self.units = units
        self.projection_units = projection_units
        self.seed = seed
        # Keras's RNN reads these: state order (r, c), output r.
        self.state_size = [projection_units, units]
        self.output_size = projection_units

    def build(self, input_shape):
        d, u, p = input_shape[-1], self.units, self.projection_units
        self.kernel = self.add_weight(
            name="kernel", shape=(d, 4 * u),
            initializer=keras.initializers.GlorotUniform(_seed(self.seed, 0)),
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel", shape=(p, 4 * u),
            initializer=keras.initializers.Orthogonal(seed=_seed(self.seed, 1)),
        )

        def unit_forget_bias(shape, dtype=None):
            return tf.concat(
                [tf.zeros([u], dtype), tf.ones([u], dtype), tf.zeros([2 * u], dtype)], axis=0
            )

        self.bias = self.add_weight(name="bias", shape=(4 * u,), initializer=unit_forget_bias)
        self.projection = self.add_weight(
            name="projection", shape=(u, p),
            initializer=keras.initializers.GlorotUniform(_seed(self.seed, 2)),
        )

    def call(self, inputs, states):
        r_prev, c_prev = states[0], states[1]
        z = tf.matmul(inputs, self.kernel) + tf.matmul(r_prev, self.recurrent_kernel)
        i, f, g, o = tf.split(tf.nn.bias_add(z, self.bias), 4, axis=-1)
        c = tf.sigmoid(f) * c_prev + tf.sigmoid(i) * tf.tanh(g)
        r = tf.matmul(tf.sigmoid(o) * tf.tanh(c), self.projection)
        return r, [r, c]

    def get_config(self):
        config = {
            "units": self.units,
            "projection_units": self.projection_units,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="keras_moe")
class ProjectedLSTM(keras.layers.RNN):
    """LSTM layer with a recurrent projection (LSTMP; Sak et al. 2014).

    A `keras.layers.RNN` over a `ProjectedLSTMCell`: `c_t = f * c_{t-1} +
    i * tanh(g)`, `m_t = o * tanh(c_t)`, `r_t = m_t P`, gates computed from
    `[x_t, r_{t-1}]`. The LSTM-2048-512 of Table 7 is
    `ProjectedLSTM(2048, 512)`.

    Masking follows Keras's RNN convention (TensorFlow backend, as Keras's
    own `LSTM` when it does not use cuDNN): at a masked step the state
    `(r, c)` is carried over unchanged, and the output repeats the previous
    step's output (zeros if no step has been unmasked yet). A Keras mask
    (e.g. from `Embedding(mask_zero=True)`) is passed on to the next layer.

    Args:
        units: int >= 1, cell width.
        projection_units: int >= 1, output (and recurrent) width.
        return_sequences: bool; all steps `[batch, time, projection_units]`
            (default) or the last one `[batch, projection_units]`.
        unroll: bool, unroll the time loop (needs a static length; faster
            for short sequences, more memory).
        seed: optional int seed of the initializers.
        **kwargs: further `keras.layers.RNN` arguments (`return_state`,
            `go_backwards`, `stateful`) and base `Layer` arguments.

    Call arguments:
        sequences: `[batch, time, d]`.
        initial_state: optional `[r [batch, projection_units], c [batch, units]]`.
        mask: optional bool `[batch, time]`.
        training: bool.

    Returns:
        `[batch, time, projection_units]`, or `[batch, projection_units]`
        with `return_sequences=False` (plus the states with `return_state`).

    Example:

    >>> layer = ProjectedLSTM(16, 4)
    >>> tuple(layer(tf.ones([2, 7, 5])).shape)
    (2, 7, 4)
    >>> layer.count_params() == 4 * 16 * (5 + 4) + 4 * 16 + 16 * 4
    True
    """

    def __init__(
        self,
        units,
        projection_units,
        return_sequences=True,
        unroll=False,
        seed=None,
        **kwargs,
    ):
        cell = ProjectedLSTMCell(
            units, projection_units, seed=seed, dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True), name="projected_lstm_cell",
        )
        super().__init__(
            cell, return_sequences=bool(return_sequences), unroll=bool(unroll), **kwargs
        )
        self.input_spec = keras.layers.InputSpec(ndim=3)

    @property
    def units(self):
        return self.cell.units

    @property
    def projection_units(self):
        return self.cell.projection_units

    @property
    def seed(self):
        return self.cell.seed

    def get_config(self):
        config = super().get_config()
        # The cell is rebuilt from these three arguments.
        del config["cell"]
        config.update(
            units=self.units, projection_units=self.projection_units, seed=self.seed
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
