"""Tests of `keras_moe.dispatch`: grouping, capacity queues, and that dispatch stays sparse."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import dispatch, grouped
from tests.keras_moe import reference as ref


def make_experts(num_experts, d, h, out=None, seed=0):
    experts = keras_moe.FeedForwardExperts(num_experts, h, output_dim=out)
    experts.build((None, d))
    rng = np.random.default_rng(seed)
    for v in (experts.w_in, experts.b_in, experts.w_out, experts.b_out):
        v.assign(rng.normal(size=v.shape) * 0.7)
    return experts


def expert_np(experts, e, row):
    """Expert `e` on one row, in NumPy."""
    w_in, b_in, w_out, b_out = (
        ref.as_np(v) for v in (experts.w_in, experts.b_in, experts.w_out, experts.b_out)
    )
    return ref.relu(row @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]


# ------------------------------------------------------- partitioned_apply ---


def test_partitioned_apply_restores_order():
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    group_index = tf.constant([2, 0, 1, 2, 0, 2], tf.int32)
    seen = {}

    def fn(parts):
        for g, part in enumerate(parts):
            seen[g] = part.numpy().copy()
        return [part + 100.0 * g for g, part in enumerate(parts)]

    out = dispatch.partitioned_apply(tf.constant(rows), group_index, 4, fn)
    expected = np.array(
        [[200, 201], [2, 3], [104, 105], [206, 207], [8, 9], [210, 211]], np.float32
    )
    np.testing.assert_array_equal(out.numpy(), expected)
    # Each group got its rows in their original order; group 3 got none.
    np.testing.assert_array_equal(seen[0], [[2, 3], [8, 9]])
    np.testing.assert_array_equal(seen[1], [[4, 5]])
    np.testing.assert_array_equal(seen[2], [[0, 1], [6, 7], [10, 11]])
    assert seen[3].shape == (0, 2)


def test_partitioned_apply_may_change_width():
    rows = tf.constant([[1.0], [2.0], [3.0]])
    group_index = tf.constant([1, 0, 1], tf.int32)

    def fn(parts):
        return [tf.concat([p, p * 0 + g, p * 10], axis=1) for g, p in enumerate(parts)]

    out = dispatch.partitioned_apply(rows, group_index, 2, fn)
    np.testing.assert_array_equal(out.numpy(), [[1, 1, 10], [2, 0, 20], [3, 1, 30]])


# ------------------------------------------------------------ capacity ---


def test_expert_capacity():
    assert dispatch.expert_capacity(1.0, 8, 3) == 3  # ceil(2.67)
    assert dispatch.expert_capacity(0.8, 7, 3) == 2  # ceil(1.87)
    assert dispatch.expert_capacity(0.01, 8, 3) == 1  # at least one place
    assert dispatch.expert_capacity(2.0, 6, 3) == 4
    assert int(dispatch.expert_capacity(1.0, tf.constant(8), 3)) == 3
    assert int(dispatch.expert_capacity(0.01, tf.constant(8), 3)) == 1


def test_capacity_positions_priority_and_invalid_pairs():
    # pair:        0  1  2  3  4  5  6
    # expert:      0  1  0  0  1  2  0
    # valid:       y  y  n  y  y  y  y
    # priority:    1  0  0  1  0  0  0
    # Expert 0 queue: priority 0 first -> p6 (p2 is invalid and takes no place),
    #   then priority 1 in pair order -> p0, p3.  Expert 1: p1, p4.  Expert 2: p5.
    expert_index = tf.constant([0, 1, 0, 0, 1, 2, 0], tf.int32)
    valid = tf.constant([True, True, False, True, True, True, True])
    priority = tf.constant([1, 0, 0, 1, 0, 0, 0], tf.int32)
    pos = dispatch.capacity_positions(expert_index, valid, 3, priority).numpy()
    assert pos.dtype == np.int32
    is_valid = valid.numpy()
    np.testing.assert_array_equal(pos[is_valid], [1, 0, 2, 1, 0, 0])

    # Same priorities for all: plain pair order. p2 still takes no place.
    pos = dispatch.capacity_positions(expert_index, valid, 3, tf.zeros([7], tf.int32)).numpy()
    np.testing.assert_array_equal(pos[is_valid], [0, 0, 1, 1, 0, 2])

    # All valid: p2 now queues in expert 0 (priority 0, before p6).
    all_valid = tf.ones([7], tf.bool)
    pos = dispatch.capacity_positions(expert_index, all_valid, 3, priority).numpy()
    np.testing.assert_array_equal(pos, [2, 0, 0, 3, 1, 0, 1])


def test_capacity_dispatch_hand_example():
    # The pairs of the test above on 5 tokens; P = 7, E = 3, factor 0.8:
    # C = ceil(0.8 * 7 / 3) = 2. Expert 0 keeps p6, p0 and drops p3; p2 is
    # invalid (neither computed nor counted). dropped_fraction = 1 / 6.
    d, h = 3, 4
    experts = make_experts(3, d, h, seed=1)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, d)).astype(np.float32)
    token_index = np.array([0, 0, 1, 2, 3, 3, 4], np.int32)
    expert_index = np.array([0, 1, 0, 0, 1, 2, 0], np.int32)
    gate = rng.uniform(0.1, 1.0, size=7).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    priority = np.array([1, 0, 0, 1, 0, 0, 0], np.int32)
    kept = np.array([1, 1, 0, 0, 1, 1, 1], bool)

    y, dropped = dispatch.capacity_dispatch(
        tf.constant(x), tf.constant(token_index), tf.constant(expert_index), tf.constant(gate),
        experts, 5, 0.8, valid=tf.constant(valid), priority=tf.constant(priority),
    )
    expected = np.zeros((5, d))
    for p in np.flatnonzero(kept):
        expected[token_index[p]] += gate[p] * expert_np(experts, expert_index[p], x[token_index[p]])
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(dropped), 1 / 6, rtol=1e-6)
    # Token 2 had only the dropped pair: its output is exactly zero.
    assert (y.numpy()[2] == 0).all()


# ------------------------------------------------------------ dropless ---


@pytest.mark.parametrize(
    "token_index, expert_index",
    [
        # Spread over experts; token 4 has no pair, expert 5 gets none, and
        # token 0 sends two pairs to expert 1.
        ([0, 0, 1, 2, 2, 3, 5, 5, 0, 3], [1, 2, 0, 1, 0, 4, 3, 1, 1, 2]),
        # Collapsed: every pair goes to expert 3.
        ([0, 1, 2, 3, 5], [3, 3, 3, 3, 3]),
    ],
    ids=["spread", "collapsed"],
)
@pytest.mark.parametrize("strategy", ["unrolled", "loop"])
def test_dropless_dispatch_equals_loop_over_pairs(token_index, expert_index, strategy):
    d, h, out, e = 3, 5, 2, 6
    experts = make_experts(e, d, h, out=out, seed=3)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, d)).astype(np.float32)
    token_index = np.array(token_index, np.int32)
    expert_index = np.array(expert_index, np.int32)
    gate = rng.uniform(0.1, 1.0, size=len(token_index)).astype(np.float32)
    y = dispatch.dropless_dispatch(
        tf.constant(x), tf.constant(token_index), tf.constant(expert_index), tf.constant(gate),
        experts, 6, strategy=strategy,
    )
    expected = np.zeros((6, out))
    for t, ex, g in zip(token_index, expert_index, gate, strict=True):
        expected[t] += g * expert_np(experts, ex, x[t])
    assert tuple(y.shape) == (6, out)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (y.numpy()[4] == 0).all()


def test_capacity_dispatch_with_ample_capacity_equals_dropless():
    d, h, e = 3, 4, 3
    experts = make_experts(e, d, h, seed=5)
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(5, d)).astype(np.float32))
    token_index = tf.constant([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], tf.int32)
    expert_index = tf.constant([0, 1, 0, 2, 0, 1, 0, 2, 0, 1], tf.int32)
    gate = tf.constant(rng.uniform(size=10).astype(np.float32))
    y0 = dispatch.dropless_dispatch(x, token_index, expert_index, gate, experts, 5)
    y1, dropped = dispatch.capacity_dispatch(x, token_index, expert_index, gate, experts, 5, 1.5)
    # C = ceil(1.5 * 10 / 3) = 5 = the 5 pairs of expert 0: nothing dropped.
    np.testing.assert_allclose(y1.numpy(), y0.numpy(), rtol=1e-5, atol=1e-6)
    assert float(dropped) == 0.0
    _, dropped = dispatch.capacity_dispatch(x, token_index, expert_index, gate, experts, 5, 1.0)
    # C = ceil(10 / 3) = 4: expert 0's fifth pair is dropped.
    np.testing.assert_allclose(float(dropped), 0.1, rtol=1e-6)


# ------------------------------------------------------------ sparsity ---
#
# The contract (MoE docstring): no tensor of size tokens * num_experts * width
# is ever built. T, E, d, h are distinct primes, so a tensor of T*E*w elements
# with last dimension w is unambiguous. Shapes are checked twice:
# - statically, on the traced graph and every graph nested in it (tf.cond
#   branches and their gradients), which also shows which matmuls run;
# - at run time, with tfdbg's SHAPE mode, which records the shape of every
#   tensor every op produced, inside nested graphs too (the rows each expert
#   receives are only known when the routing has run).

T, D, H, K = 11, 3, 7, 2
E = 13  # > 4k: a sparse dispatch has no reason to come near T*E rows
MATMUL_TYPES = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum"}


def dense_sized(shape, num_experts):
    """Whether a tensor of `shape` is as large as a dense `[T, E, width]` one."""
    n = int(np.prod(shape)) if len(shape) else 1
    width = shape[-1] if len(shape) else 1
    if width in (D, H):
        return n >= T * num_experts * width
    return n >= T * num_experts * min(D, H)


def called_functions(op, graph):
    """`(name, graph)` of the function graphs `op` calls (while bodies, cond branches, gradients)."""
    for attr in op.node_def.attr.values():
        if attr.HasField("func"):
            names = [attr.func.name]
        elif attr.HasField("list"):
            names = [f.name for f in attr.list.func]
        else:
            names = []
        for name in names:
            fn = graph._get_function(name)
            if fn is not None and getattr(fn, "graph", None) is not None:
                yield name, fn.graph


def nested_graphs(graph, seen=None):
    """`graph` and every function graph it calls (cond branches, gradients), recursively."""
    seen = set() if seen is None else seen
    yield graph
    for op in graph.get_operations():
        for name, called in called_functions(op, graph):
            if name not in seen:
                seen.add(name)
                yield from nested_graphs(called, seen)


def all_ops(graph):
    return [op for g in nested_graphs(graph) for op in g.get_operations()]


def static_violations(graph, num_experts):
    return [
        (op.type, op.name, tuple(t.shape))
        for op in all_ops(graph)
        for t in op.outputs
        if t.shape.is_fully_defined() and dense_sized(tuple(t.shape), num_experts)
    ]


def trace_and_run(fn, x, dump_root, spec=None):
    """Trace and run `fn(x)` under tfdbg.

    Returns `(graph, shapes)`: the traced graph, and `(op type, op name,
    shape)` of every float32 tensor every op produced while running.
    """
    from tensorflow.python.debug.lib import debug_events_reader

    spec = spec if spec is not None else tf.TensorSpec(x.shape, x.dtype)
    tf.debugging.experimental.enable_dump_debug_info(
        str(dump_root), tensor_debug_mode="SHAPE", circular_buffer_size=-1,
        tensor_dtypes=[tf.float32],
    )
    try:
        # Traced after enabling, so the graphs are instrumented.
        concrete = tf.function(fn).get_concrete_function(spec)
        concrete(x)
    finally:
        tf.debugging.experimental.disable_dump_debug_info()
    shapes = []
    with debug_events_reader.DebugDataReader(str(dump_root)) as reader:
        reader.update()
        for trace in reader.graph_execution_traces():
            value = trace.debug_tensor_value  # [id, dtype, rank, size, dim0..dim5]
            if value is None:
                continue
            rank = int(value[2])
            shapes.append((trace.op_type, trace.op_name, tuple(int(v) for v in value[4 : 4 + rank])))
    assert shapes, "tfdbg recorded nothing"
    return concrete.graph, shapes


def runtime_violations(shapes, num_experts):
    return [s for s in shapes if dense_sized(s[2], num_experts)]


def classify_matmul(op, num_experts):
    """'gate', 'expert' (rank 2, one expert's weights), 'batched' (data grouped
    by expert, `[E, rows, .] x [E, ., .]`) or 'other'."""
    shapes = [tuple(i.shape.as_list()) if i.shape.rank is not None else None for i in op.inputs]
    if op.type == "MatMul" and (T, D) in shapes and (D, num_experts) in shapes:
        return "gate"
    if op.type == "MatMul" and ((D, H) in shapes or (H, D) in shapes):
        return "expert"
    if (
        op.type != "MatMul"
        and len(shapes) == 2
        and all(s is not None and len(s) == 3 and s[0] == num_experts for s in shapes)
    ):
        return "batched"
    return "other"


def check_forward_matmuls(graph, num_experts, loop=False):
    kinds = collections.Counter(
        classify_matmul(op, num_experts) for op in all_ops(graph) if op.type in MATMUL_TYPES
    )
    assert kinds["other"] == 0, kinds
    assert kinds["gate"] == 1, kinds
    # Per strategy: one rank-2 matmul per expert and layer on its own rows
    # (unrolled), one per layer inside the `tf.while_loop` over the experts
    # (loop), or one batched matmul per layer over rows already grouped by
    # expert.
    assert kinds["expert"] in ((0, 2) if loop else (0, 2 * num_experts)), kinds
    assert kinds["batched"] in (0, 2), kinds
    assert kinds["expert"] + kinds["batched"] > 0, kinds
    return kinds


def make_sparse_layer(num_experts, seed, collapse=False):
    layer = keras_moe.MoE(num_experts, H, k=K, seed=1)
    layer.build((None, D))
    rng = np.random.default_rng(seed)
    w_gate = rng.normal(size=(D, num_experts))
    if collapse:
        # Every token's first choice is expert 0 (inputs are positive).
        w_gate[:, 0] = 50.0
    layer.gating.w_gate.assign(w_gate)
    layer.gating.w_noise.assign(rng.normal(size=(D, num_experts)) * 0.1)
    return layer


def tokens(positive=False):
    x = np.random.default_rng(8).normal(size=(T, D)).astype(np.float32)
    return tf.constant(np.abs(x) + 0.1 if positive else x)


def forward_and_backward(layer):
    def body(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y) + tf.add_n(layer.losses)
        grads = tape.gradient(loss, [x, *layer.trainable_variables])
        assert all(g is not None for g in grads)
        return grads

    return body


@pytest.fixture(params=["unrolled", "loop"])
def path(request, monkeypatch):
    """Runs a test on each dropless strategy, whatever the number of experts."""
    monkeypatch.setattr(dispatch, "LOOP_MIN_EXPERTS", 1 if request.param == "loop" else 10**9)
    return request.param


def test_dropless_forward_graph_is_sparse(tmp_path, path):
    layer = make_sparse_layer(E, seed=7)
    x = tokens()
    graph, shapes = trace_and_run(lambda x: layer(x, training=False), x, tmp_path)
    assert static_violations(graph, E) == []
    kinds = check_forward_matmuls(graph, E, loop=path == "loop")
    assert kinds["expert"] == (2 if path == "loop" else 2 * E)
    assert runtime_violations(shapes, E) == []
    # The routing really spread the tokens (more than k experts are used).
    _, routing = layer(x, training=False, return_routing=True)
    assert len(np.unique(routing.expert_indices.numpy())) > 2 * K


def test_dropless_forward_and_backward_graph_is_sparse(tmp_path, path):
    layer = make_sparse_layer(E, seed=7)
    graph, shapes = trace_and_run(forward_and_backward(layer), tokens(), tmp_path)
    ops = all_ops(graph)
    assert "ReluGrad" in {op.type for op in ops}  # the backward pass is in there
    assert static_violations(graph, E) == []
    assert runtime_violations(shapes, E) == []
    assert any(op_type == "ReluGrad" for op_type, _, _ in shapes)
    # Nothing larger than rows of the P = T*k pairs (up to 4x padded) or the
    # stacked [E, d, h] weights and their gradients.
    largest = max(int(np.prod(s)) for _, _, s in shapes)
    assert largest <= max(E * D * H, 4 * T * K * max(D, H))


def test_dropless_stays_sparse_when_one_expert_takes_every_token(tmp_path, path):
    # A collapsed router with few experts (E = 5 <= 4k): one expert receives
    # all T tokens. Dispatch must still not build [E, T, width] buffers (T*E*d
    # = 165, T*E*h = 385 elements), e.g. by padding every expert to T rows.
    num_experts = 5
    layer = make_sparse_layer(num_experts, seed=9, collapse=True)
    x = tokens(positive=True)
    _, routing = layer(x, training=False, return_routing=True)
    assert (routing.expert_indices.numpy()[:, 0] == 0).all()
    _, shapes = trace_and_run(forward_and_backward(layer), x, tmp_path)
    assert runtime_violations(shapes, num_experts) == []


def dense_moe(layer):
    """A dense MoE (every expert on every token, then masked by the top-k gates):
    what the sparsity checks must catch."""

    def body(x):
        logits = tf.matmul(x, layer.gating.w_gate)
        values, idx = tf.math.top_k(logits, K)
        gates = tf.reduce_sum(tf.one_hot(idx, E) * tf.nn.softmax(values)[..., None], axis=1)
        ex = layer.experts
        hidden = tf.nn.relu(tf.einsum("td,edh->teh", x, ex.w_in) + ex.b_in)
        out = tf.einsum("teh,eho->teo", hidden, ex.w_out) + ex.b_out
        return tf.einsum("te,teo->to", gates, out)

    return body


def test_sparsity_checks_flag_a_dense_implementation(tmp_path):
    layer = make_sparse_layer(E, seed=7)
    x = tokens()
    body = dense_moe(layer)
    # The dense version is a correct MoE ...
    np.testing.assert_allclose(
        body(x).numpy(), layer(x, training=False).numpy(), rtol=1e-5, atol=1e-5
    )
    # ... but every check rejects it.
    graph, shapes = trace_and_run(body, x, tmp_path / "fixed")
    assert (T, E, H) in {shape for _, _, shape in static_violations(graph, E)}
    with pytest.raises(AssertionError):
        check_forward_matmuls(graph, E)
    flagged = {shape for _, _, shape in runtime_violations(shapes, E)}
    assert (T, E, H) in flagged and (T, E, D) in flagged

    # With a batch of unknown size the static shapes say nothing, the run does.
    spec = tf.TensorSpec([None, D], tf.float32)
    graph, shapes = trace_and_run(body, x, tmp_path / "dynamic", spec=spec)
    assert static_violations(graph, E) == []
    assert (T, E, H) in {shape for _, _, shape in runtime_violations(shapes, E)}


# ------------------------------------------------------------ loop path ---
#
# `strategy="loop"`: rows sorted by expert, one `tf.while_loop` per layer
# (`keras_moe.grouped.segment_matmul`) with a hand-written backward pass.


def live_op_count(graph):
    """Ops that run: those the outputs of `graph` depend on, in it and in the graphs it calls.

    Dangling ops are left out: `tf.custom_gradient` makes the tape build
    zeros of each input's shape that nothing consumes (TensorFlow prunes
    them before running), and `tf.zeros` is one `Const` below 1000
    elements but `Const`, `Const`, `Fill` above, so their count would
    depend on the weights' size.
    """
    stack = [t.op for t in graph.outputs] + list(graph.control_outputs)
    seen = set()
    count = 0
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        count += 1
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
        count += sum(live_op_count(g) for _, g in called_functions(op, graph))
    return count


def op_count(fn, *specs):
    """Live ops of `fn`'s traced graph, nested function graphs included."""
    return live_op_count(tf.function(fn).get_concrete_function(*specs).graph)


