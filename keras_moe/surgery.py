"""Expert surgery: keep a subset of an MoE's experts, or regroup them (pruning: `pruning`, merging: `merging`).

A trained `keras_moe.MoE` holds every expert in stacked variables; the
functions here build a *new* layer (or a whole new model) of the same class
with fewer experts, through the public `get_config` / `from_config` (with
`num_experts` changed) and `set_weights` of the sliced values. Each kept or
merged expert takes, along its expert axis, its slice of every per-expert
variable:

- the experts' `w_in [E, d, h]`, `b_in [E, h]`, `w_out [E, h, o]`,
  `b_out [E, o]` (and `w_hidden`, `b_hidden` of deep experts): axis 0;
- the gate's `W_g [d, E]`, the noisy gate's `W_noise [d, E]` and the
  batchwise gate's `thresholds [E]`: the last axis.

Since the new gate has only the kept columns, routing is restricted to the
kept experts: a token's top-k is taken among them (Shazeer et al. 2017,
Eq. 3-5 with `E` the kept experts); the rest of the model is copied as is.

- `subset_layer(layer, keep)` / `subset_model(model, keep)`: keep the
  listed experts, in the listed order;
- `regroup_layer` / `regroup_model`: each new expert made of a group of
  old ones, what `keras_moe.merging` builds its merged experts with.

`keras_moe.pruning` drops the experts used under a threshold (a subset
chosen by usage) and records what the layers saw (`record_routing`).

A model-level function rebuilds any Keras model whose `get_config` spells
`num_experts` (the language and translation models, functional models of
`MoE` layers), and needs every MoE layer to end with the same number of
experts, since such models hold one `num_experts`. `HierarchicalMoE`
(a grid of `num_groups * experts_per_group` experts that a subset would
not keep) is refused with a clear error.

Example:

>>> layer = MoE(num_experts=8, expert_hidden_dim=4, k=2)
>>> layer.build((None, 6))
>>> small = subset_layer(layer, [1, 5, 6])
>>> small.num_experts, tuple(small.gating.w_gate.shape)
(3, (6, 3))
"""

import numpy as np

from keras_moe.hierarchical import HierarchicalMoE
from keras_moe.moe import MoE
from keras_moe.monitoring import find_moe_layers

MERGE_MODES = ("average", "busier")
GATE_MODES = ("busier", "mean")


# --- which variables hold experts ---------------------------------------------


def check_flat(layer):
    """ValueError unless `layer` is a built flat `keras_moe.MoE` (not hierarchical)."""
    if isinstance(layer, HierarchicalMoE):
        raise ValueError(
            f"expert surgery supports flat keras_moe.MoE layers; layer {layer.name!r} is a "
            "HierarchicalMoE, whose num_groups x experts_per_group grid a subset would not keep"
        )
    if not isinstance(layer, MoE):
        raise ValueError(
            f"`layer` must be a keras_moe.MoE. Received: layer={type(layer).__name__}"
        )
    if not layer.built:
        raise ValueError(f"MoE layer {layer.name!r} is not built: call it or `build` it first")


def per_expert_variables(layer):
    """`{id(variable): (axis, role)}` of every per-expert variable of a flat `MoE`.

    `role` is `"expert"` (the feed-forward experts' weights, expert axis 0)
    or `"gate"` (gating weights, expert axis last: `W_g`, `W_noise`,
    batchwise `thresholds`).

    Raises:
        ValueError: for a `HierarchicalMoE`, an unbuilt layer, or a variable
            of the layer outside its experts and gate whose shape mentions
            `num_experts` (it would not be known how to slice it).
    """
    check_flat(layer)
    table = {}
    for variable in layer.experts.weights:
        table[id(variable)] = (0, "expert")
    for variable in layer.gating.weights:
        table[id(variable)] = (len(variable.shape) - 1, "gate")
    for variable in layer.weights:
        if id(variable) not in table and layer.num_experts in tuple(variable.shape):
            raise ValueError(
                f"variable {variable.path!r} of layer {layer.name!r} has shape "
                f"{tuple(variable.shape)}, which mentions num_experts={layer.num_experts}, "
                "but is neither an expert's nor the gate's; expert surgery cannot slice it"
            )
    return table


# --- the new experts, from groups of old ones ------------------------------------


