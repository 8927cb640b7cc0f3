"""`FactoredAdam`: Adam without first moments and with factored second moments (App. D).

For models with thousands of experts the optimizer's state dominates
memory: Adam keeps two numbers per parameter (`m` and `v`), so a
`[E, d, h]` expert weight carries `2 * E * d * h` more floats. Appendix D of
Shazeer et al. (2017) trains MoE-131072-h with two changes to Adam:

1. No first moment (`beta_1 = 0`): the update uses the raw gradient.
2. A factored second moment: for a weight matrix of `n x m`, keep a running
   average of the row means and of the column means of the squared
   gradient (`n + m` numbers), and estimate the full matrix as their outer
   product divided by the mean of the row averages:

   ```
   R_t = beta_2 R_{t-1} + (1 - beta_2) mean_j(g_t^2)          # [..., n]
   C_t = beta_2 C_{t-1} + (1 - beta_2) mean_i(g_t^2)          # [..., m]
   V_t = R_t C_t^T / mean_i(R_t)                              # [..., n, m]
   w_t = w_{t-1} - lr * g_t / (sqrt(V_t / (1 - beta_2^t)) + epsilon)
   ```

   This is exact when the squared gradient has rank one, and is the
   estimator later published as Adafactor (Shazeer & Stern, 2018).

Every variable of rank 2 or more is factored over its last two axes (for a
stacked expert weight `[E, d, h]` that is one `d + h` pair per expert);
leading axes are kept, so experts never share statistics. Variables of
rank 0 or 1, and those whose last two axes are smaller than
`min_dim_to_factor`, keep a full second moment (RMSProp with Adam's bias
correction). The state is then `E * (d + h)` floats for an expert weight
instead of Adam's `2 * E * d * h`.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_moe import _compat


@keras.saving.register_keras_serializable(package="keras_moe")
class FactoredAdam(keras.optimizers.Optimizer):
    """Adam with `beta_1 = 0` and row/column-factored second moments.

    Args:
        learning_rate: float, a `keras.optimizers.schedules.LearningRateSchedule`,
            or a callable; as for `keras.optimizers.Adam`.
        beta_2: decay of the second-moment averages, in `[0, 1)`.
        epsilon: added to the root of the second moment.
        min_dim_to_factor: factor a variable only when both of its last two
            axes have at least this many entries (smaller matrices gain
            nothing from it).
        **kwargs: the base optimizer's keyword arguments (`clipnorm`,
            `global_clipnorm`, `weight_decay`, `name`, ...).

    Example:

    >>> import numpy as np
    >>> opt = FactoredAdam(learning_rate=0.1)
    >>> w = keras.Variable(np.ones((2, 3, 4), "float32"))
    >>> _ = opt.apply_gradients([(np.full((2, 3, 4), 0.5, "float32"), w)])
    >>> [tuple(v.shape) for v in opt.second_moment_variables(w)]
    [(2, 3), (2, 4)]
    >>> round(float(w.numpy()[0, 0, 0]), 4)  # first step: lr * g / |g|
    0.9
    """

    def __init__(self, learning_rate=0.001, beta_2=0.999, epsilon=1e-7, min_dim_to_factor=2,
                 name="factored_adam", **kwargs):
        if not 0.0 <= float(beta_2) < 1.0:
            raise ValueError(f"`beta_2` must be in [0, 1). Received: beta_2={beta_2}")
        if not float(epsilon) > 0.0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        if isinstance(min_dim_to_factor, bool) or not isinstance(min_dim_to_factor, int) \
                or min_dim_to_factor < 1:
            raise ValueError(
                "`min_dim_to_factor` must be an int >= 1. "
                f"Received: min_dim_to_factor={min_dim_to_factor!r}"
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.min_dim_to_factor = min_dim_to_factor
        # Per variable, in build's order: (rows or full second moment, columns or None).
        self.second_moments = []

    def factored(self, variable):
        """Whether `variable`'s second moment is kept as row and column averages."""
        shape = tuple(variable.shape)
        return len(shape) >= 2 and min(shape[-2:]) >= self.min_dim_to_factor

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        for variable in var_list:
            shape = tuple(variable.shape)
            name = variable.path.replace("/", "_")
            if self.factored(variable):
                rows = self.add_variable(shape[:-1], initializer="zeros",
                                         dtype=variable.dtype, name=f"{name}_rows")
                cols = self.add_variable(shape[:-2] + shape[-1:], initializer="zeros",
                                         dtype=variable.dtype, name=f"{name}_cols")
                self.second_moments.append((rows, cols))
            else:
                full = self.add_variable(shape, initializer="zeros", dtype=variable.dtype,
                                         name=f"{name}_velocity")
                self.second_moments.append((full, None))

    def second_moment_variables(self, variable):
        """The optimizer variables holding `variable`'s second moment (1 or 2)."""
        index = _compat.optimizer_variable_index(self, variable)
        return [v for v in self.second_moments[index] if v is not None]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        if isinstance(gradient, tf.IndexedSlices):
            # An embedding's gradient arrives as the rows looked up. Every
            # row's and column's average decays at every step, looked up or
            # not, so the update needs the dense gradient (zeros elsewhere).
            gradient = tf.convert_to_tensor(gradient)
        gradient = ops.cast(gradient, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        correction = 1.0 - ops.power(beta_2, step)
        squared = ops.square(gradient)
        first, second = self.second_moments[_compat.optimizer_variable_index(self, variable)]
        if second is None:
            self.assign(first, beta_2 * first + (1.0 - beta_2) * squared)
            velocity = first
        else:
            rows = beta_2 * first + (1.0 - beta_2) * ops.mean(squared, axis=-1)
            cols = beta_2 * second + (1.0 - beta_2) * ops.mean(squared, axis=-2)
            self.assign(first, rows)
            self.assign(second, cols)
            # V = R C^T / mean(R): the rank-one estimate whose row and column
            # means equal R and C (exact when g^2 is itself rank one).
            scale = ops.maximum(ops.mean(rows, axis=-1, keepdims=True), 1e-30)
            velocity = ops.expand_dims(rows / scale, -1) * ops.expand_dims(cols, -2)
        update = gradient / (ops.sqrt(velocity / correction) + self.epsilon)
        self.assign_sub(variable, lr * update)

    def get_config(self):
        config = super().get_config()
        config.update({
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "min_dim_to_factor": self.min_dim_to_factor,
        })
        return config
