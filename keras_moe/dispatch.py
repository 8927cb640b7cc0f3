"""Sending tokens to their experts and combining the answers.

Both dispatchers take the flat pair list of a `GateDecision`
(`token_index`, `expert_index`, `gate`, each `[P]`, with `P = N * k` for
top-k gating) and never materialise anything of size `N * E * d` or
`N * E * h`: the largest buffers are `[P, d]` and `[P, h]` (dropless) or
`[E, C, d]` with `E * C ~= capacity_factor * P` (capacity mode).

- `dropless_dispatch`: `tf.dynamic_partition` groups the routed rows by
  expert, each expert runs on exactly its rows, `tf.dynamic_stitch` puts the
  answers back in pair order and `unsorted_segment_sum` adds each token's
  gated answers. Shapes are data-dependent, so it runs in TensorFlow graphs
  but not under XLA.
- `capacity_dispatch`: each expert gets a static buffer of
  `C = ceil(capacity_factor * N * k / E)` rows; pairs beyond an expert's
  capacity are dropped (their contribution is 0). All shapes are static
  given `N`, as XLA and TPUs require.
"""

import math

import tensorflow as tf


def partitioned_apply(rows, group_index, num_groups, fn):
    """Apply `fn(parts)` to `rows` grouped by `group_index`; restore row order.

    Args:
        rows: `[P, d]`.
        group_index: int32 `[P]` in `[0, num_groups)`.
        num_groups: int.
        fn: callable mapping a list of `num_groups` tensors `[n_g, d]` to a
            list of `num_groups` tensors `[n_g, out]`.

    Returns:
        `[P, out]`, row `p` computed by group `group_index[p]`.
    """
    positions = tf.range(tf.shape(group_index)[0], dtype=tf.int32)
    parts = tf.dynamic_partition(rows, group_index, num_groups)
    part_positions = tf.dynamic_partition(positions, group_index, num_groups)
    outputs = fn(parts)
    return tf.dynamic_stitch(part_positions, outputs)


def dropless_dispatch(x, token_index, expert_index, gate, experts, num_tokens, training=False):
    """Every pair reaches its expert; compute follows the number of pairs.

    Rows are grouped by expert with `tf.dynamic_partition`, each expert runs
    on exactly its own rows, and the answers are put back in pair order.
    (A padded `[E, max n_e, d]` buffer with one batched matmul was measured
    slower on CPU, and it grows towards `N * E * d` when routing collapses.)

    Args:
        x: `[N, d]` tokens.
        token_index, expert_index: int32 `[P]`.
        gate: float `[P]`.
        experts: a `FeedForwardExperts`.
        num_tokens: `N` (int or scalar tensor).
        training: bool, passed to the experts (their dropout).

    Returns:
        `[N, out]`: `y_t = sum over pairs (t, e, g) of g * E_e(x_t)`.
    """
    routed = tf.gather(x, token_index)
    answers = partitioned_apply(
        routed, expert_index, experts.num_experts,
        lambda parts: experts.apply_partitioned(parts, training=training),
    )
    weighted = answers * tf.cast(gate, answers.dtype)[:, None]
    return tf.math.unsorted_segment_sum(weighted, token_index, num_tokens)


def expert_capacity(capacity_factor, num_pairs, num_experts):
    """`ceil(capacity_factor * P / E)`, at least 1 (static when `P` is)."""
    if isinstance(num_pairs, int):
        return max(1, int(math.ceil(capacity_factor * num_pairs / num_experts)))
    capacity = tf.math.ceil(capacity_factor * tf.cast(num_pairs, tf.float32) / num_experts)
    return tf.maximum(tf.cast(capacity, tf.int32), 1)


