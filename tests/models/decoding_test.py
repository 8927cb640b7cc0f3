"""Tests of keras_moe.models.decoding on hand-set toy scorers (no model needed)."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose, assert_array_equal

from keras_moe.models import decoding

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4
V = 5


def tree_scorer(trees, attention=None, width=1):
    """A step function whose next-token distribution is set by hand per prefix.

    `trees[r]` maps a prefix (tuple of tokens after <bos>) to `{token: p}`;
    a prefix not listed ends with <eos> (p = 1). Row r of a batch starts at
    node r (initial state `tf.range(len(trees))`). `attention[r]` optionally
    maps a prefix to the attention `[width]` returned with its distribution.
    """
    nodes = {}
    for r, tree in enumerate(trees):
        for prefix in sorted(tree, key=len):
            nodes[(r, prefix)] = len(trees) + 1 + len(nodes)
    sink = len(trees)
    count = len(trees) + 1 + len(nodes)
    log_p = np.full((count, V), -np.inf, np.float32)
    log_p[sink, EOS] = 0.0
    step = np.full((count, V), sink, np.int32)
    att = np.zeros((count, width), np.float32)
    for r, tree in enumerate(trees):
        step[r, BOS] = nodes[(r, ())]
        for prefix, dist in tree.items():
            node = nodes[(r, prefix)]
            assert abs(sum(dist.values()) - 1) < 1e-9
            for token, p in dist.items():
                log_p[node, token] = math.log(p)
                step[node, token] = nodes.get((r, prefix + (token,)), sink)
            if attention is not None and prefix in attention[r]:
                att[node] = attention[r][prefix]
    log_p, step, att = (tf.constant(x) for x in (log_p, step, att))

    def step_fn(tokens, node):
        # `node` is the prefix before `tokens`: move along, then score.
        node = tf.gather_nd(step, tf.stack([node, tokens], axis=1))
        return tf.gather(log_p, node), (None if attention is None else tf.gather(att, node)), node

    return step_fn, tf.range(len(trees), dtype=tf.int32)


def lp(length, alpha):
    return ((5 + length) / 6) ** alpha


# Greedy takes A (0.6) at the root, then A (0.4) and <eos> (0.5): p = 0.12.
# The best sequence starts with the root's second choice: B <eos>, p = 0.36.
TREE = {
    (): {A: 0.6, B: 0.4},
    (A,): {A: 0.4, B: 0.35, EOS: 0.25},
    (A, A): {EOS: 0.5, A: 0.3, B: 0.2},
    (A, B): {EOS: 1.0},
    (B,): {EOS: 0.9, A: 0.06, B: 0.04},
}
SOURCE = tf.constant([[7, 7, 7]])


def test_beam_search_finds_the_best_sequence_greedy_misses():
    step_fn, state = tree_scorer([TREE])
    ids, score = decoding.greedy_decode(step_fn, SOURCE, bos_id=BOS, eos_id=EOS,
                                        initial_state=state)
    assert ids.numpy()[0, :4].tolist() == [A, A, EOS, 0]
    assert_allclose(score.numpy(), [math.log(0.6 * 0.4 * 0.5)], rtol=1e-6)
    ids, score = decoding.beam_search(step_fn, SOURCE, bos_id=BOS, eos_id=EOS,
                                      initial_state=state, beam_width=2, alpha=0.6, beta=0.0)
    # Limit floor(2 * 3) + 10 = 16 columns; the rest padded with 0.
    assert ids.numpy().tolist() == [[B, EOS] + [0] * 14]
    # s = log P / lp, lp(2) = (7/6)^0.6.
    assert_allclose(score.numpy(), [math.log(0.4 * 0.9) / (7 / 6) ** 0.6], rtol=1e-6)


def test_length_normalisation_changes_the_winner_as_computed_by_hand():
    # B <eos> (p = 0.3, 2 tokens) is the most probable sequence, but
    # A A A <eos> (p = 0.2268, 4 tokens) wins once lengths are normalised:
    # alpha = 1: log 0.3 / (7/6) = -1.032 < log 0.2268 / (9/6) = -0.989.
    tree = {
        (): {A: 0.7, B: 0.3},
        (B,): {EOS: 1.0},
        (A,): {A: 0.6, EOS: 0.4},
        (A, A): {A: 0.6, EOS: 0.4},
        (A, A, A): {EOS: 0.9, B: 0.1},
    }
    step_fn, state = tree_scorer([tree])
    # Every finished sequence and its probability, worked out by hand.
    candidates = {
        (B, EOS): math.log(0.3),
        (A, EOS): math.log(0.7 * 0.4),
        (A, A, EOS): math.log(0.7 * 0.6 * 0.4),
        (A, A, A, EOS): math.log(0.7 * 0.6 * 0.6 * 0.9),
        (A, A, A, B, EOS): math.log(0.7 * 0.6 * 0.6 * 0.1),
    }
    for alpha in (0.0, 1.0, 2.0):
        best = max(candidates, key=lambda y: candidates[y] / lp(len(y), alpha))
        ids, score = decoding.beam_search(step_fn, SOURCE, bos_id=BOS, eos_id=EOS,
                                          initial_state=state, beam_width=3, alpha=alpha, beta=0.0)
        got = tuple(t for t in ids.numpy()[0] if t)
        assert got == best
        assert_allclose(score.numpy()[0], candidates[best] / lp(len(best), alpha), rtol=1e-6)
    # The hand-worked winners: by probability B <eos>; normalised, the longest.
    assert max(candidates, key=candidates.get) == (B, EOS)
    assert max(candidates, key=lambda y: candidates[y] / lp(len(y), 2.0)) == (A, A, A, EOS)


def test_coverage_penalty_on_a_hand_case():
    # Two source words and one padding position. Root attention [.5, .5];
    # after A the step attends [.9, .1] (coverage [1.4, .6]), after B
    # [.4, .6] (coverage [.9, 1.1]). The padding column must be ignored.
    tree = {(): {A: 0.55, B: 0.45}, (A,): {EOS: 1.0}, (B,): {EOS: 1.0}}
    attention = {(): [0.5, 0.5, 0.0], (A,): [0.9, 0.1, 0.0], (B,): [0.4, 0.6, 0.0]}
    step_fn, state = tree_scorer([tree], [attention], width=3)
    source = tf.constant([[5, 6, 0]])
    lp2 = (7 / 6) ** 0.6
    score_a = {beta: math.log(0.55) / lp2 + beta * math.log(0.6) for beta in (0.2, 1.0)}
    score_b = {beta: math.log(0.45) / lp2 + beta * (math.log(0.9) + math.log(1.0))
               for beta in (0.2, 1.0)}
    for beta, winner, expected in [(0.2, A, score_a[0.2]), (1.0, B, score_b[1.0])]:
        ids, score = decoding.beam_search(step_fn, source, bos_id=BOS, eos_id=EOS,
                                          initial_state=state, beam_width=2, alpha=0.6, beta=beta)
        assert ids.numpy()[0, :2].tolist() == [winner, EOS]
        assert_allclose(score.numpy(), [expected], rtol=1e-6)
    assert score_a[0.2] > score_b[0.2] and score_b[1.0] > score_a[1.0]


def test_coverage_penalty_function():
    coverage = tf.constant([[1.4, 0.6, 0.0], [0.0, 2.0, 0.5]])
    mask = tf.constant([[True, True, False], [True, True, True]])
    got = decoding.coverage_penalty(coverage, mask, 0.5).numpy()
    assert_allclose(got, [0.5 * math.log(0.6), 0.5 * (math.log(1e-10) + math.log(0.5))],
                    rtol=1e-6)
    assert_allclose(decoding.length_penalty(tf.constant([1, 7]), 0.6).numpy(),
                    [1.0, 2.0**0.6], rtol=1e-6)


def random_scorer(rows, steps, width, seed):
    """Log-probs and attention drawn at random per (row, step, previous token)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, steps, V, V)) * 2
    logits[..., PAD] = -np.inf  # padding is never generated
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    att = rng.dirichlet(np.ones(width), size=(rows, steps, V)).astype(np.float32)
    table, att_t = tf.constant(log_p, tf.float32), tf.constant(att)

    def step_fn(tokens, state):
        row, t = state[0], state[1]
        index = tf.stack([row, tf.minimum(t, steps - 1), tokens], axis=1)
        return tf.gather_nd(table, index), tf.gather_nd(att_t, index), (row, t + 1)

    initial = (tf.range(rows, dtype=tf.int32), tf.zeros([rows], tf.int32))
    return step_fn, initial, log_p, att