def _check_keep(keep, num_experts, name="keep"):
    keep = list(np.asarray(keep).reshape(-1)) if not isinstance(keep, (list, tuple)) else keep
    if not keep:
        raise ValueError(f"`{name}` must list at least one expert. Received: {name}=[]")
    out = []
    for index in keep:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"`{name}` must hold integers. Received: {name}={list(keep)!r}")
        if not 0 <= int(index) < num_experts:
            raise ValueError(
                f"`{name}` must hold expert indices in [0, {num_experts}). "
                f"Received: {name}={list(keep)!r}"
            )
        out.append(int(index))
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}` must not repeat an expert. Received: {name}={out!r}")
    return out


def _combine(value, axis, role, groups, counts, mode, gate):
    """The new variable: one slice per group of old experts along `axis`."""
    parts = []
    for group in groups:
        if len(group) == 1:
            parts.append(np.take(value, group[0], axis=axis))
            continue
        rule = mode if role == "expert" else gate
        if rule in ("average", "mean"):
            parts.append(np.mean(np.take(value, group, axis=axis), axis=axis))
        else:
            parts.append(np.take(value, _busiest(group, counts), axis=axis))
    return np.stack(parts, axis=axis)


def _busiest(group, counts):
    """The member with the most routed pairs (the first listed on a tie)."""
    if counts is None:
        return group[0]
    return max(group, key=lambda e: (counts[e], -group.index(e)))


def _new_values(layer, groups, counts=None, mode="busier", gate="busier"):
    """`{id(variable): new value}` for the per-expert variables of `layer`."""
    table = per_expert_variables(layer)
    return {
        id(v): _combine(v.numpy(), *table[id(v)], groups, counts, mode, gate)
        for v in layer.weights if id(v) in table
    }


def _check_k(config, n, where):
    """`config` (a dict holding `num_experts`) with `num_experts = n` and a valid `k`."""
    config = clamp_pools(dict(config, num_experts=n), n)
    if config.get("gating") == "softmax":
        config["k"] = n  # a dense mixture uses every expert it has
    elif "k" in config and config["k"] is not None and config["k"] > n:
        raise ValueError(
            f"{where} routes each token to k={config['k']} experts but only {n} are kept; "
            f"keep at least {config['k']} experts"
        )
    return config


def clamp_pools(config, n):
    """`config` (a layer's or a model's) with its document pools fitted to `n` experts.

    A pool cannot hold more experts than there are: `pool_size` becomes
    `min(pool_size, n)` and `pool_size_range = (low, high)` becomes
    `(min(low, n), min(high, n))`. Routing is unchanged by it wherever the
    old pools already held every kept expert (a pool of all `n` experts
    is no constraint). A range stays a list or a tuple as given.

    Example:

    >>> clamp_pools({"pool_size": 32, "pool_size_range": [8, 32]}, 16)
    {'pool_size': 16, 'pool_size_range': [8, 16]}
    >>> clamp_pools({"pool_size": 32, "pool_size_range": (8, 32)}, 4)
    {'pool_size': 4, 'pool_size_range': (4, 4)}
    """
    config = dict(config)
    if isinstance(config.get("pool_size"), int):
        config["pool_size"] = min(config["pool_size"], n)
    span = config.get("pool_size_range")
    if isinstance(span, (list, tuple)) and len(span) == 2:
        config["pool_size_range"] = type(span)(min(int(v), n) for v in span)
    return config


def regroup_layer(layer, groups, counts=None, mode="busier", gate="busier"):
    """A new `MoE` whose expert `i` is made of the old experts `groups[i]`.

    A group of one expert takes that expert's slices; a larger group is
    combined as `keras_moe.merging.merge_layer` documents (`mode` for the
    feed-forward weights, `gate` for the gate columns, `counts` to find the
    busier member).
    """
    values = _new_values(layer, groups, counts, mode, gate)
    config = _check_k(layer.get_config(), len(groups), f"MoE layer {layer.name!r}")
    new = type(layer).from_config(config)
    new.build((None, layer.experts.w_in.shape[1]))
    new.set_weights([values.get(id(v), v.numpy()) for v in layer.weights])
    return new


def subset_layer(layer, keep):
    """A new `MoE` holding only the experts `keep` of a built `MoE`, in that order.

    New expert `i` is old expert `keep[i]`: its feed-forward weights and its
    gate columns (`W_g`, `W_noise`, thresholds) are the old ones, so a
    token's clean logits over the kept experts are unchanged and its top-k
    is taken among them: where the full layer already routed a token inside
    `keep` only, both layers give the same output.

    Args:
        layer: a built `keras_moe.MoE`.
        keep: list of distinct expert indices.

    Returns:
        A built `keras_moe.MoE` (same class and configuration, `num_experts =
        len(keep)`).

    Raises:
        ValueError: naming `keep` when it is empty, repeats or leaves the
            range; naming `k` when more than `len(keep)`; for a
            `HierarchicalMoE`.

    Example:

    >>> layer = MoE(num_experts=4, expert_hidden_dim=3, k=1)
    >>> layer.build((None, 2))
    >>> subset_layer(layer, [3, 0]).experts.w_in.shape
    TensorShape([2, 2, 3])
    """
    check_flat(layer)
    keep = _check_keep(keep, layer.num_experts)
    return regroup_layer(layer, [[e] for e in keep])


# --- whole models -----------------------------------------------------------------


def moe_layers(model):
    """The flat `MoE` layers of `model` (ValueError when none, or one is hierarchical)."""
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no MoE layer")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"model {model.name!r} has MoE layers of the same name: {names}")
    for layer in layers:
        check_flat(layer)
    return layers


def _with_experts(config, n, path="config"):
    """A copy of a (nested) config with every `num_experts` set to `n`."""
    if isinstance(config, dict):
        out = {key: _with_experts(value, n, f"{path}.{key}") for key, value in config.items()}
        if "num_experts" in out:
            if out.get("num_groups"):
                raise ValueError(
                    f"{path} has num_groups={out['num_groups']} (hierarchical MoE): expert "
                    "surgery supports flat MoE layers only"
                )
            out = _check_k(out, n, f"the model ({path})")
        return out
    if isinstance(config, list):
        return [_with_experts(value, n, f"{path}[{i}]") for i, value in enumerate(config)]
    return config


def regroup_model(model, plans, counts=None, mode="busier", gate="busier"):
    """`model` rebuilt with each MoE layer's experts replaced by `plans[name]` groups.

    `regroup_layer` for every MoE layer at once; `counts` is `{layer name:
    [E]}` or None. Every plan must have the same number of groups.
    """
    sizes = {len(groups) for groups in plans.values()}
    if len(sizes) != 1:
        raise ValueError(
            "every MoE layer of a model must keep the same number of experts (the model has "
            f"one num_experts). Received: {({name: len(g) for name, g in plans.items()})}"
        )
    n = sizes.pop()
    values = {}
    for layer in moe_layers(model):
        layer_counts = None if counts is None else counts.get(layer.name)
        values.update(_new_values(layer, plans[layer.name], layer_counts, mode, gate))
    new = type(model).from_config(_with_experts(model.get_config(), n))
    if not new.built:
        raise ValueError(f"model {model.name!r} is not built by from_config; cannot copy weights")
    old_weights, new_weights = model.weights, new.weights
    if [w.path for w in old_weights] != [w.path for w in new_weights]:
        raise ValueError(f"model {model.name!r} rebuilt with other weights; cannot copy them")
    out = []
    for old, fresh in zip(old_weights, new_weights, strict=True):
        value = values.get(id(old))
        value = old.numpy() if value is None else value
        if tuple(value.shape) != tuple(fresh.shape):
            raise ValueError(
                f"weight {old.path!r}: computed shape {value.shape}, the rebuilt model has "
                f"{tuple(fresh.shape)}"
            )
        out.append(value)
    new.set_weights(out)
    return new


def subset_model(model, keep):
    """A copy of `model` whose MoE layers hold only the experts `keep`.

    Rebuilt with `type(model).from_config` of its config with `num_experts
    = n` (so `LanguageModel`, `TranslationModel` and functional models of
    `MoE` layers all work), then `set_weights` of the sliced values; every
    other weight is copied.

    Args:
        model: a built Keras model with flat `MoE` layers.
        keep: a list of expert indices kept in every MoE layer, or
            `{layer name: list}` naming every MoE layer (all of length `n`).

    Returns:
        The new model (uncompiled).

    Raises:
        ValueError: naming the layer or `k` at fault (a `k` above `n`,
            lists of different lengths, unknown or missing layer names,
            hierarchical layers).
    """
    layers = moe_layers(model)
    if isinstance(keep, dict):
        unknown = set(keep) - {layer.name for layer in layers}
        missing = [layer.name for layer in layers if layer.name not in keep]
        if unknown or missing:
            raise ValueError(
                f"`keep` must name every MoE layer of model {model.name!r} "
                f"({', '.join(layer.name for layer in layers)}). Received: {sorted(keep)}"
            )
        plans = {layer.name: _check_keep(keep[layer.name], layer.num_experts,
                                         f"keep[{layer.name!r}]") for layer in layers}
    else:
        plans = {layer.name: _check_keep(keep, layer.num_experts) for layer in layers}
    return regroup_model(model, {name: [[e] for e in kept] for name, kept in plans.items()})


def weight_bytes(model):
    """Bytes of all weights of `model` (what its weights take in memory)."""
    return int(sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights))


__all__ = [
    "clamp_pools",
    "per_expert_variables",
    "regroup_layer",
    "regroup_model",
    "subset_layer",
    "subset_model",
    "weight_bytes",
]