def test_dropless_strategy_is_chosen_by_the_number_of_experts():
    below, at = dispatch.LOOP_MIN_EXPERTS - 1, dispatch.LOOP_MIN_EXPERTS
    assert dispatch.dropless_strategy(below) == "unrolled"
    assert dispatch.dropless_strategy(at) == "loop"
    assert dispatch.dropless_strategy(at, "unrolled") == "unrolled"
    assert dispatch.dropless_strategy(1, "loop") == "loop"
    with pytest.raises(ValueError, match="strategy='while'"):
        dispatch.dropless_strategy(8, "while")


@pytest.mark.parametrize(
    "counts", [[2, 0, 3, 1, 0], [0, 0, 6, 0, 0], [0, 0, 0, 0, 0], [1, 3, 2]],
    ids=["spread", "one", "none", "all"],
)
def test_segment_matmul_equals_numpy_with_gradients(counts):
    rng = np.random.default_rng(20)
    num_rows, d, m = sum(counts), 3, 4
    rows = rng.normal(size=(num_rows, d))
    weights = rng.normal(size=(len(counts), d, m))
    r = rng.normal(size=(num_rows, m))
    group = np.repeat(np.arange(len(counts)), counts)
    expected = np.einsum("pd,pdm->pm", rows, weights[group])
    # L = sum(out * r): dL/d rows_p = W_g(p) r_p, dL/d W_g = sum_{p in g} rows_p r_p^T.
    grad_rows = np.einsum("pdm,pm->pd", weights[group], r)
    grad_weights = np.zeros_like(weights)
    np.add.at(grad_weights, group, np.einsum("pd,pm->pdm", rows, r))

    def run(rows, weights):
        with tf.GradientTape() as tape:
            tape.watch([rows, weights])
            out = grouped.segment_matmul(rows, tf.constant(counts), weights)
            loss = tf.reduce_sum(out * r)
        return (out, *tape.gradient(loss, [rows, weights]))

    args = tf.constant(rows), tf.constant(weights)
    for results in (run(*args), tf.function(run)(*args)):
        out, g_rows, g_weights = (t.numpy() for t in results)
        assert out.shape == (num_rows, m)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g_rows, grad_rows, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g_weights, grad_weights, rtol=1e-12, atol=1e-12)
        # Groups without rows get an exact zero gradient.
        assert (g_weights[np.asarray(counts) == 0] == 0).all()


