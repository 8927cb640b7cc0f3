"""Dense NumPy reference of the sparsely-gated MoE (Shazeer et al. 2017), for tests.

Everything here is computed in float64 NumPy, independently of `keras_moe`:
every expert is evaluated on every token, and the sparse gates are applied
as a dense `[N, E]` matrix that is zero outside each token's top k.

Also holds `run_layer_test`, a small layer check in the spirit of Keras's
own `run_layer_test` (config round trip, weight count, output shape, one
`fit` step).
"""

import math

import numpy as np

CV_EPSILON = 1e-10


# ---------------------------------------------------------------- basics ---


def as_np(t):
    """A tensor or variable as a float64 (or int) NumPy array."""
    a = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def softmax(v, axis=-1):
    v = np.asarray(v, np.float64)
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def relu(v):
    return np.maximum(v, 0.0)


def cv_squared(v):
    """Population variance over squared mean (Eq. 6-7), 0 for a single element."""
    v = np.asarray(v, np.float64).reshape(-1)
    if v.size <= 1:
        return 0.0
    return float(v.var() / (v.mean() ** 2 + CV_EPSILON))


def top_k(logits, k):
    """Indices `[N, k]` of the k largest entries of each row, largest first.

    Ties go to the lower index (as `tf.math.top_k`); the tests use random
    values, so there are none.
    """
    logits = np.asarray(logits, np.float64)
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]


def top_k_gates(logits, k):
    """`(indices [N, k], gates [N, k])`: softmax over the k kept logits (Eq. 3-5)."""
    idx = top_k(logits, k)
    vals = np.take_along_axis(np.asarray(logits, np.float64), idx, axis=-1)
    return idx, softmax(vals, axis=-1)


def dense_gates(indices, gates, num_experts):
    """Scatter `[N, k]` choices into a dense `[N, E]` gate matrix (index -1 ignored)."""
    indices = np.asarray(indices).reshape(-1, np.shape(indices)[-1])
    gates = np.asarray(gates, np.float64).reshape(indices.shape)
    out = np.zeros((indices.shape[0], num_experts))
    for n in range(indices.shape[0]):
        for e, g in zip(indices[n], gates[n], strict=True):
            if e >= 0:
                out[n, e] += g
    return out


def all_experts(x, w_in, b_in, w_out, b_out):
    """Every expert on every token: `[N, E, out]` and the hidden pre-activations `[N, E, h]`."""
    x = np.asarray(x, np.float64)
    pre = np.einsum("nd,edh->neh", x, w_in) + b_in[None]
    y = np.einsum("neh,eho->neo", relu(pre), w_out) + b_out[None]
    return y, pre


def masked(logits, logits_mask):
    """`logits` with `-inf` where `logits_mask` is False (no mask: unchanged)."""
    logits = np.asarray(logits, np.float64)
    return logits if logits_mask is None else np.where(logits_mask, logits, -np.inf)


def normal_cdf(z):
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(z, np.float64) / math.sqrt(2.0))


def smooth_load(clean, noisy, std, k):
    """Eq. 8-9 by a loop: `P(x, i) = Phi((clean_i - kth of the others' noisy) / std_i)`.

    Entries of `noisy` at `-inf` (outside a pool) get probability 0; when
    fewer than k others are finite the threshold is `-inf` (probability 1).
    """
    n, e = np.shape(noisy)
    out = np.zeros((n, e))
    for t in range(n):
        for i in range(e):
            if not np.isfinite(noisy[t, i]):
                continue
            others = np.sort(np.delete(noisy[t], i))[::-1]
            threshold = others[k - 1]
            out[t, i] = 1.0 if not np.isfinite(threshold) else normal_cdf(
                (clean[t, i] - threshold) / std[t, i])
    return out


# ----------------------------------------------------- document pools ---


def document_pools(logits, documents, pool_size, weight=None):
    """Each document's pool by a loop (EMO): `({document id: experts [P]}, gaps)`.

    The pool is the top `pool_size` experts by the mean over the document's
    non-masked rows (`weight > 0`) of the softmax of `logits` (ties: lower
    expert first, as `tf.math.top_k`; a document without rows: all zero).
    `gaps[doc]` is the P-th minus the (P+1)-th mean probability: a near tie
    there may be broken differently in float32, so tests skip such documents.
    """
    probs = softmax(logits)
    documents = np.asarray(documents).reshape(-1)
    weight = np.ones(len(documents)) if weight is None else np.asarray(weight).reshape(-1)
    pools, gaps = {}, {}
    for doc in dict.fromkeys(documents.tolist()):
        rows = (documents == doc) & (weight > 0)
        mean = probs[rows].mean(axis=0) if rows.any() else np.zeros(probs.shape[1])
        order = np.argsort(-mean, kind="stable")
        pools[doc] = order[:pool_size]
        ranked = mean[order]
        gaps[doc] = np.inf if pool_size >= len(mean) else ranked[pool_size - 1] - ranked[pool_size]
    return pools, gaps


