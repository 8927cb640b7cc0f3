"""Routing inspector: which experts each token chose, and why.

`route(model, texts)` runs any Keras model that contains `keras_moe.MoE` or
`keras_moe.HierarchicalMoE` layers (functional or subclassed, nested or
not) on a few texts in inference mode and returns, per MoE layer, plain
Python data (JSON-serialisable): each expert's share of the traffic and,
per token, the chosen experts with their gate values, the clean logits
`x W_g`, the noise scale `softplus(x W_noise) + noise_epsilon` the gate
would add in training, and the margin that decided the last chosen expert.
`characteristic_tokens` and `expert_contexts` summarise the per-token data
per expert, in the spirit of the paper's Table 9 (Shazeer et al. 2017).

The routing is captured without changing the model: for the duration of
`route` each inspected MoE layer has a routing observer
(`add_routing_observer`) that records the layer's input and the
`keras_moe.Routing` of its call; the observers are removed afterwards, also
when the model fails. Per-expert counts and shares are those of
`keras_moe.statistics`.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_moe
from keras_moe import statistics
from keras_moe.monitoring import find_moe_layers

MIN_WIDTH = 16  # batches are padded to a power of two of at least this many positions


def layer_names(model):
    """`{name: layer}` of the MoE layers of `model`; repeated names get `_2`, `_3`, ..."""
    named = {}
    for layer in find_moe_layers(model):
        name, n = layer.name, 1
        while name in named:
            n += 1
            name = f"{layer.name}_{n}"
        named[name] = layer
    return named


def _token_ids(texts, vocabulary):
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise ValueError(
            "`texts` must be a list of strings or a list of token-id lists. "
            f"Received: texts={texts!r:.80}"
        )
    if not texts:
        raise ValueError("`texts` must hold at least one text. Received: texts=[]")
    ids = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if vocabulary is None or not hasattr(vocabulary, "encode_line"):
                raise ValueError(
                    "texts given as strings need a `vocabulary` with `encode_line(str)`. "
                    f"Received: vocabulary={vocabulary!r:.80}"
                )
            row = [int(t) for t in vocabulary.encode_line(text)]
        else:
            row = [int(t) for t in np.asarray(text).reshape(-1)]
        if not row or min(row) < 1:
            raise ValueError(
                f"texts[{i}] must hold at least one token id, all >= 1 (0 is padding). "
                f"Received: {text!r:.80}"
            )
        ids.append(row)
    return ids


def token_string(token_id, vocabulary):
    """How a token id is shown: the vocabulary's word or piece, else the id."""
    for attribute in ("words", "tokens"):
        table = getattr(vocabulary, attribute, None)
        if isinstance(table, (list, tuple)) and 0 <= token_id < len(table):
            return str(table[token_id])
    if hasattr(vocabulary, "decode"):
        text = vocabulary.decode([token_id])
        if text:
            return str(text)
    return str(token_id)


def _recording_observer(records):
    """A routing observer that records each call's input and routing."""

    def observe(inputs, routing, training):
        records.append((inputs, routing))

    return observe


def _forward_function(model, records, run):
    """A traced forward pass returning, per MoE layer, its input and routing."""

    def forward(tokens):
        for calls in records.values():
            calls.clear()
        run(model, tokens)
        outputs = {}
        for name, calls in records.items():
            if len(calls) != 1:
                raise ValueError(
                    f"MoE layer {name!r} was called {len(calls)} times in one forward pass; "
                    "route() needs each inspected layer called exactly once (pass `layer=`)"
                )
            x, r = calls[0]
            outputs[name] = {
                "x": tf.cast(x, tf.float32),
                "expert_indices": r.expert_indices,
                "gates": r.gates,
                "clean_logits": r.clean_logits,
            }
        return outputs

    # Traced per input shape (no `None` time axis): unrolled RNNs need a static
    # length. `_capture` keeps the number of distinct shapes small.
    return tf.function(forward)


def _noise_std(x, w_noise, epsilon):
    return tf.nn.softplus(tf.matmul(x, tf.cast(w_noise, tf.float32))) + epsilon


def _margin(logits, k):
    """k-th largest minus (k+1)-th largest logit: how far the last chosen one is ahead."""
    if k >= len(logits):
        return None
    ordered = np.sort(np.asarray(logits, np.float64))[::-1]
    return float(ordered[k - 1] - ordered[k])


def _layer_info(name, layer):
    hierarchical = isinstance(layer, keras_moe.HierarchicalMoE)
    gating = layer.gating.primary if hierarchical else layer.gating
    info = {
        "name": name,
        "type": type(layer).__name__,
        "gating": layer.gating_type,
        "num_experts": int(layer.num_experts),
        "k": int(layer.k),
        "logits_level": "groups" if hierarchical else "experts",
        # Batchwise gating chooses by thresholds, not a top-k of the logits.
        "has_margin": bool(layer.gating.top_k_routing),
        "has_noise": bool(getattr(gating, "noisy", False)),
    }
    if hierarchical:
        info.update(
            num_groups=int(layer.num_groups), experts_per_group=int(layer.experts_per_group),
            k_primary=int(layer.k_primary), k_secondary=int(layer.k_secondary),
        )
    return info


