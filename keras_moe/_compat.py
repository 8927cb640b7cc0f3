"""Every private Keras or TensorFlow name keras-moe relies on, in one place.

The library uses public seams everywhere else. What is left here has no
public equivalent in Keras 3.15 / TensorFlow 2.21; `tests/keras_moe/compat_test.py`
fails by name as soon as one of these disappears or changes meaning, so an
upgrade shows exactly what to revisit.

- `in_symbolic_scope`: Keras traces a layer in a scratch graph, outside the
  strategy's replicas, only to learn its output shapes (`fit` building its
  metrics, `compute_output_spec`). An expert-parallel call cannot run its
  collectives there and must tell that trace from a real call made in the
  wrong context (which is an error). Keras exports the scope
  (`keras.SymbolicScope`) but not the question "am I inside one?".
- `optimizer_variable_prefix`: not a private name but an unexported naming
  convention. `Optimizer.add_variable_from_reference` names the variable
  it creates for a model variable (Adam's moments, a momentum)
  `"{path with '/' as '_'}_{slot name}"`; no public API maps an optimizer
  variable back to its model variable, and `ExpertParallelOptimizer` needs
  that map to save an expert shard's moments whole.
- `Optimizer._get_variable_index`: a custom optimizer (`FactoredAdam`) keeps
  per-variable state in lists built in `build(var_list)`; `update_step`
  then receives the variable in the backend's own form (under TensorFlow a
  `tf.Variable`, under `tf.distribute` a per-replica component), which no
  public attribute maps back to the Keras variable. Keras's own optimizers
  (Adam, SGD, ...) use this same method for it.
"""

from keras.src.backend.common import symbolic_scope as _symbolic_scope

#: The private Keras modules and attributes used here, checked by
#: `tests/keras_moe/compat_test.py`.
#: Each is (owner, attribute): the owner a module or a class, by dotted path.
PRIVATE_NAMES = (
    ("keras.src.backend.common.symbolic_scope", "in_symbolic_scope"),
    ("keras.optimizers.Optimizer", "_get_variable_index"),
)


def in_symbolic_scope():
    """Whether Keras is tracing for output shapes only (`keras.SymbolicScope`)."""
    return _symbolic_scope.in_symbolic_scope()


def optimizer_variable_prefix(variable):
    """The prefix of the names a Keras optimizer gives `variable`'s slot variables.

    Args:
        variable: a model `keras.Variable`.

    Returns:
        `"{variable.path with '/' replaced by '_'}_"`: Adam's moments of a
        variable at `"moe/experts/w_in"` are named `"moe_experts_w_in_momentum"`
        and `"moe_experts_w_in_velocity"`.
    """
    return variable.path.replace("/", "_") + "_"


def optimizer_variable_index(optimizer, variable):
    """The position of `variable` in the list `optimizer.build` received."""
    return optimizer._get_variable_index(variable)
