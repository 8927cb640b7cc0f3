"""Expert parallelism under `tf.distribute.MirroredStrategy`.

The paper's recipe for scale (Section 3.1): the dense parts of the network
are data parallel, the experts are model parallel, and every expert sees the
tokens of *all* replicas routed to it. With `R` replicas each replica holds
`E / R` experts:

- **Storage.** An expert variable is created by the strategy as usual (a
  `MirroredVariable`), but with the *local* shape `[E / R, ...]`, and its
  per-device components are given different values: component `r` holds
  experts `r * E / R ... (r + 1) * E / R - 1`. Reading the variable inside a
  replica reads that replica's component, so each replica computes with its
  own experts and stores only them.
- **Exchange.** TensorFlow's `ReplicaContext` offers `all_gather` and
  `all_reduce` with gradients under `MirroredStrategy`; its all-to-all ops are
  either not usable on CPU (`all_to_all_v2` timed out) or have no gradient
  and need communicators managed by hand (`all_to_all_v3`; see
  `../shared/notes/tf-distribute.md` and `docs/distributed.md`). So tokens
  travel by one `all_gather` (each replica's tokens and routing decisions go
  to every replica), each replica runs its experts on the pairs routed to
  them, and one `all_reduce(SUM)` of the `[tokens of all replicas, out]`
  partial outputs hands every token the sum over its experts; each replica
  keeps its own rows. The backward pass is what TensorFlow registers for
  these two collectives: an all-reduce of the output gradient, and for the
  all-gather an all-reduce followed by a slice.
- **Gradients.** Through these collectives an expert's gradient on its
  replica already sums the contributions of every replica's tokens. It must
  therefore *not* be all-reduced again, and each component must be updated
  with its own gradient. Keras's optimizers all-reduce every gradient they
  are given, so training opts in explicitly:
  `keras_moe.ExpertParallelOptimizer` (`keras_moe/expert_optimizer.py`)
  wraps the optimizer, hands it every other gradient and updates the
  variables marked here per replica; it also saves their slot variables
  (Adam's moments) whole.

Everything not marked (gating, the rest of the model) stays data parallel.
"""

import weakref

import numpy as np
import tensorflow as tf

from keras_moe import _compat

# id(Keras variable) -> weak reference to it, for every variable whose
# per-replica components hold different experts. Keras variables are not
# hashable (`==` is elementwise), hence ids; the weak reference tells a
# live variable from a later object that reuses its id.
_SHARDED = {}


def _tf_variable(variable):
    """The `tf.Variable` (a `MirroredVariable` under the strategy) of a Keras variable."""
    value = getattr(variable, "value", variable)
    return value if isinstance(value, tf.Variable) else variable


def mark_sharded(variable):
    """Record that `variable`'s per-replica components hold different experts.

    Args:
        variable: a `keras.Variable` (a layer's weight or an optimizer's slot).
    """
    key = id(variable)
    _SHARDED[key] = weakref.ref(variable, lambda _: _SHARDED.pop(key, None))


def is_sharded(variable):
    """Whether `variable` (a `keras.Variable`) was marked by `mark_sharded`."""
    ref = _SHARDED.get(id(variable))
    return ref is not None and ref() is variable


def components(variable):
    """The per-device component variables of a (mirrored) Keras variable, in replica order."""
    variable = _tf_variable(variable)
    strategy = getattr(variable, "distribute_strategy", None)
    if strategy is None:
        return [variable]
    return list(strategy.experimental_local_results(variable))