def pool_mask(documents, pools, num_experts):
    """bool `[N, E]`: the experts of each row's document pool."""
    documents = np.asarray(documents).reshape(-1)
    mask = np.zeros((len(documents), num_experts), bool)
    for n, doc in enumerate(documents.tolist()):
        mask[n, pools[doc]] = True
    return mask


# --------------------------------------------------------- MoE reference ---


def expert_weights(layer):
    """`(w_in, b_in, w_out, b_out)` of a built MoE layer as float64 arrays."""
    ex = layer.experts
    return tuple(as_np(v) for v in (ex.w_in, ex.b_in, ex.w_out, ex.b_out))


def moe_reference(x, w_gate, w_in, b_in, w_out, b_out, k, keep=None, logits_mask=None):
    """Dense MoE output `y = sum_e G(x)_e E_e(x)` for x of any rank `[..., d]`.

    Args:
        x: `[..., d]`.
        w_gate: `[d, E]`.
        w_in, b_in, w_out, b_out: the stacked expert weights.
        k: experts per token.
        keep: optional bool `[N, k]`: pairs set False contribute nothing
            (capacity drops; the other gates are not renormalised).
        logits_mask: optional bool `[N, E]`: experts set False are never
            chosen (document pools: top-k and softmax over the rest).

    Returns:
        dict with `y [..., out]`, `indices [N, k]`, `gates [N, k]`,
        `dense [N, E]` (the gate matrix actually applied), `logits [N, E]`.
    """
    x = np.asarray(x, np.float64)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ w_gate
    idx, gates = top_k_gates(masked(logits, logits_mask), k)
    applied = gates if keep is None else np.where(keep, gates, 0.0)
    dense = dense_gates(idx, applied, w_gate.shape[1])
    expert_out, _ = all_experts(flat, w_in, b_in, w_out, b_out)
    y = np.einsum("ne,neo->no", dense, expert_out)
    return dict(
        y=y.reshape(lead + (y.shape[-1],)), indices=idx, gates=gates, dense=dense, logits=logits
    )


def moe_reference_gradients(x, w_gate, w_in, b_in, w_out, b_out, k, r, logits_mask=None):
    """Analytic gradients of `L = sum(y * r)` for the dense reference (flat `x [N, d]`).

    The top-k selection is piecewise constant; the softmax over the kept
    logits is differentiated exactly, so `x` and `w_gate` also receive the
    gate path. `logits_mask` (bool `[N, E]`, document pools) is a constant:
    the kept logits are chosen among its True entries and nothing flows
    through that choice. Returns a dict keyed `x, w_gate, w_in, b_in, w_out, b_out`.
    """
    x = np.asarray(x, np.float64)
    r = np.asarray(r, np.float64)
    logits = x @ w_gate
    idx, gates = top_k_gates(masked(logits, logits_mask), k)
    dense = dense_gates(idx, gates, w_gate.shape[1])  # [N, E]
    expert_out, pre = all_experts(x, w_in, b_in, w_out, b_out)
    hidden = relu(pre)  # [N, E, h]

    # Expert path: y_n = sum_e G_ne (relu(x_n W_in_e + b_in_e) W_out_e + b_out_e).
    dy_e = dense[:, :, None] * r[:, None, :]  # dL/d(expert output) [N, E, out]
    g_w_out = np.einsum("neh,neo->eho", hidden, dy_e)
    g_b_out = dy_e.sum(axis=0)
    d_hidden = np.einsum("neo,eho->neh", dy_e, w_out) * (pre > 0)
    g_w_in = np.einsum("nd,neh->edh", x, d_hidden)
    g_b_in = d_hidden.sum(axis=0)
    g_x = np.einsum("neh,edh->nd", d_hidden, w_in)

    # Gate path: dL/dG_ne = <r_n, E_e(x_n)>, through softmax over the kept logits.
    a = np.einsum("no,neo->ne", r, expert_out)
    a_kept = np.take_along_axis(a, idx, axis=-1)
    d_kept = gates * (a_kept - (gates * a_kept).sum(-1, keepdims=True))
    d_logits = np.zeros_like(logits)
    np.put_along_axis(d_logits, idx, d_kept, axis=-1)
    g_x = g_x + d_logits @ w_gate.T
    g_w_gate = x.T @ d_logits
    return dict(x=g_x, w_gate=g_w_gate, w_in=g_w_in, b_in=g_b_in, w_out=g_w_out, b_out=g_b_out)