def exhaustive_best(log_p, att, row, limit, source_mask, alpha, beta):
    """The best s(Y, X) over every sequence of at most `limit` tokens, by enumeration."""
    best = (-np.inf, None)
    for length in range(1, limit + 1):
        for body in itertools.product([EOS, A, B], repeat=length):
            if EOS in body[:-1] or (body[-1] != EOS and length < limit):
                continue  # ended early, or unfinished before the limit
            prev, total, coverage = BOS, 0.0, np.zeros(att.shape[-1])
            for t, token in enumerate(body):
                total += log_p[row, t, prev, token]
                coverage += att[row, t, prev]
                prev = token
            cp = beta * np.sum(np.log(np.clip(coverage, 1e-10, 1.0))[source_mask])
            score = total / lp(length, alpha) + cp
            if score > best[0]:
                best = (score, body)
    return best


def test_a_beam_wide_enough_finds_the_exhaustive_optimum():
    # Limits floor(1 * 1) + 2 = 3 and floor(1 * 2) + 2 = 4 tokens; with
    # 27 beams no hypothesis is ever pruned (3^3 = 27 alive at most).
    source = tf.constant([[5, 0], [5, 6]])
    step_fn, state, log_p, att = random_scorer(2, 4, 2, seed=7)
    ids, scores = decoding.beam_search(step_fn, source, bos_id=BOS, eos_id=EOS,
                                       initial_state=state, beam_width=27, alpha=0.6, beta=0.3,
                                       max_length_ratio=1.0, min_extra=2)
    assert ids.shape == (2, 4)
    for row, limit in enumerate([3, 4]):
        mask = source.numpy()[row] != 0
        score, body = exhaustive_best(log_p, att, row, limit, mask, 0.6, 0.3)
        assert tuple(ids.numpy()[row, :len(body)]) == body
        assert (ids.numpy()[row, len(body):] == 0).all()
        assert_allclose(scores.numpy()[row], score, rtol=1e-5)


