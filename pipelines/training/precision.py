"""The pipelines' `train.optimizer` and `train.mixed_precision` choices.

- `train.optimizer`: `adam` (default) or `factored_adam`,
  `keras_moe.FactoredAdam` (App. D: no first moment, row and column averages
  of the squared gradient; optimizer state `E (d + h)` instead of Adam's
  `2 E d h` for the experts). `beta_1` is unused by `factored_adam`.
- `train.mixed_precision`: `none` (default), `mixed_bfloat16` or
  `mixed_float16`. The policy is in force while the model is built and
  compiled (`policy_scope`), so every layer takes it; the routing layers
  keep float32 of their own (gates, balancing losses, softmax), and
  `compile` wraps the optimizer in a `keras.optimizers.LossScaleOptimizer`
  under `mixed_float16`. The global policy is restored afterwards: other
  models built in the same process are not affected.
"""

import contextlib

import keras

from keras_moe.optimizers import FactoredAdam

# The choices live with the configuration, which must load without Keras (the CLI).
from keras_moe.pipelines.training.config import MIXED_PRECISION, OPTIMIZERS, check_choice

__all__ = ["MIXED_PRECISION", "OPTIMIZERS", "check_choice", "make", "policy_scope"]


def make(train_config, learning_rate):
    """The optimizer `train.optimizer` names, before any expert-parallel wrapping.

    Args:
        train_config: the `train` section (`optimizer`, `beta_1`, `beta_2`,
            `epsilon`, `clipnorm`).
        learning_rate: a float or a learning-rate schedule.

    Example:

    >>> from keras_moe.pipelines.training.config import TrainConfig
    >>> type(make(TrainConfig(optimizer="factored_adam"), 0.1)).__name__
    'FactoredAdam'
    """
    t = train_config
    if getattr(t, "optimizer", "adam") == "factored_adam":
        return FactoredAdam(learning_rate, beta_2=t.beta_2, epsilon=t.epsilon,
                            clipnorm=t.clipnorm)
    return keras.optimizers.Adam(learning_rate, beta_1=t.beta_1, beta_2=t.beta_2,
                                 epsilon=t.epsilon, clipnorm=t.clipnorm)


@contextlib.contextmanager
def policy_scope(mixed_precision):
    """Sets Keras's global dtype policy to `mixed_precision` inside, unless `none`.

    Example:

    >>> with policy_scope("mixed_bfloat16"):
    ...     keras.layers.Dense(2).dtype_policy.name
    'mixed_bfloat16'
    >>> keras.config.dtype_policy().name
    'float32'
    """
    check_choice("mixed_precision", mixed_precision, MIXED_PRECISION)
    if mixed_precision == "none":
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(mixed_precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
