"""Each private Keras/TensorFlow name in keras_moe/_compat.py still exists, by name."""

import importlib

import pytest

from keras_moe import _compat


def resolve(dotted):
    module, _, rest = dotted.partition(".")
    obj = importlib.import_module(module)
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("owner, attribute", _compat.PRIVATE_NAMES,
                         ids=[f"{o}.{a}" for o, a in _compat.PRIVATE_NAMES])
def test_private_name_still_exists(owner, attribute):
    assert hasattr(resolve(owner), attribute), (
        f"{owner}.{attribute} is gone: keras_moe/_compat.py must be updated for this release"
    )


def test_the_check_fails_for_a_missing_name():
    assert not hasattr(resolve("keras.optimizers.Optimizer"), "_no_such_private_name")