# ----------------------------------------------------- capacity reference ---


def capacity(capacity_factor, num_pairs, num_experts):
    """`C = ceil(capacity_factor * P / E)`, at least 1."""
    return max(1, math.ceil(capacity_factor * num_pairs / num_experts))


def capacity_keep(indices, num_experts, cap, valid=None):
    """Which `[N, k]` pairs find a place, by a plain loop.

    Queue of each expert: all rank-0 pairs in token order, then all rank-1
    pairs in token order, and so on; a pair whose place is `>= cap` is
    dropped. Invalid pairs (`valid[n] == False`) take no place.
    """
    indices = np.asarray(indices)
    n, k = indices.shape
    keep = np.zeros((n, k), bool)
    used = np.zeros(num_experts, int)
    for rank in range(k):
        for t in range(n):
            if valid is not None and not valid[t]:
                continue
            e = indices[t, rank]
            if used[e] < cap:
                keep[t, rank] = True
            used[e] += 1
    return keep


# ---------------------------------------------- hierarchical reference ---


def hierarchical_reference(x, w_gate_primary, w_gate_secondary, w_in, b_in, w_out, b_out, kp, ks):
    """Two-level MoE (App. B, Eq. 12), noise-free, evaluated densely.

    Primary: softmax over the top-`kp` of `x W_gate_primary` (`[d, G]`).
    For each chosen group g: softmax over the top-`ks` of
    `x W_gate_secondary[g]` (`[d, E_g]`). Expert `(g, j)` has flat id
    `g * E_g + j` and gate `G_primary(x)_g * G_g(x)_j`.

    Returns:
        dict with `y [..., out]`, `dense [N, G * E_g]` combined gates,
        `primary_dense [N, G]`, `primary_indices [N, kp]`.
    """
    x = np.asarray(x, np.float64)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    num_groups, _, per_group = w_gate_secondary.shape
    p_idx, p_gates = top_k_gates(flat @ w_gate_primary, kp)
    dense = np.zeros((flat.shape[0], num_groups * per_group))
    for n in range(flat.shape[0]):
        for g, pg in zip(p_idx[n], p_gates[n], strict=True):
            s_idx, s_gates = top_k_gates(flat[n : n + 1] @ w_gate_secondary[g], ks)
            for j, sg in zip(s_idx[0], s_gates[0], strict=True):
                dense[n, g * per_group + j] += pg * sg
    expert_out, _ = all_experts(flat, w_in, b_in, w_out, b_out)
    y = np.einsum("ne,neo->no", dense, expert_out)
    return dict(
        y=y.reshape(lead + (y.shape[-1],)),
        dense=dense,
        primary_dense=dense_gates(p_idx, p_gates, num_groups),
        primary_indices=p_idx,
    )


# ------------------------------------------------------------ layer test ---


def run_layer_test(
    layer_cls, init_kwargs, input_shape, expected_output_shape, expected_num_trainable_weights
):
    """A small check of a Keras layer, in the spirit of Keras's `run_layer_test`.

    - `from_config(get_config())` gives the same config;
    - once built, the layer has the expected number of trainable weights;
    - `compute_output_shape` and an eager call give the expected shape;
    - one `fit` step of a functional model around it runs, gives a finite
      loss and changes every trainable weight.
    """
    import keras

    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config

    assert tuple(layer.compute_output_shape(input_shape)) == tuple(expected_output_shape)
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    y = layer(x)
    assert tuple(y.shape) == tuple(expected_output_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert len({id(w) for w in layer.trainable_weights}) == expected_num_trainable_weights

    inputs = keras.Input(shape=input_shape[1:])
    model = keras.Model(inputs, layer_cls(**init_kwargs)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [np.array(w.numpy()) for w in model.trainable_weights]
    target = np.random.default_rng(1).normal(size=expected_output_shape).astype("float32")
    history = model.fit(x, target, batch_size=input_shape[0], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [w.numpy() for w in model.trainable_weights]
    unchanged = [
        w.path for w, b, a in zip(model.trainable_weights, before, after, strict=True) if np.array_equal(b, a)
    ]
    assert not unchanged, f"one fit step left these weights unchanged: {unchanged}"
    return model, history
