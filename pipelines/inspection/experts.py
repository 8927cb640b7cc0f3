"""Per-expert summaries of routed tokens: characteristic tokens, contexts, gate matrices.

They read the layer results of `keras_moe.pipelines.inspection.routes.route`
(per text, per token: the chosen experts and their gates), in the spirit of
Table 9 of Shazeer et al. 2017.
"""

import numpy as np


def pair_counts(layer_result):
    """`{token: [pairs routed to expert 0, 1, ...]}` of a `route` layer result."""
    counts = {}
    for text in layer_result["tokens"]:
        for token in text:
            row = counts.setdefault(token["token"], [0] * layer_result["num_experts"])
            for e in token["experts"]:
                row[e] += 1
    return counts


def characteristic_tokens(source, top=10, min_count=2):
    """Per expert, the tokens routed to it far more often than their frequency predicts.

    The ratio is `P(token | expert) / P(token)` over routed (token, expert)
    pairs: `(c[t, e] / C_e) / (C_t / C)` with `c[t, e]` the pairs of token
    `t` sent to expert `e`, `C_e` all pairs of `e`, `C_t` all pairs of `t`
    and `C` all pairs (with top-k gating `C_t / C` is the token's share of
    the positions). A ratio of `E / k` means every occurrence of the token
    went to this expert (when the experts are balanced), 1 means the expert
    sees it at its usual rate; only tokens above 1 are characteristic.

    Args:
        source: a layer result of `route`, or `{token: [count per expert]}`.
        top: int >= 1, tokens kept per expert.
        min_count: int >= 1, tokens with fewer pairs on the expert are left
            out (a single occurrence gives a large, meaningless ratio).

    Returns:
        list, per expert: `{"expert", "count" (C_e), "tokens": [{"token",
        "count" (c[t, e]), "total" (C_t), "ratio"}, ...]}`, tokens with a
        ratio above 1, highest first (ties: larger count, then the token).

    Example:

    >>> table = characteristic_tokens({"a": [6, 0], "b": [2, 4], "c": [0, 4]})
    >>> [(t["token"], round(t["ratio"], 3)) for t in table[1]["tokens"]]
    [('c', 2.0), ('b', 1.333)]
    """
    for name, value in (("top", top), ("min_count", min_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    if isinstance(source, dict) and "tokens" in source:
        counts, width = pair_counts(source), source["num_experts"]
    else:
        counts = source
        width = len(next(iter(counts.values()))) if counts else 0
    tokens = list(counts)
    matrix = np.array([counts[t] for t in tokens], np.float64).reshape(len(tokens), width)
    total = matrix.sum()
    per_expert = matrix.sum(axis=0)
    per_token = matrix.sum(axis=1)
    table = []
    for e in range(matrix.shape[1]):
        rows = []
        for i, token in enumerate(tokens):
            c = matrix[i, e]
            if c < min_count:
                continue
            ratio = (c / per_expert[e]) / (per_token[i] / total)
            if ratio > 1:
                rows.append({"token": token, "count": int(c), "total": int(per_token[i]),
                             "ratio": float(ratio)})
        # Rounded: equal ratios computed from different counts tie exactly.
        rows.sort(key=lambda r: (-round(r["ratio"], 9), -r["count"], r["token"]))
        table.append({"expert": e, "count": int(per_expert[e]), "tokens": rows[:top]})
    return table


def expert_contexts(layer_result, top=3, window=2):
    """Per expert, the positions with its largest gates and their surroundings (Table 9).

    Returns:
        list, per expert, of `{"gate", "text", "position", "context"}`
        (context: `window` tokens each side, the token in brackets),
        largest gate first.

    Example:

    >>> layer = {"num_experts": 2, "tokens": [[
    ...     {"token": "a", "experts": [0], "gates": [0.9]},
    ...     {"token": "b", "experts": [1], "gates": [0.6]}]]}
    >>> expert_contexts(layer, window=1)[1][0]["context"]
    'a [b]'
    """
    found = [[] for _ in range(layer_result["num_experts"])]
    for text_index, text in enumerate(layer_result["tokens"]):
        for position, token in enumerate(text):
            for e, gate in zip(token["experts"], token["gates"], strict=True):
                found[e].append((gate, text_index, position))
    contexts = []
    for entries in found:
        entries.sort(key=lambda entry: (-entry[0], entry[1], entry[2]))
        rows = []
        for gate, text_index, position in entries[:top]:
            words = [token["token"] for token in layer_result["tokens"][text_index]]
            left = words[max(0, position - window) : position]
            right = words[position + 1 : position + 1 + window]
            context = " ".join([*left, f"[{words[position]}]", *right])
            rows.append({"gate": gate, "text": text_index, "position": position,
                         "context": context})
        contexts.append(rows)
    return contexts


def gate_matrix(layer_result, text_index):
    """Gates of one text as a float `[tokens, num_experts]` array (0 where not chosen).

    Example:

    >>> layer = {"num_experts": 3, "tokens": [[{"experts": [2, 0], "gates": [0.7, 0.3]}]]}
    >>> gate_matrix(layer, 0).tolist()
    [[0.3, 0.0, 0.7]]
    """
    text = layer_result["tokens"][text_index]
    matrix = np.zeros((len(text), layer_result["num_experts"]), np.float64)
    for t, token in enumerate(text):
        matrix[t, token["experts"]] = token["gates"]
    return matrix

