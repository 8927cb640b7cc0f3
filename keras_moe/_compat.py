"""Every private Keras or TensorFlow name keras-moe still uses, in one place.

Each entry says why no public seam does the job. `tests/keras_moe/compat_test.py`
fails by name when a Keras or TensorFlow release removes one of them, so an
upgrade breaks a test, not a training run. `setup.py` pins Keras to the minor
release these were checked against.
"""


def optimizer_variable_index(optimizer, variable):
    """The position of `variable` in the list `optimizer.build` received.

    A custom `keras.optimizers.Optimizer` keeps per-variable state in lists
    built in `build(var_list)`; `update_step` then receives the variable in
    the backend's own form (under TensorFlow a `tf.Variable`, under
    `tf.distribute` a per-replica component), which no public attribute maps
    back to the Keras variable. Keras's own optimizers (Adam, SGD, ...) use
    this same private method for it.
    """
    return optimizer._get_variable_index(variable)


# (owner, attribute) pairs checked by tests/keras_moe/compat_test.py.
PRIVATE_NAMES = [
    ("keras.optimizers.Optimizer", "_get_variable_index"),
]
