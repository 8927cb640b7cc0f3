"""`keras_moe/_compat.py`: every private Keras/TensorFlow name the library uses still exists.

A failure here names what disappeared or changed in an upgrade; the code
that needs it is listed in `_compat`'s docstring.
"""

import importlib

import keras
import pytest

from keras_moe import _compat


def resolve(dotted):
    """A module or a class by dotted path: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            owner = getattr(owner, part)
        return owner
    raise ImportError(dotted)


@pytest.mark.parametrize(
    "owner, attribute", _compat.PRIVATE_NAMES, ids=[".".join(n) for n in _compat.PRIVATE_NAMES]
)
def test_private_name_exists(owner, attribute):
    assert hasattr(resolve(owner), attribute), f"{owner}.{attribute} is gone"


def test_the_check_fails_for_a_missing_name():
    assert not hasattr(resolve("keras.optimizers.Optimizer"), "_no_such_private_name")
    assert resolve("keras.optimizers.Optimizer") is keras.optimizers.Optimizer


def test_in_symbolic_scope_is_true_only_inside_keras_symbolic_scope():
    assert _compat.in_symbolic_scope() is False
    with keras.SymbolicScope():
        assert _compat.in_symbolic_scope() is True
    assert _compat.in_symbolic_scope() is False


def test_in_symbolic_scope_during_keras_shape_inference():
    # What `expert_parallel_dispatch` relies on: Keras's output-shape trace
    # of a layer runs inside the scope, an ordinary call outside it.
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(_compat.in_symbolic_scope())
            return x

    layer = Probe()
    layer.compute_output_spec(keras.KerasTensor((2, 3)))
    layer(keras.ops.ones((2, 3)))
    assert seen == [True, False]


@pytest.mark.parametrize(
    "optimizer, slots",
    [(keras.optimizers.Adam, ("momentum", "velocity")),
     (lambda: keras.optimizers.SGD(momentum=0.9), ("momentum",))],
    ids=["adam", "sgd-momentum"],
)
def test_optimizer_slot_names_start_with_the_variables_prefix(optimizer, slots):
    # Two variables whose prefixes overlap ("w" and "w_in"): the slot of
    # each still carries its own variable's full prefix.
    class Pair(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(name="w", shape=(2, 3))
            self.w_in = self.add_weight(name="w_in", shape=(4,))

        def call(self, x):
            return x

    layer = Pair(name="pair")
    layer.build((None, 3))
    opt = optimizer()
    opt.build(layer.trainable_variables)
    names = {v.name for v in opt.variables}
    for variable in layer.trainable_variables:
        prefix = _compat.optimizer_variable_prefix(variable)
        assert prefix == variable.path.replace("/", "_") + "_"
        for slot in slots:
            assert prefix + slot in names, (prefix, slot, sorted(names))
