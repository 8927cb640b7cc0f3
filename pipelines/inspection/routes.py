"""Routing inspector: which experts each token chose, and why.

`route(model, texts)` runs any Keras model that contains `keras_moe.MoE` or
`keras_moe.HierarchicalMoE` layers (functional or subclassed, nested or
not) on a few texts in inference mode and returns, per MoE layer, plain
Python data (JSON-serialisable): each expert's share of the traffic and,
per token, the chosen experts with their gate values, the clean logits
`x W_g`, the noise scale `softplus(x W_noise) + noise_epsilon` the gate
would add in training, and the margin that decided the last chosen expert.
`characteristic_tokens` and `expert_contexts` (`inspection.experts`,
importable from here) summarise the per-token data per expert, in the
spirit of the paper's Table 9 (Shazeer et al. 2017).

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
from keras_moe.pipelines.inspection.experts import (  # noqa: F401 (re-exported)
    characteristic_tokens,
    expert_contexts,
    gate_matrix,
    pair_counts,
)

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

    def forward(tokens, context=None):
        for calls in records.values():
            calls.clear()
        if context is None:
            run(model, tokens)
        else:
            run(model, tokens, context)
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
          forward=None, context=None):
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
        context: None, or one token-id list per text (ids >= 1), padded
            with 0 like the texts and passed to `forward` as a third
            argument, `forward(model, tokens, context)`: e.g. each target
            text's source sentence, for a translation model's decoder MoE.

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
    if context is not None:
        if forward is None:
            raise ValueError("`context` needs a `forward` that takes it: "
                             "forward(model, tokens, context)")
        context = _token_ids(list(context), vocabulary)
        if len(context) != len(ids):
            raise ValueError(f"`context` must hold one entry per text ({len(ids)}). "
                             f"Received: {len(context)} entries")
    captured = _capture(model, named, ids, batch_size, forward or _default_forward, context)
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


def _padded(rows, count):
    """`rows` as int32 `[count, width]`, zero-padded; width a power of two >= MIN_WIDTH."""
    width = max(MIN_WIDTH, 1 << (max(len(row) for row in rows) - 1).bit_length())
    out = np.zeros((count, width), np.int32)
    for j, row in enumerate(rows):
        out[j, : len(row)] = row
    return out


def _capture(model, named, ids, batch_size, run, context=None):
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
            count = min(batch_size, len(order))
            tokens = _padded([ids[i] for i in rows], count)
            extra = () if context is None else (
                tf.constant(_padded([context[i] for i in rows], count)),)
            for name, values in forward(tf.constant(tokens), *extra).items():
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