def test_beam_width_one_equals_greedy_without_penalties():
    source = tf.constant([[5, 6, 7], [5, 0, 0], [8, 9, 0]])
    step_fn, state, _, _ = random_scorer(3, 8, 3, seed=3)
    greedy_ids, greedy_scores = decoding.greedy_decode(
        step_fn, source, bos_id=BOS, eos_id=EOS, initial_state=state, min_extra=2
    )
    beam_ids, beam_scores = decoding.beam_search(
        step_fn, source, bos_id=BOS, eos_id=EOS, initial_state=state, beam_width=1,
        alpha=0.0, beta=0.0, min_extra=2,
    )
    assert_array_equal(beam_ids.numpy(), greedy_ids.numpy())
    assert_allclose(beam_scores.numpy(), greedy_scores.numpy(), rtol=1e-6)


def test_only_the_first_beam_width_candidates_may_finish():
    # <eos> at the root (0.3) would beat greedy's A A <eos> (0.25), but it
    # is only the second candidate: with one beam it is pruned, as greedy
    # prunes it, so beam width 1 keeps following greedy's path.
    tree = {(): {A: 0.5, EOS: 0.3, B: 0.2}, (A,): {A: 0.5, B: 0.5}, (A, A): {EOS: 1.0}}
    step_fn, state = tree_scorer([tree])
    kwargs = dict(bos_id=BOS, eos_id=EOS, initial_state=state)
    greedy_ids, _ = decoding.greedy_decode(step_fn, SOURCE, **kwargs)
    beam_ids, beam_score = decoding.beam_search(step_fn, SOURCE, beam_width=1, alpha=0.0,
                                                beta=0.0, **kwargs)
    assert beam_ids.numpy()[0, :3].tolist() == greedy_ids.numpy()[0, :3].tolist() == [A, A, EOS]
    assert_allclose(beam_score.numpy(), [math.log(0.25)], rtol=1e-6)
    wide_ids, _ = decoding.beam_search(step_fn, SOURCE, beam_width=2, alpha=0.0, beta=0.0,
                                       **kwargs)
    assert wide_ids.numpy()[0, :2].tolist() == [EOS, 0]


def test_the_early_stop_does_not_cut_off_a_winner_found_later():
    # <eos> first (0.55) finishes at once; A A A <eos> (0.45) is longer and
    # wins with alpha = 1: log 0.45 / (9/6) = -0.532 > log 0.55 / 1 = -0.598.
    # Bounding the alive A by lp(1) instead of lp(limit) would stop at step 1.
    tree = {(): {EOS: 0.55, A: 0.45}, (A,): {A: 1.0}, (A, A): {A: 1.0}, (A, A, A): {EOS: 1.0}}
    step_fn, state = tree_scorer([tree])
    for alpha, expected, score in [(0.0, [EOS, 0], math.log(0.55)),
                                   (1.0, [A, A], math.log(0.45) / 1.5)]:
        ids, scores = decoding.beam_search(step_fn, SOURCE, bos_id=BOS, eos_id=EOS,
                                           initial_state=state, beam_width=1, alpha=alpha,
                                           beta=0.0)
        assert ids.numpy()[0, :2].tolist() == expected
        assert_allclose(scores.numpy(), [score], rtol=1e-6)


