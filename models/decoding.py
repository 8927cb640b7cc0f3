"""Greedy and beam-search decoding with GNMT's scoring (Wu et al. 2016, Section 7).

Both decoders run inside `tf.function` as one `tf.while_loop`, batched over
sentences (and beams), one target token per iteration: the decoder's
states are carried, so a sentence of `t` tokens costs `t` decoder steps,
not `t^2`. They decode either a `TranslationModel` (anything with
`encode`, `initial_decoder_state` and `decode_step`) or an abstract step
function

    step_fn(tokens [n], state) -> (log_probs [n, V], attention [n, s] or None, new_state)

where `state` is a nest of tensors with leading dimension `n` (the search
reorders its rows when beams are reordered) and `log_probs` are
normalised log-probabilities (<= 0) of the next token.

Beam search ranks finished hypotheses by GNMT's score

    s(Y, X) = log P(Y | X) / lp(Y) + cp(X; Y)
    lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha
    cp(X; Y) = beta * sum_i log(min(sum_j p_ij, 1.0))

with `|Y|` the number of generated tokens including `<eos>`, and `p_ij` the
attention probability of source position `i` at the step that produced
target token `j` (summed over those steps, for the real source positions
`i` only). Alive hypotheses all have the same length, so they are ranked
by `log P(Y | X)` alone.

Each sentence may produce at most `floor(max_length_ratio * source_length)
+ min_extra` tokens (at least 1), its source length counting its non-zero
ids. A hypothesis that reaches its limit without `<eos>` is finished
there. Output ids hold the generated tokens (`<eos>` included when
generated, no `<bos>`), padded with 0 to the batch's longest limit.

Example:

>>> table = tf.math.log([[0.1, 0.1, 0.2, 0.6], [0.1, 0.1, 0.7, 0.1]])
>>> def step_fn(tokens, state):  # after token 3 the scorer prefers <eos>=2
...     return tf.gather(table, tf.cast(tokens == 3, tf.int32)), None, state
>>> ids, scores = greedy_decode(step_fn, tf.constant([[5, 5]]), bos_id=1, eos_id=2,
...                             initial_state=tf.zeros([1]))
>>> ids.numpy().tolist()
[[3, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
"""

import math

import tensorflow as tf

from keras_moe.validation import check_int, check_number


def length_penalty(length, alpha):
    """GNMT's `lp(Y) = ((5 + |Y|) / 6)^alpha`, float32, elementwise over `length`."""
    return tf.pow((5.0 + tf.cast(length, tf.float32)) / 6.0, alpha)


def coverage_penalty(coverage, source_mask, beta):
    """GNMT's `cp = beta * sum_i log(min(coverage_i, 1.0))` over the real positions.

    Args:
        coverage: float `[..., s]`, `sum_j p_ij` per source position `i`.
        source_mask: bool `[..., s]`, False at source padding (left out).
        beta: float >= 0.

    Returns:
        float32 `[...]`. A real position never attended (coverage 0) is
        floored at `log(1e-10)`, so that the penalty stays finite.
    """
    capped = tf.clip_by_value(tf.cast(coverage, tf.float32), 1e-10, 1.0)
    return beta * tf.reduce_sum(tf.where(source_mask, tf.math.log(capped), 0.0), axis=-1)


def length_limits(source_ids, max_length_ratio, min_extra):
    """`max(floor(max_length_ratio * source_length) + min_extra, 1)`, int32 `[b]`."""
    lengths = tf.reduce_sum(tf.cast(tf.not_equal(source_ids, 0), tf.float32), axis=1)
    limits = tf.cast(tf.floor(max_length_ratio * lengths), tf.int32) + min_extra
    return tf.maximum(limits, 1)


def _check(bos_id, eos_id, max_length_ratio, min_extra, beam_width=1, alpha=0.0, beta=0.0):
    check_int("bos_id", bos_id, 0)
    check_int("eos_id", eos_id, 1)
    check_int("min_extra", min_extra, 0)
    check_int("beam_width", beam_width, 1)
    check_number("max_length_ratio", max_length_ratio)
    check_number("alpha", alpha, inclusive=True)
    check_number("beta", beta, inclusive=True)


def _step_function(model_or_step_fn, source_ids, initial_state, repeats):
    """`(step_fn, initial_state [b, ...])` for a model or a given step function."""
    if hasattr(model_or_step_fn, "decode_step"):
        if initial_state is not None:
            raise ValueError("`initial_state` is for step functions; a model makes its own.")
        model = model_or_step_fn
        encoded = model.encode(source_ids, training=False)
        if repeats > 1:
            # Row r's beams are rows r*beam .. r*beam + beam-1; they never
            # leave their sentence, so the encoder side is tiled once.
            encoded = tf.nest.map_structure(lambda t: tf.repeat(t, repeats, axis=0), encoded)

        def step_fn(tokens, state):
            logits, attention, new_state = model.decode_step(tokens, state, encoded)
            return tf.nn.log_softmax(tf.cast(logits, tf.float32)), attention, new_state

        return step_fn, model.initial_decoder_state(tf.shape(source_ids)[0])
    if not callable(model_or_step_fn):
        raise ValueError(
            "`model_or_step_fn` must be a translation model (with `decode_step`) or a step "
            f"function. Received: {model_or_step_fn!r}"
        )
    if initial_state is None:
        raise ValueError("A step function needs `initial_state` (a nest of [batch, ...] tensors).")
    return model_or_step_fn, initial_state