def test_segment_matmul_gradients_of_equal_shapes_do_not_share_a_buffer():
    # The weight gradient is filled in place in a fresh buffer (`Empty`, not
    # zeroed when every group has rows): two products of the same shapes in
    # one graph, called twice, must each get their own exact gradient.
    rng = np.random.default_rng(27)
    counts = tf.constant([2, 1, 3])
    rows = tf.constant(rng.normal(size=(6, 3)))
    w1, w2 = (tf.constant(rng.normal(size=(3, 3, 3))) for _ in range(2))
    group = np.repeat(np.arange(3), [2, 1, 3])

    @tf.function
    def grads(rows, w1, w2):
        with tf.GradientTape() as tape:
            tape.watch([w1, w2])
            hidden = grouped.segment_matmul(rows, counts, w1)
            loss = tf.reduce_sum(grouped.segment_matmul(hidden, counts, w2))
        return tape.gradient(loss, [w1, w2])

    rows_np, w1_np, w2_np = rows.numpy(), w1.numpy(), w2.numpy()
    hidden = np.einsum("pd,pdm->pm", rows_np, w1_np[group])
    expected_w2 = np.zeros_like(w2_np)
    np.add.at(expected_w2, group, np.einsum("pd,pm->pdm", hidden, np.ones((6, 3))))
    upstream = np.einsum("pdm,pm->pd", w2_np[group], np.ones((6, 3)))
    expected_w1 = np.zeros_like(w1_np)
    np.add.at(expected_w1, group, np.einsum("pd,pm->pdm", rows_np, upstream))
    for _ in range(2):
        g1, g2 = grads(rows, w1, w2)
        np.testing.assert_allclose(g1.numpy(), expected_w1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g2.numpy(), expected_w2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["unrolled", "loop"])