def test_max_length_relative_to_the_source_and_no_eos():
    # A scorer that never ends (<eos> has probability 0): every row is cut
    # at its own limit.
    log_p = tf.math.log([[0.0, 0.0, 0.0, 0.6, 0.4]])

    def step_fn(tokens, state):
        return tf.tile(log_p, [tf.shape(tokens)[0], 1]), None, state

    source = tf.constant([[5, 0, 0], [5, 6, 7]])
    # Limits floor(1.5 * 1) + 1 = 2 and floor(1.5 * 3) + 1 = 5.
    kwargs = dict(bos_id=BOS, eos_id=EOS, initial_state=tf.zeros([2]), max_length_ratio=1.5,
                  min_extra=1)
    expected = [[A, A, 0, 0, 0], [A, A, A, A, A]]
    ids, scores = decoding.greedy_decode(step_fn, source, **kwargs)
    assert ids.numpy().tolist() == expected
    assert_allclose(scores.numpy(), [2 * math.log(0.6), 5 * math.log(0.6)], rtol=1e-6)
    ids, scores = decoding.beam_search(step_fn, source, beam_width=3, alpha=0.6, beta=0.0,
                                       **kwargs)
    assert ids.numpy().tolist() == expected
    assert_allclose(scores.numpy(), [2 * math.log(0.6) / lp(2, 0.6),
                                     5 * math.log(0.6) / lp(5, 0.6)], rtol=1e-6)


def test_batched_rows_decode_independently():
    # Row 1's scorer prefers A A <eos> with nothing hidden behind it.
    other = {(): {A: 0.9, B: 0.1}, (A,): {A: 0.8, EOS: 0.2}, (A, A): {EOS: 1.0}}
    step_fn, state = tree_scorer([TREE, other])
    source = tf.constant([[7, 7, 7], [7, 7, 0]])
    ids, scores = decoding.beam_search(step_fn, source, bos_id=BOS, eos_id=EOS,
                                       initial_state=state, beam_width=2, alpha=0.6, beta=0.0)
    assert ids.numpy()[:, :4].tolist() == [[B, EOS, 0, 0], [A, A, EOS, 0]]
    assert_allclose(scores.numpy(), [math.log(0.36) / lp(2, 0.6), math.log(0.72) / lp(3, 0.6)],
                    rtol=1e-6)
    for row in range(2):
        alone_fn, _ = tree_scorer([[TREE, other][row]])
        alone_ids, alone_scores = decoding.beam_search(
            alone_fn, source[row:row + 1], bos_id=BOS, eos_id=EOS,
            initial_state=tf.zeros([1], tf.int32), beam_width=2, alpha=0.6, beta=0.0,
        )
        width = alone_ids.shape[1]
        assert_array_equal(alone_ids.numpy()[0], ids.numpy()[row, :width])
        assert_allclose(alone_scores.numpy()[0], scores.numpy()[row], rtol=1e-6)


def test_runs_inside_a_users_tf_function():
    step_fn, state = tree_scorer([TREE])

    @tf.function
    def translate(source):
        return decoding.beam_search(step_fn, source, bos_id=BOS, eos_id=EOS,
                                    initial_state=state, beam_width=2, beta=0.0)

    ids, _ = translate(SOURCE)
    assert ids.numpy()[0, :2].tolist() == [B, EOS]
    # The loop is a graph while_loop (in the nested function), not a Python loop.
    graph_def = translate.get_concrete_function(SOURCE).graph.as_graph_def()
    ops = {node.op for f in graph_def.library.function for node in f.node_def}
    assert {"While", "StatelessWhile"} & ops


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beam_width=0), "Received: beam_width=0"),
        (dict(alpha=-0.1), "Received: alpha=-0.1"),
        (dict(beta=float("nan")), "Received: beta=nan"),
        (dict(max_length_ratio=0), "Received: max_length_ratio=0"),
        (dict(min_extra=-1), "Received: min_extra=-1"),
        (dict(eos_id=0), "Received: eos_id=0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    step_fn, state = tree_scorer([TREE])
    args = {**dict(bos_id=BOS, eos_id=EOS, initial_state=state), **kwargs}
    with pytest.raises(ValueError, match=match):
        decoding.beam_search(step_fn, SOURCE, **args)


def test_a_step_function_needs_an_initial_state():
    step_fn, _ = tree_scorer([TREE])
    with pytest.raises(ValueError, match="initial_state"):
        decoding.greedy_decode(step_fn, SOURCE, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="model_or_step_fn"):
        decoding.greedy_decode(42, SOURCE, bos_id=BOS, eos_id=EOS, initial_state=0)