def _write(seq, t, tokens):
    """`seq [..., L]` with column `t` set to `tokens [...]` (column t is 0 before)."""
    return seq + tf.one_hot(t, tf.shape(seq)[-1], dtype=seq.dtype) * tokens[..., None]


def _keep_shapes(body):
    """`body` whose outputs keep the loop variables' static shapes.

    Gathers and reshapes with dynamic sizes lose static dimensions, which
    `tf.while_loop` refuses; every loop variable keeps its shape anyway.
    """
    def wrapped(*loop_vars):
        new = body(*loop_vars)
        return tf.nest.map_structure(lambda n, o: tf.ensure_shape(n, o.shape), new, loop_vars)

    return wrapped


def greedy_decode(model_or_step_fn, source_ids, *, bos_id, eos_id, initial_state=None,
                  max_length_ratio=2.0, min_extra=10):
    """Decode the most probable next token at every step, until `<eos>` or the limit.

    Args:
        model_or_step_fn: a `TranslationModel` or a step function (see the
            module docstring).
        source_ids: int `[b, s]`, 0 = padding; gives the length limits (and
            the model's input).
        bos_id: int, the first input token of the decoder.
        eos_id: int >= 1, ends a hypothesis.
        initial_state: with a step function, its initial state (nest of
            `[b, ...]` tensors); None with a model.
        max_length_ratio: float > 0; limit `floor(ratio * source_length) + min_extra`.
        min_extra: int >= 0.

    Returns:
        `(ids, scores)`: int32 `[b, L]` (0 after `<eos>`; `L` the batch's
        longest limit) and float32 `[b]`, the sum of the chosen tokens'
        log-probabilities.
    """
    _check(bos_id, eos_id, max_length_ratio, min_extra)
    return _greedy_graph(model_or_step_fn, tf.convert_to_tensor(source_ids), initial_state,
                         bos_id, eos_id, float(max_length_ratio), min_extra)


def _greedy(model_or_step_fn, source_ids, initial_state, bos_id, eos_id, ratio, min_extra):
    step_fn, state = _step_function(model_or_step_fn, source_ids, initial_state, 1)
    batch = tf.shape(source_ids)[0]
    limits = length_limits(source_ids, ratio, min_extra)

    def body(t, tokens, state, seq, scores, finished):
        log_probs, _, state = step_fn(tokens, state)
        log_probs = tf.cast(log_probs, tf.float32)
        token = tf.where(finished, 0, tf.argmax(log_probs, axis=-1, output_type=tf.int32))
        seq = _write(seq, t, token)
        chosen = tf.gather(log_probs, token, batch_dims=1)
        scores += tf.where(finished, 0.0, chosen)
        finished = finished | tf.equal(token, eos_id) | (t + 1 >= limits)
        # Finished rows keep running in the batch; they are fed <eos>.
        tokens = tf.where(finished, eos_id, token)
        return t + 1, tokens, state, seq, scores, finished

    loop = (
        tf.constant(0), tf.fill([batch], bos_id), state,
        tf.zeros([batch, tf.reduce_max(limits)], tf.int32), tf.zeros([batch], tf.float32),
        tf.zeros([batch], tf.bool),
    )
    loop = tf.while_loop(lambda t, *rest: ~tf.reduce_all(rest[-1]), _keep_shapes(body), loop)
    return loop[3], loop[4]


def beam_search(model_or_step_fn, source_ids, *, bos_id, eos_id, initial_state=None,
                beam_width=4, alpha=0.6, beta=0.2, max_length_ratio=2.0, min_extra=10):
    """Batched beam search with GNMT's length normalisation and coverage penalty.

    At each step every alive hypothesis is extended by every token; of the
    `2 * beam_width` best extensions (by log-probability), those among the
    first `beam_width` that end in `<eos>` (or reach the length limit) join
    the finished set, which keeps the `beam_width` best by `s(Y, X)`, and
    the `beam_width` best that do not end in `<eos>` stay alive. A sentence
    stops when its limit is reached or when no alive hypothesis can beat
    its worst finished one any more (`log P / lp(limit)` bounds any
    extension's score because log-probabilities only fall and `cp <= 0`),
    so the early stop never changes the result. With `alpha = beta = 0`
    and `beam_width=1` the result is `greedy_decode`'s.

    Args:
        model_or_step_fn: a `TranslationModel` or a step function (see the
            module docstring).
        source_ids: int `[b, s]`, 0 = padding.
        bos_id, eos_id: ints; first decoder input and end token (>= 1).
        initial_state: with a step function, its initial state (nest of
            `[b, ...]` tensors; the search repeats each row `beam_width`
            times); None with a model.
        beam_width: int >= 1.
        alpha: float >= 0, length normalisation (GNMT's 0.6 to 0.7 range
            is typical; 0 disables it).
        beta: float >= 0, coverage penalty (0 disables it; a step function
            returning no attention has none).
        max_length_ratio, min_extra: the length limit, as for `greedy_decode`.

    Returns:
        `(ids, scores)`: the best finished hypothesis of each sentence, int32
        `[b, L]` (0 after `<eos>`), and its score `s(Y, X)`, float32 `[b]`.
    """
    _check(bos_id, eos_id, max_length_ratio, min_extra, beam_width, alpha, beta)
    return _beam_graph(model_or_step_fn, tf.convert_to_tensor(source_ids), initial_state,
                       bos_id, eos_id, beam_width, float(alpha), float(beta),
                       float(max_length_ratio), min_extra)