def test_grouped_matmul_keeps_row_order_with_gradients(strategy):
    rng = np.random.default_rng(28)
    group_index = np.array([2, 0, 2, 3, 0, 2, 0])  # group 1 gets no row
    rows = rng.normal(size=(7, 3))
    weights = rng.normal(size=(4, 3, 2))
    r = rng.normal(size=(7, 2))
    expected = np.einsum("pd,pdm->pm", rows, weights[group_index])
    grad_weights = np.zeros_like(weights)
    np.add.at(grad_weights, group_index, np.einsum("pd,pm->pdm", rows, r))

    @tf.function
    def run(rows, weights):
        with tf.GradientTape() as tape:
            tape.watch([rows, weights])
            out = dispatch.grouped_matmul(
                rows, tf.constant(group_index, tf.int32), weights, strategy=strategy
            )
            loss = tf.reduce_sum(out * r)
        return (out, *(tf.convert_to_tensor(g) for g in tape.gradient(loss, [rows, weights])))

    out, g_rows, g_weights = run(tf.constant(rows), tf.constant(weights))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        g_rows.numpy(), np.einsum("pdm,pm->pd", weights[group_index], r), rtol=1e-12
    )
    np.testing.assert_allclose(g_weights.numpy(), grad_weights, rtol=1e-12, atol=1e-15)
    assert (g_weights.numpy()[1] == 0).all()


