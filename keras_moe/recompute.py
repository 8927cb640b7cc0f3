"""Recomputing the experts' hidden activations in the backward pass (App. D).

For an expert `y = act(x W_in + b_in) W_out + b_out` the backward pass needs
`x`, the pre-activation and the hidden activation `act(x W_in + b_in)`.
With `h` several times `d` (the paper's experts have `h = 4d` and more) the
`[rows, h]` hidden tensors are the largest thing the experts keep alive
between forward and backward. Appendix D of Shazeer et al. (2017) trades
compute for that memory: keep only the experts' inputs and compute the
hidden layer again when the gradients are needed, one more expert forward
pass per step (about a third more expert FLOPs).

`recomputable` decorates the expert network's evaluation methods
(`keras_moe.FeedForwardExperts.call`, `apply_partitioned`, `apply_sorted`):
when the layer's `recompute_hidden` is True the method runs under
`tf.recompute_grad`, whose forward pass records nothing for the gradient
tape, and whose backward pass runs the method again under a tape of its own
(with a data dependency on the incoming gradient, so graph optimisers cannot
merge the second forward pass back into the first one).

Dropout must draw the same mask both times. `dropout` therefore takes its
seeds from a replayable stream while a recomputable method runs: one seed is
drawn from the layer's `SeedGenerator` outside the recomputed function, and
the `i`-th dropout inside it uses `stateless_fold_in(seed, i)`, which the
recomputation reproduces exactly.
"""

import functools
import inspect
import threading

import keras
import tensorflow as tf

_ACTIVE = threading.local()


class _SeedStream:
    """The `i`-th call of `next` returns `stateless_fold_in(base, i)`: replayable."""

    def __init__(self, base):
        self.base = base
        self.count = 0

    def next(self):
        seed = tf.random.experimental.stateless_fold_in(self.base, self.count)
        self.count += 1
        return seed


def _streams():
    if not hasattr(_ACTIVE, "streams"):
        _ACTIVE.streams = {}
    return _ACTIVE.streams


def dropout(inputs, rate, seed_generator):
    """Inverted dropout as `keras.random.dropout`, replayable under recomputation.

    Args:
        inputs: a float tensor.
        rate: float in [0, 1).
        seed_generator: the layer's `keras.random.SeedGenerator`.

    Returns:
        `inputs` with a fraction `rate` of entries zeroed and the rest scaled
        by `1 / (1 - rate)`. Inside a recomputed method the mask comes from
        the method's replayable seed stream, so the backward pass's second
        forward pass draws the same mask.
    """
    stream = _streams().get(id(seed_generator))
    if stream is None:
        return keras.random.dropout(inputs, rate, seed=seed_generator)
    seed = tf.cast(stream.next(), tf.int32)
    return tf.nn.experimental.stateless_dropout(inputs, rate=rate, seed=seed)


def _float_tensor(value):
    return tf.is_tensor(value) and value.dtype.is_floating


def recomputable(method):
    """Decorates an expert-network method to recompute its activations if asked.

    The decorated method runs unchanged when `layer.recompute_hidden` is
    False. When it is True, the method's floating-point tensor arguments
    (nested lists included) become the inputs of a `tf.recompute_grad`
    function; everything else (integer counts, the `training` flag) is held
    fixed. The method must read its weights from the layer: their gradients
    reach the layer's variables through `tf.recompute_grad`'s `variables`.

    Args:
        method: `method(layer, *args, **kwargs)` returning a tensor or a
            list of tensors.

    Returns:
        The wrapped method.

    Example:

    >>> class Square(keras.layers.Layer):
    ...     recompute_hidden = True
    ...     @recomputable
    ...     def call(self, x):
    ...         return tf.square(x)
    >>> x = tf.constant([1.0, 3.0])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = Square()(x)
    >>> tape.gradient(y, x).numpy().tolist()
    [2.0, 6.0]
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(layer, *args, **kwargs):
        if not getattr(layer, "recompute_hidden", False):
            return method(layer, *args, **kwargs)
        bound = signature.bind(layer, *args, **kwargs)
        structure = (bound.args[1:], bound.kwargs)
        flat = tf.nest.flatten(structure)
        where = [i for i, value in enumerate(flat) if _float_tensor(value)]
        generator = getattr(layer, "seed_generator", None)
        training = bound.arguments.get("training")
        # Drawn outside the recomputed function: the backward pass must not
        # advance the generator, and must see this same seed again.
        base = generator.next() if generator is not None and training else None
        out_structure = []

        def run(*tensors):
            values = list(flat)
            for i, tensor in zip(where, tensors, strict=True):
                values[i] = tensor
            call_args, call_kwargs = tf.nest.pack_sequence_as(structure, values)
            streams = _streams()
            if base is not None:
                streams[id(generator)] = _SeedStream(base)
            try:
                result = method(layer, *call_args, **call_kwargs)
            finally:
                streams.pop(id(generator), None)
            out_structure[:] = [result]
            return tf.nest.flatten(result)

        outputs = tf.recompute_grad(run)(*[flat[i] for i in where])
        return tf.nest.pack_sequence_as(out_structure[0], list(outputs))

    return wrapper