def _beam(model_or_step_fn, source_ids, initial_state, bos_id, eos_id, beam, alpha, beta,
          ratio, min_extra):
    step_fn, state = _step_function(model_or_step_fn, source_ids, initial_state, beam)
    state = tf.nest.map_structure(lambda t: tf.repeat(t, beam, axis=0), state)
    source_mask = tf.not_equal(source_ids, 0)[:, None, :]  # [b, 1, s]
    batch, width = tf.shape(source_ids)[0], tf.shape(source_ids)[1]
    limits = length_limits(source_ids, ratio, min_extra)
    max_len = tf.reduce_max(limits)
    neg_inf = tf.constant(-math.inf, tf.float32)
    # Every beam starts as <bos>; only the first is alive, or the first
    # step would return `beam` copies of the same extensions.
    first_beam = tf.concat([[0.0], tf.fill([beam - 1], neg_inf)], axis=0)
    cap = tf.range(2 * beam) < beam  # candidates allowed to finish: the first `beam`
    batch_offset = tf.range(batch)[:, None] * beam

    def body(t, tokens, state, alive_logp, alive_seq, alive_cov, fin_seq, fin_scores, done):
        log_probs, attention, state = step_fn(tokens, state)
        vocab = tf.shape(log_probs)[-1]
        log_probs = tf.reshape(tf.cast(log_probs, tf.float32), [batch, beam, vocab])
        extended = tf.reshape(alive_logp[:, :, None] + log_probs, [batch, beam * vocab])
        cand_logp, flat = tf.math.top_k(extended, 2 * beam)  # [b, 2k], best first
        parent, token = flat // vocab, flat % vocab
        cand_seq = _write(tf.gather(alive_seq, parent, batch_dims=1), t, token)  # [b, 2k, L]
        cov = alive_cov
        if attention is not None:
            cov += tf.reshape(tf.cast(attention, tf.float32), [batch, beam, width])
        cand_cov = tf.gather(cov, parent, batch_dims=1)  # [b, 2k, s]

        length = t + 1
        last = (length >= limits)[:, None]
        finishing = (tf.equal(token, eos_id) | last) & cap & ~done[:, None]
        score = cand_logp / length_penalty(length, alpha)
        score += coverage_penalty(cand_cov, source_mask, beta)
        score = tf.where(finishing & (cand_logp > neg_inf), score, neg_inf)
        fin_scores, keep = tf.math.top_k(tf.concat([fin_scores, score], axis=1), beam)
        fin_seq = tf.gather(tf.concat([fin_seq, cand_seq], axis=1), keep, batch_dims=1)

        alive_logp, keep = tf.math.top_k(tf.where(tf.equal(token, eos_id), neg_inf, cand_logp),
                                         beam)
        alive_seq = tf.gather(cand_seq, keep, batch_dims=1)
        alive_cov = tf.gather(cand_cov, keep, batch_dims=1)
        rows = tf.reshape(tf.gather(parent, keep, batch_dims=1) + batch_offset, [-1])
        state = tf.nest.map_structure(lambda s: tf.gather(s, rows), state)
        tokens = tf.reshape(tf.gather(token, keep, batch_dims=1), [-1])

        best_reachable = alive_logp[:, 0] / length_penalty(limits, alpha)
        done = done | last[:, 0] | (fin_scores[:, -1] >= best_reachable)
        return t + 1, tokens, state, alive_logp, alive_seq, alive_cov, fin_seq, fin_scores, done

    loop = (
        tf.constant(0), tf.fill([batch * beam], bos_id), state,
        tf.tile(first_beam[None, :], [batch, 1]),
        tf.zeros([batch, beam, max_len], tf.int32), tf.zeros([batch, beam, width], tf.float32),
        tf.zeros([batch, beam, max_len], tf.int32), tf.fill([batch, beam], neg_inf),
        tf.zeros([batch], tf.bool),
    )
    loop = tf.while_loop(lambda t, *rest: ~tf.reduce_all(rest[-1]), _keep_shapes(body), loop)
    fin_seq, fin_scores = loop[6], loop[7]
    return fin_seq[:, 0, :], fin_scores[:, 0]


# Python arguments (the model or step function, ids, widths, penalties) are
# part of the trace key; tensor shapes are relaxed after a second shape.
_greedy_graph = tf.function(_greedy, reduce_retracing=True)
_beam_graph = tf.function(_beam, reduce_retracing=True)
