"""Grouped matrix products whose graph does not grow with the number of groups.

`segment_matmul(rows, counts, weights)` multiplies each group of rows by its
own matrix: rows sorted by group, `counts[g]` of them in group `g`, times
`weights[g]`. It is the building block of the dropless dispatch for many
experts (`FeedForwardExperts.apply_sorted`) and of the secondary gates of
`HierarchicalGating` (`group_matmul`, rows in any order): one
`tf.while_loop` over the non-empty groups, so the traced graph holds the
same few ops for 8 groups or 4096, where a Python loop over the groups
(`apply_partitioned`) adds ops per group to the graph, forward and
backward, and trace time grows with them.

The backward pass is written by hand (`tf.custom_gradient`), because the
automatic gradient of `tf.gather(weights, g)` inside a `tf.while_loop`
is an `IndexedSlices` that `while_v2` accumulates by concatenation from
one iteration to the next: quadratic copying in the number of groups.
Here a second loop computes, per group, `d rows = d out @ W_g^T` and
`d W_g = rows_g^T @ d out_g`.

Where the bytes go (many groups of few rows are bound by memory traffic,
not arithmetic; measured at 1024 groups of 16 rows, d=512, m=1024):
- `W_g` is read through a slice along the first axis, which shares the
  weights' buffer, not through `tf.gather`, which copies 2 MiB per group
  per use (forward 2x faster);
- each `d W_g` is copied once into one `[G, d, m]` gradient that the loop
  fills in place (`tf.raw_ops.Empty` and `tf.raw_ops.InplaceUpdate`),
  instead of being kept in a `TensorArray` and stacked afterwards, which
  wrote the whole gradient a second time (0.52 s vs 0.74 s per layer).
  The buffer is zeroed first only when some group is empty: no iteration
  writes those groups' (zero) gradients.

Memory: the rows (`[P, d]`, `[P, m]`) and one weight-sized gradient
`[G, d, m]`, never `[blocks, d, m]` gathered weights nor anything of
`tokens * G * d`.
"""

import tensorflow as tf


def group_counts(group_index, num_groups):
    """int32 `[num_groups]`: how many rows each group has."""
    return tf.math.bincount(
        group_index, minlength=num_groups, maxlength=num_groups, dtype=tf.int32
    )


def sort_by_group(group_index, num_groups):
    """`(order, counts)`: a stable permutation grouping rows by group, and the counts.

    `tf.gather(t, order)` lists group 0's rows first (in their original
    order), then group 1's, and so on: the layout `segment_matmul` expects.
    """
    order = tf.argsort(group_index, stable=True)
    return tf.cast(order, tf.int32), group_counts(group_index, num_groups)


def _segments(counts):
    """`(groups, begins, sizes)` of the non-empty groups, in increasing order.

    `begins[i]`, `sizes[i]` are the `tf.slice` arguments of group
    `groups[i]`'s rows, worked out once outside the loop so that each
    iteration reads them instead of computing them.
    """
    starts = tf.cumsum(counts, exclusive=True)
    groups = tf.cast(tf.reshape(tf.where(counts > 0), [-1]), tf.int32)
    zeros = tf.zeros_like(groups)
    begins = tf.stack([tf.gather(starts, groups), zeros], axis=1)
    sizes = tf.stack([tf.gather(counts, groups), zeros - 1], axis=1)
    return groups, begins, sizes


def _weight(weights, g):
    """`weights[g]` as a view: a slice along the first axis shares the buffer.

    (`tf.gather(weights, g)` would copy the matrix, a full extra pass over
    the weights per group per use.)
    """
    return tf.squeeze(tf.slice(weights, tf.stack([g, 0, 0]), [1, -1, -1]), 0)


def _loop(num_iterations, body, arrays):
    """Run `body(i, arrays) -> arrays` for `i` in `[0, num_iterations)`."""
    # Iterations are independent (each writes its own TensorArray element),
    # so the executor may overlap them.
    results = tf.while_loop(
        lambda i, *_: i < num_iterations,
        lambda i, *arrays: (i + 1, *body(i, arrays)),
        (tf.constant(0, tf.int32), *arrays),
        parallel_iterations=16,
    )
    return tuple(results[1:])


def _array(dtype, size, element_shape):
    return tf.TensorArray(
        dtype, size=size, element_shape=element_shape, infer_shape=False
    )


def _rows_array(dtype, size, width):
    """A TensorArray of `size` row blocks `[n_i, width]`, and one empty block last.

    The empty block keeps `concat` defined when there are no groups at all
    (an eager TensorArray cannot concatenate nothing).
    """
    return _array(dtype, size + 1, [None, width]).write(size, tf.zeros([0, width], dtype))


