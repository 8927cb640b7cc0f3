"""Sending tokens to their experts and combining the answers.

Both dispatchers take the flat pair list of a `GateDecision`
(`token_index`, `expert_index`, `gate`, each `[P]`, with `P = N * k` for
top-k gating) and never materialise anything of size `N * E * d` or
`N * E * h`: the largest buffers are `[P, d]` and `[P, h]` (dropless) or
`[E, C, d]` with `E * C ~= capacity_factor * P` (capacity mode).

- `dropless_dispatch`: each expert runs on exactly its routed rows and
  `unsorted_segment_sum` adds each token's gated answers. Up to
  `LOOP_MIN_EXPERTS` experts, `tf.dynamic_partition` groups the rows and a
  Python loop runs the experts (`tf.dynamic_stitch` restores pair order);
  from there on the rows are sorted by expert and each layer is one
  `tf.while_loop` over the experts (`keras_moe.grouped`), so the graph
  stays the same size for any `E`. Shapes are data-dependent, so it runs in
  TensorFlow graphs but not under XLA.
- `capacity_dispatch`: each expert gets a static buffer of
  `C = ceil(capacity_factor * N * k / E)` rows; pairs beyond an expert's
  capacity are dropped (their contribution is 0). All shapes are static
  given `N`, as XLA and TPUs require.
"""

import math

import tensorflow as tf

from keras_moe import grouped


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


# From this many experts on, `dropless_dispatch` runs the experts in a
# `tf.while_loop` (`FeedForwardExperts.apply_sorted`) instead of one unrolled
# Python loop over them (`apply_partitioned`). Below it the unrolled graph is
# small, traces in seconds, and its per-step time is measured equal or lower;
# above it the unrolled graph's trace time grows linearly with E (measured
# under load, 2-layer HierarchicalMoE, d=h=16: 31 s at E=256, 141 s at 1024)
# while the loop's stays constant. See benchmarks/trace_time.py and
# docs/performance.md for the crossover measurement.
LOOP_MIN_EXPERTS = 64

STRATEGIES = ("auto", "unrolled", "loop")


def dropless_strategy(num_experts, strategy="auto"):
    """`"unrolled"` or `"loop"`: how `dropless_dispatch` runs `num_experts` experts.

    Args:
        num_experts: int.
        strategy: `"auto"` (by `num_experts`, see `LOOP_MIN_EXPERTS`),
            `"unrolled"` or `"loop"`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}. Received: strategy={strategy!r}")
    if strategy == "auto":
        return "loop" if num_experts >= LOOP_MIN_EXPERTS else "unrolled"
    return strategy


def grouped_matmul(rows, group_index, weights, strategy="auto"):
    """`out[p] = rows[p] @ weights[group_index[p]]`, rows in any order.

    The secondary gates of `HierarchicalGating` use it: each row (a token
    sent to a group) is multiplied by its group's gate matrix. Chosen as
    `dropless_dispatch` chooses, by the number of groups `G`: below
    `LOOP_MIN_EXPERTS`, `tf.dynamic_partition` and one matmul per group
    (a few ops per group in the graph); from there on, the rows are sorted
    by group and multiplied by one `keras_moe.grouped.segment_matmul`, a
    graph whose size does not depend on `G`.

    Args:
        rows: `[P, d]`.
        group_index: int32 `[P]` in `[0, G)`.
        weights: `[G, d, m]` with a static `G`.
        strategy: `"auto"`, `"unrolled"` or `"loop"` (see `dropless_strategy`).

    Returns:
        `[P, m]` in the order of `rows`; differentiable in `rows` and `weights`.
    """
    num_groups = weights.shape[0]
    if dropless_strategy(num_groups, strategy) == "loop":
        order, counts = grouped.sort_by_group(group_index, num_groups)
        products = grouped.segment_matmul(tf.gather(rows, order), counts, weights)
        # Back to row order: sorted position of row p is inverse[p].
        return tf.gather(products, tf.math.invert_permutation(order))
    matrices = tf.unstack(weights)
    return partitioned_apply(
        rows, group_index, num_groups,
        lambda parts: [tf.matmul(part, matrices[g]) for g, part in enumerate(parts)],
    )


def dropless_dispatch(
    x, token_index, expert_index, gate, experts, num_tokens, training=False, strategy="auto",
):
    """Every pair reaches its expert; compute follows the number of pairs.

    Two exact ways to run the experts on their rows:

    - `"unrolled"`: `tf.dynamic_partition` groups the routed rows by
      expert, each expert runs on exactly its own rows in a Python loop
      (`FeedForwardExperts.apply_partitioned`), and the answers are put back
      in pair order. The graph holds a few ops per expert, forward and
      backward, so trace time and per-step op overhead grow with `E`.
    - `"loop"`: the pairs are sorted by expert once, and each layer is one
      `tf.while_loop` over the non-empty experts
      (`FeedForwardExperts.apply_sorted`): a graph whose size does not
      depend on `E`.

    (A padded `[E, max n_e, d]` buffer with one batched matmul was measured
    slower on CPU, and it grows towards `N * E * d` when routing collapses.)

    Args:
        x: `[N, d]` tokens.
        token_index, expert_index: int32 `[P]`.
        gate: float `[P]`.
        experts: a `FeedForwardExperts`.
        num_tokens: `N` (int or scalar tensor).
        training: bool, passed to the experts (their dropout).
        strategy: `"auto"` (the default: `"loop"` from `LOOP_MIN_EXPERTS`
            experts on), `"unrolled"` or `"loop"`.

    Returns:
        `[N, out]`: `y_t = sum over pairs (t, e, g) of g * E_e(x_t)`.
    """
    if dropless_strategy(experts.num_experts, strategy) == "loop":
        order, counts = grouped.sort_by_group(expert_index, experts.num_experts)
        # Nothing is put back in pair order: the gated answers are summed
        # per token straight from the sorted layout.
        token_index = tf.gather(token_index, order)
        gate = tf.gather(gate, order)
        answers = experts.apply_sorted(tf.gather(x, token_index), counts, training=training)
    else:
        answers = partitioned_apply(
            tf.gather(x, token_index), expert_index, experts.num_experts,
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