def pair_reference(experts, x, token_index, expert_index, gate, r):
    """`y` and the gradients of `sum(y * r)` by a loop over the pairs, in NumPy."""
    w_in, b_in, w_out, b_out = (
        ref.as_np(v) for v in (experts.w_in, experts.b_in, experts.w_out, experts.b_out)
    )
    y = np.zeros((x.shape[0], w_out.shape[-1]))
    grads = {name: np.zeros_like(v) for name, v in
             dict(x=x, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out).items()}
    grads["gate"] = np.zeros(len(gate))
    for p, (t, e, g) in enumerate(zip(token_index, expert_index, gate, strict=True)):
        pre = x[t] @ w_in[e] + b_in[e]
        out = ref.relu(pre) @ w_out[e] + b_out[e]
        y[t] += g * out
        grads["gate"][p] = out @ r[t]
        grads["w_out"][e] += g * np.outer(ref.relu(pre), r[t])
        grads["b_out"][e] += g * r[t]
        d_pre = g * (w_out[e] @ r[t]) * (pre > 0)
        grads["w_in"][e] += np.outer(x[t], d_pre)
        grads["b_in"][e] += d_pre
        grads["x"][t] += w_in[e] @ d_pre
    return y, grads


@pytest.mark.parametrize(
    "token_index, expert_index",
    [
        ([0, 0, 1, 2, 2, 3, 5, 5, 0, 3], [1, 2, 0, 1, 0, 4, 3, 1, 1, 2]),
        ([0, 1, 2, 3, 5], [3, 3, 3, 3, 3]),
        ([], []),
    ],
    ids=["spread", "collapsed", "no-pairs"],
)
def test_loop_dispatch_gradients_equal_reference_float64(token_index, expert_index):
    d, h, out, e, n = 3, 5, 2, 6, 6
    experts = keras_moe.FeedForwardExperts(e, h, output_dim=out, dtype="float64")
    experts.build((None, d))
    rng = np.random.default_rng(21)
    for v in experts.weights:
        v.assign(rng.normal(size=v.shape))
    x = rng.normal(size=(n, d))
    gate = rng.uniform(0.1, 1.0, size=len(token_index))
    r = rng.normal(size=(n, out))
    y_ref, grads_ref = pair_reference(experts, x, token_index, expert_index, gate, r)

    @tf.function
    def run(x, gate):
        with tf.GradientTape() as tape:
            tape.watch([x, gate])
            y = dispatch.dropless_dispatch(
                x, tf.constant(token_index, tf.int32), tf.constant(expert_index, tf.int32),
                gate, experts, n, strategy="loop",
            )
            loss = tf.reduce_sum(y * r)
        variables = dict(w_in=experts.w_in, b_in=experts.b_in, w_out=experts.w_out,
                         b_out=experts.b_out)
        grads = tape.gradient(loss, dict(x=x, gate=gate, **variables))
        return y, {k: tf.convert_to_tensor(g) for k, g in grads.items()}

    y, grads = run(tf.constant(x), tf.constant(gate, tf.float64))
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-10, atol=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(g.numpy(), grads_ref[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    # Expert 5 receives no pair: its weights get exact zeros.
    assert (grads["w_in"].numpy()[5] == 0).all() and (grads["b_out"].numpy()[5] == 0).all()


@pytest.fixture
def loop_path(monkeypatch):
    """Every dropless dispatch takes the `tf.while_loop` path, whatever E."""
    monkeypatch.setattr(dispatch, "LOOP_MIN_EXPERTS", 1)


@pytest.mark.parametrize("collapse", [False, True], ids=["spread", "collapsed"])
def test_moe_on_loop_path_equals_dense_reference(loop_path, collapse):
    from tests.keras_moe.moe_test import make_moe

    rng = np.random.default_rng(22)
    num_experts, k, d = 7, 2, 4
    layer = make_moe(d=d, num_experts=num_experts, hidden=5, k=k, rng=rng)
    x = rng.normal(size=(3, 5, d)).astype(np.float32)
    if collapse:
        # Every token's first choice is expert 2 (inputs are positive).
        x = np.abs(x) + 0.1
        w_gate = layer.gating.w_gate.numpy()
        w_gate[:, 2] = 50.0
        layer.gating.w_gate.assign(w_gate)
    x = tf.constant(x)
    r = rng.normal(size=(3, 5, d)).astype(np.float32)
    ex = layer.experts
    variables = dict(w_in=ex.w_in, b_in=ex.b_in, w_out=ex.w_out, b_out=ex.b_out,
                     w_gate=layer.gating.w_gate)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=False)
        loss = tf.reduce_sum(y * r)
    grads = tape.gradient(loss, dict(x=x, **variables))
    w_gate = ref.as_np(layer.gating.w_gate)
    flat = x.numpy().reshape(-1, d)
    expected = ref.moe_reference(flat, w_gate, *ref.expert_weights(layer), k)
    if collapse:
        assert (expected["indices"][:, 0] == 2).all()
    else:
        # Some experts receive nothing, most receive something.
        used = len(np.unique(expected["indices"]))
        assert 2 * k < used < num_experts or used == num_experts
    np.testing.assert_allclose(y.numpy().reshape(-1, d), expected["y"], rtol=1e-5, atol=1e-5)
    expected_grads = ref.moe_reference_gradients(
        flat, w_gate, *ref.expert_weights(layer), k, r.reshape(-1, d)
    )
    expected_grads["x"] = expected_grads["x"].reshape(3, 5, d)
    for name, g in grads.items():
        np.testing.assert_allclose(
            tf.convert_to_tensor(g).numpy(), expected_grads[name], rtol=1e-5, atol=1e-5,
            err_msg=name,
        )


def test_moe_on_loop_path_with_mask(loop_path):
    from tests.keras_moe.moe_test import check_masked_call, make_moe

    rng = np.random.default_rng(23)
    layer = make_moe(num_experts=5, k=2, rng=rng)
    x = rng.normal(size=(2, 4, layer.experts.w_in.shape[1])).astype(np.float32)
    mask = np.array([[True, False, True, True], [False, False, True, False]])
    clean = x.copy()
    x[~mask] = np.nan  # masked positions are never computed
    y, routing = layer(x, training=False, mask=tf.constant(mask), return_routing=True)
    check_masked_call(layer, clean, mask, y, routing)


def both_strategies(experts, x, token_index, expert_index, gate, training=False):
    """`(y, grads)` of each strategy, for the same experts and pairs."""
    results = []
    for strategy in ("unrolled", "loop"):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = dispatch.dropless_dispatch(
                x, token_index, expert_index, gate, experts, x.shape[0],
                training=training, strategy=strategy,
            )
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        grads = tape.gradient(loss, [x, *experts.trainable_variables])
        results.append((y, [tf.convert_to_tensor(g) for g in grads]))
    return results


@pytest.mark.parametrize("use_bias", [True, False])
def test_loop_path_deep_experts_equal_unrolled(use_bias):
    experts = keras_moe.FeedForwardExperts(6, 5, output_dim=2, num_hidden_layers=3,
                                           use_bias=use_bias)
    experts.build((None, 3))
    rng = np.random.default_rng(24)
    for v in experts.weights:
        v.assign(rng.normal(size=v.shape) * 0.7)
    x = tf.constant(rng.normal(size=(6, 3)).astype(np.float32))
    token_index = tf.constant([0, 0, 1, 2, 2, 3, 5, 5, 0, 3], tf.int32)
    expert_index = tf.constant([1, 2, 0, 1, 0, 4, 3, 1, 1, 2], tf.int32)
    gate = tf.constant(rng.uniform(0.1, 1.0, size=10).astype(np.float32))
    (y0, g0), (y1, g1) = both_strategies(experts, x, token_index, expert_index, gate)
    assert len(g1) == (7 if use_bias else 4)  # x and the weights
    np.testing.assert_allclose(y1.numpy(), y0.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(y1.numpy()).max() > 0.1
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)


def test_loop_path_mixed_precision_equals_unrolled():
    experts = keras_moe.FeedForwardExperts(
        5, 8, output_dim=3, dtype=keras.DTypePolicy("mixed_bfloat16")
    )
    experts.build((None, 4))
    rng = np.random.default_rng(25)
    for v in experts.weights:
        v.assign(rng.normal(size=v.shape) * 0.5)
    x = tf.constant(rng.normal(size=(7, 4)).astype(np.float32))
    token_index = tf.constant([0, 1, 2, 3, 4, 5, 6, 0, 2], tf.int32)
    expert_index = tf.constant([4, 4, 0, 1, 4, 0, 1, 1, 0], tf.int32)
    gate = tf.constant(rng.uniform(0.1, 1.0, size=9).astype(np.float32))
    (y0, g0), (y1, g1) = both_strategies(experts, x, token_index, expert_index, gate)
    assert y1.dtype == tf.bfloat16 and y0.dtype == tf.bfloat16
    assert all(g.dtype == tf.float32 for g in g1)
    scale = np.abs(tf.cast(y0, tf.float32).numpy()).max()
    np.testing.assert_allclose(
        tf.cast(y1, tf.float32).numpy(), tf.cast(y0, tf.float32).numpy(), atol=0.02 * scale
    )
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=0.03 * np.abs(a.numpy()).max())


