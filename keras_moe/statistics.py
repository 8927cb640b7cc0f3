"""Routing statistics: one implementation for every place that reports them.

The layer's Keras metrics, `keras_moe.RoutingMonitor`, the routing
inspector and the pipelines' evaluation reports all describe the same
thing, the per-expert Importance (sum of gates, Eq. 6 of Shazeer et al.
2017) and token counts of a `keras_moe.Routing`, and all compute their
figures here, under one name each:

- `cv_importance`, `cv_load`: coefficient of variation `std / mean`
  (population std; 0 for an all-zero vector) of importance and of counts,
  the paper's Table 6 figures;
- `max_mean_load`: `max(counts) / mean(counts)` (0 when nothing was routed);
- `zero_experts`: experts that received no token, and
  `zero_expert_fraction`, the same divided by the number of experts;
- `load_share`: each expert's share of the routed (token, expert) pairs;
- `top_share`: the share taken by the busiest `ceil(top_fraction * E)`
  experts; `router_entropy`: entropy of the load shares over `log E`.

The functions take NumPy arrays or tensors and are written with
`keras.ops`, so the layer uses them inside its traced `call` (in float32)
and the NumPy-level helpers (`summary`, `RoutingStatistics`) in float64.
"""

import math

import numpy as np
from keras import ops

# The per-batch statistics a MoE layer logs as Keras metrics, in this order.
STATISTIC_NAMES = (
    "cv_importance",
    "cv_load",
    "max_mean_load",
    "zero_expert_fraction",
    "dropped_fraction",
)


def _safe_divide(numerator, denominator):
    """`numerator / denominator`, 0 where `denominator <= 0`."""
    positive = denominator > 0
    return ops.where(positive, numerator / ops.where(positive, denominator, 1), 0)


def coefficient_of_variation(values):
    """`std(values) / mean(values)` (population std), 0 when the mean is not positive.

    Example:

    >>> float(coefficient_of_variation(np.array([2.0, 0.0])))  # std 1, mean 1
    1.0
    """
    values = ops.convert_to_tensor(values)
    return _safe_divide(ops.std(values), ops.mean(values))


def max_mean_load(counts):
    """`max(counts) / mean(counts)`: 1 for an even load, `E` for one busy expert."""
    counts = ops.convert_to_tensor(counts)
    return _safe_divide(ops.max(counts), ops.mean(counts))


def zero_experts(counts):
    """The number of experts that received no token (as a float)."""
    counts = ops.convert_to_tensor(counts)
    return ops.sum(ops.cast(counts <= 0, counts.dtype))


def zero_expert_fraction(counts):
    """`zero_experts(counts) / E`."""
    counts = ops.convert_to_tensor(counts)
    return ops.mean(ops.cast(counts <= 0, counts.dtype))


def load_share(counts):
    """Each expert's share of the routed pairs, `counts / sum(counts)` (zeros if none)."""
    counts = ops.convert_to_tensor(counts)
    return _safe_divide(counts, ops.sum(counts))


def top_count(num_experts, top_fraction):
    """How many experts are "the busiest `top_fraction`": `ceil(f * E)`, at least 1."""
    return max(1, math.ceil(top_fraction * num_experts - 1e-9))


def top_share(counts, top_fraction=0.1):
    """Share of the routed pairs taken by the `top_count(E, top_fraction)` busiest experts."""
    counts = ops.convert_to_tensor(counts)
    top = ops.sort(counts)[counts.shape[0] - top_count(counts.shape[0], top_fraction) :]
    return _safe_divide(ops.sum(top), ops.sum(counts))


def router_entropy(counts):
    """Entropy of the load shares divided by `log E`: 1 is an even spread, 0 one expert.

    1 when `E == 1` (a single expert is as even as it gets).
    """
    counts = ops.convert_to_tensor(counts)
    num_experts = counts.shape[0]
    if num_experts <= 1:
        return ops.ones((), counts.dtype)
    p = load_share(counts)
    terms = ops.where(p > 0, p * ops.log(ops.where(p > 0, p, 1)), 0)
    return -ops.sum(terms) / math.log(num_experts)