def num_shards_for(num_experts, strategy=None):
    """How many shards an expert-parallel layer built now would use.

    Args:
        num_experts: the layer's expert count.
        strategy: a `tf.distribute.Strategy`, default the current one.

    Returns:
        The strategy's replica count `R` (1 outside a strategy).

    Raises:
        ValueError: `num_experts` is not divisible by `R`, or the strategy
            is not a `MirroredStrategy` (the only one whose variables hold
            one component per replica of this process).
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if replicas <= 1:
        return 1
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        raise ValueError(
            "Expert parallelism needs a `tf.distribute.MirroredStrategy` (each replica of "
            f"this process holds its own experts). Received: {type(strategy).__name__} with "
            f"{replicas} replicas"
        )
    if num_experts % replicas:
        raise ValueError(
            f"Expert parallelism splits the experts evenly over the replicas: `num_experts` "
            f"must be divisible by the replica count {replicas}. Received: "
            f"num_experts={num_experts}"
        )
    return replicas


def assign_shards(variable, full_value):
    """Give each replica's component its slice of `full_value` (`[E, ...]`)."""
    parts = components(variable)
    for component, piece in zip(parts, np.split(np.asarray(full_value), len(parts)), strict=True):
        component.assign(piece)


def full_value(variable):
    """All experts' values, `[E, ...]`: the components concatenated in replica order."""
    parts = components(variable)
    return np.concatenate([np.asarray(part.numpy()) for part in parts], axis=0)


def _shape_inference_only(num_shards):
    # Keras traces layers in a scratch graph, outside the strategy's
    # replicas, only to learn output shapes (e.g. `fit` building its
    # metrics); no collective can run there and no value is used.
    context = tf.distribute.get_replica_context()
    in_replicas = context is not None and context.num_replicas_in_sync == num_shards
    return _compat.in_symbolic_scope() and not in_replicas


