"""Blocks both model families build: the MoE block (flat or hierarchical) and its dense twin.

`LanguageModel` and `TranslationModel` place these between their LSTMs; one
copy here keeps the two models' MoE and compute-matched dense blocks alike.
"""

import keras

import keras_moe
from keras_moe.validation import check_number

MOE_ACTIVATIONS = ("sigmoid", "linear")


def check_moe_activation(moe_activation):
    """ValueError unless `moe_activation` is `"sigmoid"` (the paper's) or `"linear"`.

    Example:

    >>> check_moe_activation("sigmoid")
    """
    if moe_activation not in MOE_ACTIVATIONS:
        raise ValueError(
            f"`moe_activation` must be one of {', '.join(map(repr, MOE_ACTIVATIONS))}. "
            f"Received: moe_activation={moe_activation!r}"
        )


def check_moe_output_scale(moe_output_scale):
    """ValueError unless `moe_output_scale` is a finite number > 0 (1.0: the paper's).

    Example:

    >>> check_moe_output_scale(4.0)
    """
    check_number("moe_output_scale", moe_output_scale)


def moe_output(y, moe_activation, moe_output_scale=1.0):
    """An MoE block's output before its dropout: `activation(moe_output_scale * y)`.

    `y` is the MoE layer's gate-weighted sum of expert outputs (Eq. 1). The
    top-k gates sum to 1, so each of the `k` experts a position uses is
    weighted about `1/k`. Adam moves every weight by about the same step,
    so a step on the experts moves the block's output about
    `k * sqrt((d + h) / (d + k * h))` times less than the same step moves
    the dense block of `k * h` hidden units (`d` the width, `h` an
    expert's hidden width; the square root because narrower Glorot-
    initialised experts start with larger hidden activations): 2.5 times
    less at the `cpu-*` presets' sizes. The MoE block then learns slower
    than its dense twin. A scale of `k` (`k * k` for a hierarchical MoE,
    whose gate products also sum to 1) removes the `k`. An option: the
    paper has no such factor (1.0).

    Example:

    >>> float(moe_output(keras.ops.ones(()), "linear", 4.0))
    4.0
    """
    if moe_output_scale != 1.0:
        y = y * moe_output_scale
    return keras.activations.sigmoid(y) if moe_activation == "sigmoid" else y


def block_seed(seed, block, offset=0):
    """The seed of one block of a model, or of one of its dropout sites (None stays None).

    `seed + 100 * block + offset`. Keras layers built with one seed draw
    the same random numbers: dropout sites would drop the same units at
    every call, and blocks of one shape would start with equal weights.
    The MoE layer takes a few seeds above its own (initialisers, noise,
    expert dropout), well under 50.

    Example:

    >>> block_seed(1, 2), block_seed(1, 2, 50), block_seed(None, 2)
    (201, 251, None)
    """
    return None if seed is None else seed + 100 * block + offset


def check_groups(num_experts, num_groups):
    """ValueError unless `num_groups` (0: flat) divides `num_experts`.

    Example:

    >>> check_groups(32, 4)
    >>> check_groups(32, 0)
    """
    if num_groups and num_experts % num_groups:
        raise ValueError(
            "`num_experts` must be a multiple of `num_groups`. "
            f"Received: num_experts={num_experts}, num_groups={num_groups}"
        )


def moe_block(num_experts, num_groups, k, name, **moe_kwargs):
    """A `keras_moe.MoE` of `num_experts`, or with `num_groups > 0` a hierarchical one.

    The hierarchical MoE (App. B) has `num_groups` groups of
    `num_experts // num_groups` experts and keeps `k` per level, so each
    position runs `k * k` experts.

    Args:
        num_experts, num_groups, k: as above.
        name: layer name.
        **moe_kwargs: further `MoE` / `HierarchicalMoE` arguments
            (`expert_hidden_dim`, `gating`, the balancing weights, ...).

    Example:

    >>> moe_block(8, 2, 2, "moe", expert_hidden_dim=4).num_experts
    8
    """
    check_groups(num_experts, num_groups)
    if num_groups:
        return keras_moe.HierarchicalMoE(
            num_groups, num_experts // num_groups, k_primary=k, k_secondary=k, name=name,
            **moe_kwargs,
        )
    return keras_moe.MoE(num_experts, k=k, name=name, **moe_kwargs)


def feed_forward_block(hidden_dim, output_dim, name, dropout=0.0, seed=None):
    """Dense `relu(x W_in + b_in) W_out + b_out`: the compute-matched baseline block.

    With `dropout > 0`, dropout on the hidden layer in training, as the MoE
    block's `expert_dropout` puts it on its experts' hidden layers (the
    dense block is the MoE's experts merged into one).

    Example:

    >>> feed_forward_block(16, 4, "ffn").get_layer("ffn_in").units
    16
    >>> [layer.name for layer in feed_forward_block(16, 4, "ffn", dropout=0.3).layers]
    ['ffn_in', 'ffn_dropout', 'ffn_out']
    """
    layers = [keras.layers.Dense(hidden_dim, activation="relu", name="ffn_in")]
    if dropout:
        # A Sequential passes `training` on to its Dropout.
        layers.append(keras.layers.Dropout(dropout, seed=seed, name="ffn_dropout"))
    layers.append(keras.layers.Dense(output_dim, name="ffn_out"))
    return keras.Sequential(layers, name=name)