@pytest.mark.parametrize("layers", [1, 2])
def test_loop_path_expert_dropout_drops_or_scales_each_hidden_unit(layers):
    from tests.keras_moe.expert_dropout_test import (
        check_dropped_or_scaled,
        identity_experts,
    )

    rate = 0.3
    experts = identity_experts(rate, layers)
    num_experts, width = experts.num_experts, experts.hidden_dim
    n = 3000
    x = np.random.default_rng(26).uniform(0.5, 1.5, size=(n, width)).astype(np.float32)
    tokens = tf.range(n, dtype=tf.int32)
    args = (x, tokens, tokens % num_experts, tf.ones([n]), experts, n)
    y = dispatch.dropless_dispatch(*args, training=False, strategy="loop")
    np.testing.assert_allclose(y, x, rtol=1e-6)
    y = dispatch.dropless_dispatch(*args, training=True, strategy="loop")
    check_dropped_or_scaled(y, x, (1 - rate) ** layers)


def forward_backward_ops(num_experts, strategy):
    """Ops in the traced forward+backward graph of a dropless MoE layer (all nested graphs)."""
    layer = keras_moe.MoE(num_experts, H, k=K, seed=1)
    layer.build((None, D))
    fn = forward_and_backward(layer)

    def body(x):
        # The strategy is chosen while tracing, inside this call.
        saved = dispatch.LOOP_MIN_EXPERTS
        dispatch.LOOP_MIN_EXPERTS = 1 if strategy == "loop" else 10**9
        try:
            return fn(x)
        finally:
            dispatch.LOOP_MIN_EXPERTS = saved

    return op_count(body, tf.TensorSpec([None, D], tf.float32))