def batch_statistics(importance, counts, dropped_fraction):
    """The figures a MoE layer logs for one batch, keyed by `STATISTIC_NAMES`.

    Args:
        importance: `[E]` float32, summed gates per expert.
        counts: `[E]` float32, tokens routed to each expert.
        dropped_fraction: scalar, share of pairs dropped by the capacity.

    Returns:
        dict of float32 scalar tensors.
    """
    importance = ops.cast(importance, "float32")
    counts = ops.cast(counts, "float32")
    return {
        "cv_importance": coefficient_of_variation(importance),
        "cv_load": coefficient_of_variation(counts),
        "max_mean_load": max_mean_load(counts),
        "zero_expert_fraction": zero_expert_fraction(counts),
        "dropped_fraction": ops.cast(dropped_fraction, "float32"),
    }


def summary(importance, counts, top_fraction=0.1):
    """Balance statistics of summed routing, as Python floats (computed in float64).

    Args:
        importance: `[E]`, summed gate values per expert.
        counts: `[E]`, tokens routed to each expert.
        top_fraction: float in (0, 1], see `top_share`.

    Returns:
        dict of floats: `cv_importance`, `cv_load`, `max_mean_load`,
        `zero_experts`, `zero_expert_fraction`, `top_share`, `router_entropy`.

    Example:

    >>> s = summary(importance=[3.0, 1.0, 0.0, 0.0], counts=[6, 2, 0, 0])
    >>> s["max_mean_load"], s["zero_experts"], s["top_share"]
    (3.0, 2.0, 0.75)
    """
    importance = np.asarray(importance, np.float64)
    counts = np.asarray(counts, np.float64)
    return {
        "cv_importance": float(coefficient_of_variation(importance)),
        "cv_load": float(coefficient_of_variation(counts)),
        "max_mean_load": float(max_mean_load(counts)),
        "zero_experts": float(zero_experts(counts)),
        "zero_expert_fraction": float(zero_expert_fraction(counts)),
        "top_share": float(top_share(counts, top_fraction)),
        "router_entropy": float(router_entropy(counts)),
    }


class RoutingStatistics:
    """Expert balance of every MoE layer over a set of batches (an evaluation set).

    Feed it each batch's `{layer name: keras_moe.Routing}` with `add` (taken
    in inference mode, Load is then the number of positions sent to each
    expert); `result()` gives, per layer:

    - `batch_cv_importance`, `batch_cv_load`, `batch_max_mean_load`: the
      statistics of each batch, averaged over the batches (the paper's
      per-batch figures);
    - `set_cv_importance`, `set_cv_load`, `set_max_mean_load`: the same of
      the importance and counts summed over the whole set;
    - `zero_experts`: experts that received no position in the whole set;
    - `set_load_share`: each expert's share of the set's routed positions;
    - `batches`: the number of batches added.

    Example:

    >>> import types
    >>> stats = RoutingStatistics()
    >>> stats.add({"moe": types.SimpleNamespace(importance=[1.0, 1.0], counts=[2, 0])})
    >>> stats.add({"moe": types.SimpleNamespace(importance=[1.0, 1.0], counts=[0, 2])})
    >>> r = stats.result()["moe"]
    >>> r["batch_max_mean_load"], r["set_max_mean_load"], r["zero_experts"]
    (2.0, 1.0, 0)
    """

    def __init__(self):
        self.stats = {}

    def add(self, routings):
        """Add one batch: `{layer name: Routing}` (or anything with `importance`, `counts`)."""
        for name, routing in (routings or {}).items():
            s = self.stats.setdefault(name, {"importance": 0.0, "counts": 0.0, "batches": []})
            importance = np.asarray(routing.importance, np.float64)
            counts = np.asarray(routing.counts, np.float64)
            s["importance"] = s["importance"] + importance
            s["counts"] = s["counts"] + counts
            s["batches"].append((
                float(coefficient_of_variation(importance)),
                float(coefficient_of_variation(counts)),
                float(max_mean_load(counts)),
            ))

    def result(self):
        """`{layer name: statistics}` (see the class docstring)."""
        out = {}
        for name, s in self.stats.items():
            batch = np.mean(s["batches"], axis=0)
            out[name] = {
                "batch_cv_importance": float(batch[0]),
                "batch_cv_load": float(batch[1]),
                "batch_max_mean_load": float(batch[2]),
                "set_cv_importance": float(coefficient_of_variation(s["importance"])),
                "set_cv_load": float(coefficient_of_variation(s["counts"])),
                "set_max_mean_load": float(max_mean_load(s["counts"])),
                "zero_experts": int(zero_experts(s["counts"])),
                "set_load_share": [float(x) for x in np.asarray(load_share(s["counts"]))],
                "batches": len(s["batches"]),
            }
        return out
