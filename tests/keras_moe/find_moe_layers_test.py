"""`keras_moe.monitoring.find_moe_layers`: MoE layers found through public attributes,
however deeply custom layers and models nest them."""

import keras

import keras_moe
from keras_moe import monitoring


def moe(name):
    return keras_moe.MoE(num_experts=4, expert_hidden_dim=4, k=1, name=name)


class Block(keras.layers.Layer):
    """A custom layer keeping MoE layers in an attribute, a list and a dict."""

    def __init__(self, prefix, **kwargs):
        super().__init__(**kwargs)
        self.first = moe(f"{prefix}_first")
        self.stack = [keras.layers.Dense(3), moe(f"{prefix}_listed")]
        self.by_name = {"last": moe(f"{prefix}_keyed")}

    def call(self, x):
        x = self.first(x)
        for layer in self.stack:
            x = layer(x)
        return self.by_name["last"](x)


class Tower(keras.Model):
    """A subclassed model holding custom layers (and a shared one twice)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [Block("a"), Block("b")]
        self.again = self.blocks[0]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_nested_moe_layers_are_found_once_in_order():
    tower = Tower()
    tower(keras.ops.ones((2, 3)))
    expected = [f"{p}_{n}" for p in "ab" for n in ("first", "listed", "keyed")]
    assert [layer.name for layer in monitoring.find_moe_layers(tower)] == expected
    # A functional model around it: its own MoE first, then the nested ones.
    inputs = keras.Input((3,))
    outer = keras.Model(inputs, tower(moe("outer")(inputs)))
    assert [layer.name for layer in monitoring.find_moe_layers(outer)] == ["outer", *expected]


def test_private_attributes_are_not_walked():
    # e.g. the one-device evaluation copy the pipelines keep under a
    # private attribute of the model: its layers are not the model's.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, moe("mine")(inputs))
    copy = keras.Model(inputs, moe("copy")(inputs))
    model.__dict__["_keras_moe_evaluation_copy"] = copy
    assert [layer.name for layer in monitoring.find_moe_layers(model)] == ["mine"]