def test_loop_path_graph_size_does_not_depend_on_the_number_of_experts():
    loop = [forward_backward_ops(e, "loop") for e in (8, 64)]
    assert loop[0] == loop[1], loop
    # The unrolled loop, by contrast, adds ops per expert (the count is able
    # to see the difference).
    unrolled = [forward_backward_ops(e, "unrolled") for e in (8, 64)]
    assert unrolled[1] > unrolled[0] + 56 * 10, unrolled
    assert loop[1] < unrolled[1]

    # The same for the dispatch alone, with a tape over its inputs.
    def dispatch_ops(num_experts):
        experts = make_experts(num_experts, D, H)

        def body(x, expert_index, gate):
            with tf.GradientTape() as tape:
                tape.watch([x, gate])
                y = dispatch.dropless_dispatch(
                    x, tf.range(tf.shape(x)[0]), expert_index, gate, experts, tf.shape(x)[0],
                    strategy="loop",
                )
            return tape.gradient(tf.reduce_sum(y * y), [x, gate, *experts.trainable_variables])

        return op_count(
            body, tf.TensorSpec([None, D], tf.float32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.float32),
        )

    assert dispatch_ops(8) == dispatch_ops(64)


def test_grouped_docstring_example_runs():
    import doctest

    results = doctest.testmod(grouped, extraglobs=dict(vars(grouped)))
    assert results.attempted >= 1 and results.failed == 0