def _token_details(info, layer, x, logits, experts):
    """Noise std, margin and (hierarchical) second-level numbers of `[n]` tokens."""
    hierarchical = info["type"] == "HierarchicalMoE"
    gating = layer.gating.primary if hierarchical else layer.gating
    noise = None
    if info["has_noise"]:
        noise = _noise_std(x, gating.w_noise, gating.noise_epsilon).numpy()
    k = info["k_primary"] if hierarchical else info["k"]
    details = []
    for t in range(x.shape[0]):
        d = {
            "clean_logits": [float(v) for v in logits[t]],
            "noise_std": None if noise is None else [float(v) for v in noise[t]],
            "margin": _margin(logits[t], k) if info["has_margin"] else None,
        }
        if hierarchical:
            d["secondary"] = _secondary(info, layer, x[t : t + 1], experts[t])
        details.append(d)
    return details


def _secondary(info, layer, x, experts):
    """Per chosen group: the second-level clean logits, noise std and margin."""
    per_group = info["experts_per_group"]
    out = []
    for group in sorted({int(e) // per_group for e in experts if e >= 0}):
        clean = tf.matmul(x, tf.cast(layer.gating.w_gate[group], tf.float32))[0].numpy()
        noise = None
        if info["has_noise"]:
            noise = _noise_std(x, layer.gating.w_noise[group], layer.gating.noise_epsilon)
            noise = noise[0].numpy()
        out.append({
            "group": group,
            "clean_logits": [float(v) for v in clean],
            "noise_std": None if noise is None else [float(v) for v in noise],
            "margin": _margin(clean, info["k_secondary"]),
        })
    return out


def _default_forward(model, tokens):
    return model(tokens, training=False)


def route(model, texts, vocabulary=None, layer=None, batch_size=64, details=True,
          forward=None):
    """Route `texts` through `model` in inference mode and report every MoE layer's choices.

    Each text is one row of a batch, padded with id 0 to a power-of-two
    length of at least 16 (padding the model does not mask, as
    `LanguageModel` and `Embedding(mask_zero=True)` do, is routed but never
    reported or counted); the model
    is called with `training=False`, so no noise is added and the choices
    are the deterministic ones of inference. Every MoE layer inspected must
    be called once per forward pass on positions that correspond to the
    input tokens (`[batch, time, d]`).

    Args:
        model: a Keras model containing `MoE` / `HierarchicalMoE` layers,
            taking int32 token ids `[batch, time]`.
        texts: a list of strings (then `vocabulary` is required) or a list
            of token-id lists (ids >= 1).
        vocabulary: object with `encode_line(str) -> list[int]`; tokens are
            shown with its `words` or `tokens` list, or `decode([id])`.
        layer: None (every MoE layer) or the name of one.
        batch_size: int >= 1, texts per forward pass.
        details: bool; False leaves out the per-token logits, noise std,
            margins (cheaper for a large corpus).
        forward: None, or a callable `(model, tokens)` that runs the model
            on int32 ids `[batch, time]` in inference mode, for models that
            take more than the tokens (default: `model(tokens,
            training=False)`). E.g. for a translation model, a function that
            feeds `tokens` as the source, with `layer` naming an encoder MoE.

    Returns:
        dict with `texts` (list of str), `token_ids` (list of int lists)
        and `layers`: `{name: layer result}`. A layer result holds `type`,
        `gating`, `num_experts`, `k` (and for a hierarchical layer
        `num_groups`, `experts_per_group`, `k_primary`, `k_secondary`),
        `logits_level` (`"experts"`, or `"groups"`: a hierarchical layer's
        clean logits, noise std and margin are the primary gate's, and each
        token's `secondary` list holds the chosen groups' own),
        `tokens_routed`, `pairs` (routed (token, expert) pairs), `experts`
        (per expert: `expert`, `count`, `share` = count / pairs,
        `importance` = sum of its gates) and `tokens`: per text, per token,
        `position`, `id`, `token`, `experts`, `gates` (and `groups`), and
        with `details`: `clean_logits` (all experts or groups),
        `noise_std` (None when the gate never adds noise), `margin` (k-th
        minus (k+1)-th largest clean logit; None when all are chosen or for
        batchwise gating, which chooses by threshold).

    Raises:
        ValueError: naming `layer` (and listing the MoE layers) when it is
            not one, or naming the bad text or model structure.

    Example:

    >>> inputs = keras.Input((None,), dtype="int32")
    >>> hidden = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    >>> model = keras.Model(inputs, keras_moe.MoE(4, 8, k=2, name="moe")(hidden))
    >>> result = route(model, [[3, 5, 7], [2]])
    >>> moe = result["layers"]["moe"]
    >>> moe["tokens_routed"], moe["pairs"], len(moe["tokens"][0][0]["experts"])
    (4, 8, 2)
    """
    if not isinstance(model, keras.Layer):
        raise ValueError(f"`model` must be a Keras model. Received: model={model!r:.80}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}"
        )
    named = layer_names(model)
    if not named:
        raise ValueError(
            f"model {model.name!r} has no MoE layer (keras_moe.MoE or HierarchicalMoE)"
        )
    if layer is not None:
        if layer not in named:
            raise ValueError(
                f"`layer` must name an MoE layer of model {model.name!r}; available: "
                f"{', '.join(named)}. Received: layer={layer!r}"
            )
        named = {layer: named[layer]}
    ids = _token_ids(texts, vocabulary)
    if forward is not None and not callable(forward):
        raise ValueError(f"`forward` must be None or callable. Received: forward={forward!r:.80}")
    captured = _capture(model, named, ids, batch_size, forward or _default_forward)
    result = {
        "texts": [
            t if isinstance(t, str) else " ".join(token_string(i, vocabulary) for i in row)
            for t, row in zip(texts, ids, strict=True)
        ],
        "token_ids": ids,
        "layers": {},
    }
    for name, moe in named.items():
        result["layers"][name] = _layer_result(
            _layer_info(name, moe), moe, ids, captured[name], vocabulary, details
        )
    return result


def _capture(model, named, ids, batch_size, run):
    """Per layer, per text: `(x [n, d], expert_indices [n, k], gates, clean_logits)`."""
    records = {name: [] for name in named}
    observers = {name: _recording_observer(records[name]) for name in named}
    out = {name: [None] * len(ids) for name in named}
    # Texts of similar length share a batch: less padding.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    try:
        for name, moe in named.items():
            moe.add_routing_observer(observers[name])
        forward = _forward_function(model, records, run)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            # Every batch has the same rows (the last one padded with empty
            # rows) and a power-of-two width: few traced shapes.
            width = max(MIN_WIDTH, 1 << (max(len(ids[i]) for i in rows) - 1).bit_length())
            tokens = np.zeros((min(batch_size, len(order)), width), np.int32)
            for j, i in enumerate(rows):
                tokens[j, : len(ids[i])] = ids[i]
            for name, values in forward(tf.constant(tokens)).items():
                values = {key: np.asarray(v) for key, v in values.items()}
                if values["expert_indices"].shape[:2] != tokens.shape:
                    raise ValueError(
                        f"MoE layer {name!r} routed positions of shape "
                        f"{values['expert_indices'].shape[:-1]} for tokens of shape "
                        f"{tokens.shape}; route() needs one routed position per input token"
                    )
                for j, i in enumerate(rows):
                    n = len(ids[i])
                    out[name][i] = tuple(values[key][j, :n] for key in (
                        "x", "expert_indices", "gates", "clean_logits"))
    finally:
        for name, moe in named.items():
            if observers[name] in moe.routing_observers:
                moe.remove_routing_observer(observers[name])
    return out


def _layer_result(info, layer, ids, captured, vocabulary, details):
    num_experts = info["num_experts"]
    counts = np.zeros(num_experts, np.int64)
    importance = np.zeros(num_experts, np.float64)
    texts = []
    for row, (x, experts, gates, logits) in zip(ids, captured, strict=True):
        extra = _token_details(info, layer, tf.constant(x), logits, experts) if details else None
        tokens = []
        for t, token_id in enumerate(row):
            chosen = experts[t] >= 0  # batchwise inference may choose fewer than k
            e = [int(v) for v in experts[t][chosen]]
            g = [float(v) for v in gates[t][chosen]]
            counts[e] += 1
            np.add.at(importance, e, g)
            token = {"position": t, "id": token_id, "token": token_string(token_id, vocabulary),
                     "experts": e, "gates": g}
            if "experts_per_group" in info:
                token["groups"] = [v // info["experts_per_group"] for v in e]
            if extra is not None:
                token.update(extra[t])
            tokens.append(token)
        texts.append(tokens)
    pairs = int(counts.sum())
    shares = np.asarray(statistics.load_share(counts.astype(np.float64)))
    experts = []
    for i in range(num_experts):
        entry = {"expert": i, "count": int(counts[i]), "share": float(shares[i]),
                 "importance": float(importance[i])}
        if "experts_per_group" in info:
            entry["group"] = i // info["experts_per_group"]
        experts.append(entry)
    return {**info, "tokens_routed": sum(len(row) for row in ids), "pairs": pairs,
            "experts": experts, "tokens": texts}


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

