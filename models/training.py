"""Objects a compiled model carries into its `.keras` file: the schedule and metric.

Both are registered serializable, so a saved, compiled language model
reloads with `keras.saving.load_model` after `import keras_moe.models`.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_moe")
class WarmupInverseSqrt(keras.optimizers.schedules.LearningRateSchedule):
    """The paper's learning rate: linear warm-up, an optional hold, then `1/sqrt(step)`.

    With `s = step + 1` (Keras counts steps from 0) and `h = warmup + hold`:
    `lr(s) = base * min(s / warmup, 1, sqrt(h / s))`, which rises linearly
    to `base` at `s = warmup`, stays there until `s = h` and then decays
    proportionally to the inverse square root of the step. The language
    models (App. C.1) use no hold; the translation models (App. E) warm up
    for 2000 steps and hold for 8000. With `decay="constant"` the rate stays
    at `base` after the warm-up. `warmup_steps=0` starts at the peak.

    Args:
        learning_rate: float > 0, the peak rate.
        warmup_steps: int >= 0.
        decay: `"inverse_sqrt"` or `"constant"`.
        hold_steps: int >= 0, steps at the peak before the decay starts.

    Example:

    >>> schedule = WarmupInverseSqrt(1e-3, warmup_steps=100)
    >>> [round(float(schedule(s)), 6) for s in (0, 99, 399)]
    [1e-05, 0.001, 0.0005]
    """

    def __init__(self, learning_rate, warmup_steps=1000, decay="inverse_sqrt", hold_steps=0):
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or (
            learning_rate <= 0
        ):
            raise ValueError(
                f"`learning_rate` must be a number > 0. Received: learning_rate={learning_rate!r}"
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"`warmup_steps` must be an integer >= 0. Received: warmup_steps={warmup_steps!r}"
            )
        if decay not in ("inverse_sqrt", "constant"):
            raise ValueError(
                f"`decay` must be 'inverse_sqrt' or 'constant'. Received: decay={decay!r}"
            )
        if isinstance(hold_steps, bool) or not isinstance(hold_steps, int) or hold_steps < 0:
            raise ValueError(
                f"`hold_steps` must be an integer >= 0. Received: hold_steps={hold_steps!r}"
            )
        self.hold_steps = hold_steps
        self.learning_rate = float(learning_rate)
        self.warmup_steps = warmup_steps
        self.decay = decay

    def __call__(self, step):
        s = tf.cast(step, tf.float32) + 1.0
        warmup = float(max(self.warmup_steps, 1))
        rise = tf.minimum(s / warmup, 1.0) if self.warmup_steps else tf.constant(1.0)
        if self.decay == "constant":
            return self.learning_rate * rise
        fall = tf.minimum(tf.sqrt(float(max(self.warmup_steps + self.hold_steps, 1)) / s), 1.0)
        return self.learning_rate * tf.minimum(rise, fall)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "hold_steps": self.hold_steps,
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class TokenPerplexity(keras.metrics.Metric):
    """Perplexity over all weighted tokens seen: `exp(sum w * NLL / sum w)`.

    Sums, not an average of per-batch perplexities, so batches with
    different numbers of real tokens count by their tokens. Use it as a
    weighted metric (`compile(weighted_metrics=[TokenPerplexity()])`) so that
    padding (weight 0) is left out.

    Args:
        name: metric name (default `"perplexity"`).

    Example:

    >>> metric = TokenPerplexity()
    >>> metric.update_state([[1, 0]], [[[0.0, 0.0], [0.0, 0.0]]])
    >>> round(float(metric.result()), 4)
    2.0
    """

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total_nll = self.add_variable(shape=(), initializer="zeros", name="total_nll")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = tf.cast(y_true, tf.int32)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=tf.cast(y_pred, tf.float32)
        )
        if sample_weight is None:
            weight = tf.ones_like(nll)
        else:
            weight = tf.cast(sample_weight, tf.float32)
            # Per-row weights `[batch]` weight whole rows, as in Keras metrics.
            while weight.shape.rank < nll.shape.rank:
                weight = weight[..., None]
            weight = tf.broadcast_to(weight, tf.shape(nll))
        self.total_nll.assign_add(tf.reduce_sum(nll * weight))
        self.count.assign_add(tf.reduce_sum(weight))

    def result(self):
        return tf.exp(tf.math.divide_no_nan(self.total_nll, self.count))