def replica_context_for(num_shards, layer_name):
    """The replica context an expert-parallel call needs, or a clear error."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync != num_shards:
        found = "none (cross-replica context)" if context is None else (
            f"{context.num_replicas_in_sync} replica(s)"
        )
        raise ValueError(
            f"Layer '{layer_name}' is expert parallel over {num_shards} replicas and must run "
            "inside its strategy's replicas (`model.fit`/`predict`/`evaluate`, or "
            f"`strategy.run`). Found: {found}"
        )
    return context


@tf.custom_gradient
def _dense_gradient(value):
    # Rows are picked from the gathered tensors with `tf.gather`, whose
    # gradient is `IndexedSlices`; the all-gather's backward all-reduce
    # takes dense tensors only.
    return tf.identity(value), lambda grad: tf.convert_to_tensor(grad)


def expert_parallel_dispatch(
    x, token_index, expert_index, gate, experts, num_tokens, capacity_factor=None,
    valid=None, priority=None, training=False,
):
    """Route this replica's pairs to the replicas holding their experts and back.

    Each replica sends its tokens and (token, expert, gate) pairs to every
    replica (`all_gather`); replica `r` runs its experts
    `r * E_r ... (r + 1) * E_r - 1` (`E_r = E / R`) on the pairs routed to
    them, over the pairs of *all* replicas; the gated answers are summed per
    token over the replicas (`all_reduce`) and each replica keeps its rows.
    The result equals `dropless_dispatch` (or `capacity_dispatch` with the
    capacity of the global batch) on the concatenated batch.

    Args:
        x: `[N, d]`, this replica's tokens.
        token_index, expert_index: int32 `[P]` (global expert ids).
        gate: float `[P]`.
        experts: a `FeedForwardExperts` holding this replica's `E_r` experts.
        num_tokens: `N`.
        capacity_factor: None (dropless) or float > 0: each expert has
            `ceil(capacity_factor * P_all / E)` places, `P_all` the pairs of
            all replicas; overflow pairs are dropped.
        valid: optional bool `[P]` (capacity mode: masked pairs).
        priority: optional int32 `[P]` queue priority (capacity mode).
        training: bool, passed to the experts (their dropout).

    Returns:
        `(y [N, out], dropped_fraction, exchanged)`: `exchanged` is the
        number of elements this replica put into the two collectives in the
        forward pass (the backward pass moves the same amount again).
    """
    from keras_moe import dispatch

    num_shards = experts.num_shards
    if _shape_inference_only(num_shards):
        out = experts.output_dim or x.shape[-1]
        return tf.zeros([num_tokens, out], x.dtype), tf.zeros([], tf.float32), 0
    context = replica_context_for(num_shards, getattr(experts, "path", experts.name))
    local_experts = experts.num_experts // num_shards
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    num_tokens = tf.reshape(tf.cast(num_tokens, tf.int32), [1])
    if valid is None:
        valid = tf.ones_like(expert_index, dtype=tf.bool)
    if priority is None:
        priority = tf.zeros_like(expert_index)
    # Integers and floats go in separate all-gathers: only the floats need
    # a backward pass (the all-gather's gradient all-reduces every input's,
    # and integer tensors cannot take part).
    routing = context.all_gather(
        {
            "sizes": num_tokens,
            "pair_sizes": tf.shape(token_index)[:1],
            "token": token_index,
            "expert": expert_index,
            "valid": tf.cast(valid, tf.int32),
            "priority": tf.cast(priority, tf.int32),
        },
        axis=0,
    )
    # One all-gather per float tensor: the backward pass of a gather of
    # several tensors stacks their gradients (`identity` of the list), which
    # fails for tensors of different ranks (TensorFlow 2.21).
    values = {
        "x": _dense_gradient(context.all_gather(x, axis=0)),
        "gate": _dense_gradient(context.all_gather(tf.cast(gate, tf.float32), axis=0)),
    }
    sizes = routing["sizes"]
    starts = tf.cumsum(sizes, exclusive=True)
    # Each pair's token index becomes its row in the gathered batch.
    pair_owner = tf.repeat(tf.range(num_shards, dtype=tf.int32), routing["pair_sizes"])
    token_all = routing["token"] + tf.gather(starts, pair_owner)
    expert_all = routing["expert"]
    valid_all = routing["valid"] > 0
    total_tokens = tf.reduce_sum(sizes)

    first = replica * local_experts
    mine = (expert_all >= first) & (expert_all < first + local_experts) & valid_all
    if capacity_factor is None:
        kept = mine
        dropped = tf.zeros([], tf.float32)
    else:
        num_pairs = tf.shape(expert_all)[0]
        capacity = dispatch.expert_capacity(capacity_factor, num_pairs, experts.num_experts)
        position = dispatch.capacity_positions(
            expert_all, valid_all, experts.num_experts, routing["priority"]
        )
        keep_all = valid_all & (position < capacity)
        num_valid = tf.reduce_sum(tf.cast(valid_all, tf.float32))
        dropped = tf.math.divide_no_nan(
            num_valid - tf.reduce_sum(tf.cast(keep_all, tf.float32)), num_valid
        )
        kept = mine & keep_all
    chosen = tf.where(kept)[:, 0]
    rows = tf.gather(values["x"], tf.gather(token_all, chosen))
    local_expert = tf.gather(expert_all, chosen) - first
    if capacity_factor is None:
        answers = dispatch.partitioned_apply(
            rows, local_expert, local_experts,
            lambda parts: experts.apply_partitioned(parts, training=training),
        )
    else:
        # The static [E_r, C, d] buffer, as `capacity_dispatch` builds it.
        slot = local_expert * capacity + tf.gather(position, chosen)
        buffer = tf.math.unsorted_segment_sum(rows, slot, local_experts * capacity)
        buffer = tf.reshape(buffer, [local_experts, capacity, x.shape[-1]])
        out = experts(buffer, training=training)
        answers = tf.gather(tf.reshape(out, [local_experts * capacity, out.shape[-1]]), slot)
    weighted = answers * tf.cast(tf.gather(values["gate"], chosen), answers.dtype)[:, None]
    partial = tf.math.unsorted_segment_sum(
        weighted, tf.gather(token_all, chosen), total_tokens
    )
    combined = context.all_reduce(tf.distribute.ReduceOp.SUM, partial)
    start = tf.gather(starts, replica)
    y = combined[start:start + num_tokens[0]]
    # Forward elements: the tokens and gates, 4 integers per pair and 2 per
    # replica, and the partial outputs of the gathered batch.
    exchanged = tf.size(x) + 5 * tf.size(token_index) + 2 + tf.size(partial)
    return y, dropped, exchanged