def _forward(rows, counts, weights):
    groups, begins, sizes = _segments(counts)
    out_dim = weights.shape[-1]

    def body(i, arrays):
        (out,) = arrays
        part = tf.slice(rows, begins[i], sizes[i])
        return (out.write(i, tf.matmul(part, _weight(weights, groups[i]))),)

    size = tf.size(groups)
    (out,) = _loop(size, body, (_rows_array(rows.dtype, size, out_dim),))
    # The non-empty groups in increasing order: exactly the sorted rows.
    return out.concat()


def _gradient_buffer(weights, counts):
    """An uninitialised `weights`-shaped tensor for the loop to fill in place.

    Zeroed only when some group is empty: the loop writes every non-empty
    group's gradient, and an empty group's gradient is zero. `Empty` is a
    stateful op, so graph optimisation neither folds nor shares it, and the
    buffer has no other reader while the loop writes it.
    """
    shape, dtype = tf.shape(weights), weights.dtype
    return tf.cond(
        tf.reduce_all(counts > 0),
        lambda: tf.raw_ops.Empty(shape=shape, dtype=dtype, init=False),
        lambda: tf.raw_ops.Empty(shape=shape, dtype=dtype, init=True),
    )


def _backward(rows, counts, weights, grad):
    groups, begins, sizes = _segments(counts)
    in_dim = weights.shape[-2]

    def body(i, arrays):
        grad_rows, grad_weights = arrays
        g = groups[i]
        part = tf.slice(rows, begins[i], sizes[i])
        part_grad = tf.slice(grad, begins[i], sizes[i])
        # (W_g @ grad^T)^T rather than grad @ W_g^T: the same product, but
        # oneDNN's kernel for a few rows times a transposed weight matrix was
        # measured 4x slower here (1024 experts of 16 rows, d=512, h=1024).
        grad_rows = grad_rows.write(
            i, tf.transpose(tf.matmul(_weight(weights, g), part_grad, transpose_b=True))
        )
        # Written in place into row g of the [G, d, m] gradient (see the
        # module docstring); nothing else holds that buffer.
        grad_weights = tf.raw_ops.InplaceUpdate(
            x=grad_weights, i=tf.reshape(g, [1]),
            v=tf.matmul(part, part_grad, transpose_a=True)[None],
        )
        return grad_rows, grad_weights

    size = tf.size(groups)
    grad_rows, grad_weights = _loop(
        size, body, (_rows_array(rows.dtype, size, in_dim), _gradient_buffer(weights, counts)),
    )
    grad_weights.set_shape(weights.shape)
    return grad_rows.concat(), grad_weights


def segment_matmul(rows, counts, weights):
    """`out[p] = rows[p] @ weights[g(p)]` for rows sorted by group.

    Args:
        rows: `[P, d]`, group 0's rows first, then group 1's, ...
        counts: int32 `[G]`, rows per group (summing to `P`).
        weights: `[G, d, m]`.

    Returns:
        `[P, m]`, in the order of `rows`. Differentiable in `rows` and
        `weights`; the graph (forward and backward) is the same for any `G`.

    Example:

    >>> rows = tf.constant([[1.0], [2.0], [3.0]])
    >>> weights = tf.constant([[[10.0]], [[0.0]], [[100.0]]])
    >>> segment_matmul(rows, tf.constant([2, 0, 1]), weights).numpy().ravel()
    array([ 10.,  20., 300.], dtype=float32)
    """
    counts = tf.cast(counts, tf.int32)

    @tf.custom_gradient
    def product(rows, weights):
        def grad(upstream):
            return _backward(rows, counts, weights, upstream)

        return _forward(rows, counts, weights), grad

    out = product(rows, weights)
    out.set_shape(rows.shape[:1].concatenate(weights.shape[-1:]))
    return out


def gather_rows(table, index):
    """`tf.gather(table, index)` whose gradient is a dense `table`-shaped tensor.

    For per-expert biases added to rows sorted by expert: the gradient of a
    plain gather is an `IndexedSlices` of `[P, width]`, where the experts'
    other gradients (and those of `apply_partitioned`) are dense.
    """
    num_rows = tf.shape(table)[0]

    @tf.custom_gradient
    def gathered(table):
        def grad(upstream):
            return tf.math.unsorted_segment_sum(upstream, index, num_rows)

        return tf.gather(table, index), grad

    return gathered(table)