def capacity_positions(expert_index, valid, num_experts, priority):
    """Each pair's position in its expert's queue.

    Pairs are queued by `priority` (lower first; ties keep pair order).
    Invalid pairs are queued behind everything in a dummy expert and never
    take a place.

    Args:
        expert_index: int32 `[P]`.
        valid: bool `[P]`.
        num_experts: int.
        priority: int32 `[P]` (e.g. the rank of the choice: 0 for a token's
            first expert), so first choices are served before second ones.

    Returns:
        int32 `[P]` position (0-based) within the expert's queue.
    """
    num_pairs = tf.shape(expert_index)[0]
    queue = tf.where(valid, expert_index, num_experts)
    # One stable sort on (expert, priority); stability keeps pair order.
    levels = tf.cast(tf.reduce_max(priority) + 1, tf.int64)
    key = tf.cast(queue, tf.int64) * levels + tf.cast(priority, tf.int64)
    order = tf.argsort(key, stable=True)
    sorted_queue = tf.gather(queue, order)
    per_queue = tf.math.unsorted_segment_sum(
        tf.ones_like(sorted_queue), sorted_queue, num_experts + 1
    )
    starts = tf.cumsum(per_queue, exclusive=True)
    sorted_position = tf.range(num_pairs) - tf.gather(starts, sorted_queue)
    return tf.scatter_nd(order[:, None], sorted_position, tf.shape(order))


def capacity_dispatch(
    x, token_index, expert_index, gate, experts, num_tokens, capacity_factor,
    valid=None, priority=None, training=False,
):
    """Static-capacity dispatch; overflow pairs are dropped.

    Args:
        x: `[N, d]`.
        token_index, expert_index: int32 `[P]`.
        gate: float `[P]`.
        experts: a `FeedForwardExperts`.
        num_tokens: `N`.
        capacity_factor: float > 0.
        valid: optional bool `[P]`; invalid (masked) pairs are neither
            computed nor counted as dropped.
        priority: optional int32 `[P]`, queue priority (see
            `capacity_positions`).
        training: bool, passed to the experts (their dropout).

    Returns:
        `(y [N, out], dropped_fraction)`, the fraction of valid pairs that
        found their expert full.
    """
    num_pairs_static = expert_index.shape[0]
    num_pairs = num_pairs_static if num_pairs_static is not None else tf.shape(expert_index)[0]
    capacity = expert_capacity(capacity_factor, num_pairs, experts.num_experts)
    if valid is None:
        valid = tf.ones_like(expert_index, dtype=tf.bool)
    if priority is None:
        priority = tf.zeros_like(expert_index)
    y, keep = _buffered_dispatch(
        x, token_index, expert_index, gate, experts, num_tokens, capacity, valid, priority,
        training,
    )
    num_valid = tf.reduce_sum(tf.cast(valid, tf.float32))
    num_dropped = num_valid - tf.reduce_sum(tf.cast(keep, tf.float32))
    return y, tf.math.divide_no_nan(num_dropped, num_valid)


def _buffered_dispatch(
    x, token_index, expert_index, gate, experts, num_tokens, capacity, valid, priority,
    training,
):
    """Run experts on an `[E, capacity, d]` buffer; returns `(y, keep)`."""
    num_experts = experts.num_experts
    position = capacity_positions(expert_index, valid, num_experts, priority)
    keep = tf.logical_and(valid, position < capacity)
    num_slots = num_experts * capacity
    # Dropped and invalid pairs all go to one extra slot that is discarded.
    slot = tf.where(keep, expert_index * capacity + position, num_slots)

    d = x.shape[-1]
    routed = tf.gather(x, token_index)
    buffer = tf.math.unsorted_segment_sum(routed, slot, num_slots + 1)[:num_slots]
    buffer = tf.reshape(buffer, [num_experts, capacity, d])
    answers = experts(buffer, training=training)
    out = answers.shape[-1]
    answers = tf.reshape(answers, [num_slots, out])
    answers = tf.concat([answers, tf.zeros([1, out], answers.dtype)], axis=0)
    per_pair = tf.gather(answers, slot) * tf.cast(gate, answers.dtype)[:, None]
    return tf.math.unsorted_segment_sum(per_pair, token_index, num_tokens), keep
