"""The MoE block's output scale: why an MoE block learns slower than its dense twin.

`blocks.moe_output` states that one Adam step on the experts moves the MoE
block's output `k * sqrt((d + h) / (d + k * h))` times less than the same
step moves the dense block of `k * h` units, and that `moe_output_scale=k`
removes the `k`. Both are checked here against that formula, worked out
by hand: Adam's first step moves each weight by about its learning rate;
an expert's output weights reach the block's output through a gate of
about `1/k`, the dense block's directly; Glorot initialisation gives the
narrower experts hidden activations `sqrt((d + k * h) / (d + h))` times
larger.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe.models.blocks import feed_forward_block, moe_output


def _first_adam_step_change(block, variables, x, direction):
    """||f(x) after - f(x) before|| for one Adam step on <direction, f(x)>."""
    before = block(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(direction * block(x))
    grads = tape.gradient(loss, variables)
    keras.optimizers.Adam(1e-3).apply_gradients(zip(grads, variables, strict=True))
    return float(tf.norm(block(x) - before))


@pytest.mark.parametrize("d, h, k", [(64, 64, 4), (64, 32, 2)])
def test_an_adam_step_moves_the_moe_block_k_times_less_unless_scaled(d, h, k):
    predicted = k * math.sqrt((d + h) / (d + k * h))
    for seed in range(2):
        rng = np.random.default_rng(seed)
        x = tf.constant(rng.normal(size=(1024, d)), tf.float32)
        direction = tf.constant(rng.normal(size=(1024, d)), tf.float32)
        keras.utils.set_random_seed(seed)
        dense = feed_forward_block(k * h, d, "ffn")
        dense.build((None, d))
        dense_change = _first_adam_step_change(dense, dense.trainable_variables, x, direction)
        for scale in (1.0, float(k)):
            moe = keras_moe.MoE(8, k=k, expert_hidden_dim=h, seed=seed)
            moe.build((None, d))

            def block(inputs, moe=moe, scale=scale):
                return moe_output(moe(inputs, training=False), "linear", scale)

            # The experts only: a first step on the zero-initialised gate
            # changes which experts are chosen, not how fast they learn.
            change = _first_adam_step_change(block, moe.experts.trainable_variables, x,
                                             direction)
            assert dense_change / change == pytest.approx(predicted / scale, rel=0.1)


def test_dense_block_hidden_dropout_drops_or_scales_each_hidden_unit():
    # Identity weights and positive inputs: each output element is its
    # hidden unit, so it is 0 (dropped) or x / (1 - p) (kept), and about
    # 1 - p of them are kept (four binomial standard deviations).
    rate, width = 0.3, 4
    block = feed_forward_block(width, width, "ffn", dropout=rate, seed=1)
    block.build((None, width))
    for name in ("ffn_in", "ffn_out"):
        block.get_layer(name).kernel.assign(np.eye(width, dtype=np.float32))
    x = np.random.default_rng(0).uniform(0.5, 1.5, size=(5000, width)).astype(np.float32)
    np.testing.assert_allclose(block(x, training=False), x, rtol=1e-6)
    y = np.asarray(block(x, training=True))
    dropped = y == 0.0
    np.testing.assert_allclose(y[~dropped], x[~dropped] / (1 - rate), rtol=1e-5)
    kept = 1 - dropped.mean()
    assert abs(kept - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / x.size)
    assert [layer.name for layer in feed_forward_block(4, 4, "ffn").layers] == ["ffn_in", "ffn_out"]
