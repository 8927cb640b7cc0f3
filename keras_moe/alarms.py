"""The routing-collapse alarm: thresholds and the reasons a routing is called collapsed.

A router can send most tokens to a few experts while the loss looks fine
(Shazeer et al. 2017, Section 4 and Table 6). The same test is applied to
every routing the library reports on:

- `keras_moe.RoutingMonitor`, on the routing of a window of training
  batches (noisy gating, `training=True`);
- the training pipelines' validation, on the clean (inference,
  `training=False`) routing of the whole validation set at every
  evaluation, where the noise of training can no longer hide an
  imbalance; and `keras-moe lm evaluate` / `translate evaluate` /
  `inspect` on the data they are given.

A routing is collapsed when any enabled criterion of `CollapseThresholds`
holds on its `keras_moe.statistics.summary`: the fraction of experts
without a token is above `zero_expert_fraction_threshold`, max/mean load
is above `max_mean_threshold`, or the share of the routed pairs taken by
the busiest `top_fraction` of the experts is above `top_share_threshold`.
`collapse_reasons` says which, with the numbers and the thresholds.
"""

import dataclasses

from keras_moe import statistics as routing_statistics


def validate_threshold(name, value, low, high=None):
    """`value` as a float, or None (criterion off); ValueError naming `name` otherwise.

    `value` must be a number in `[low, high)` (`>= low` when `high` is None).
    """
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value < high)
    if not ok:
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(
            f"`{name}` must be None (criterion off) or a number {bound}. "
            f"Received: {name}={value!r}"
        )
    return float(value)


@dataclasses.dataclass(frozen=True)
class CollapseThresholds:
    """When a routing counts as collapsed (each criterion None: off).

    Args:
        zero_expert_fraction_threshold: float in [0, 1) or None; the
            fraction of experts without a token above which it is collapsed.
        max_mean_threshold: float >= 1 or None; max/mean load above which it
            is collapsed (a load spread over `E` experts with `k` per token
            has max/mean at most `E / k`).
        top_share_threshold: float in [0, 1) or None; the share of the
            routed pairs taken by the busiest `top_fraction` of the experts
            above which it is collapsed.
        top_fraction: float in (0, 1], the "busiest experts" of `top_share`.

    Example:

    >>> CollapseThresholds().max_mean_threshold
    3.0
    """

    zero_expert_fraction_threshold: float = 0.25
    max_mean_threshold: float = 3.0
    top_share_threshold: float = 0.5
    top_fraction: float = 0.1

    def __post_init__(self):
        for name, low, high in (("zero_expert_fraction_threshold", 0.0, 1.0),
                                ("max_mean_threshold", 1.0, None),
                                ("top_share_threshold", 0.0, 1.0)):
            object.__setattr__(self, name, validate_threshold(name, getattr(self, name),
                                                              low, high))
        f = self.top_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(
                f"`top_fraction` must be a number in (0, 1]. Received: top_fraction={f!r}"
            )
        object.__setattr__(self, "top_fraction", float(f))


DEFAULT_THRESHOLDS = CollapseThresholds()


def collapse_reasons(statistics, thresholds=DEFAULT_THRESHOLDS):
    """Why `statistics` count as a routing collapse: one sentence per criterion that holds.

    Args:
        statistics: a `keras_moe.statistics.summary` dict (at least
            `zero_experts`, `zero_expert_fraction`, `max_mean_load`,
            `top_share`), computed with `thresholds.top_fraction`.
        thresholds: a `CollapseThresholds`.

    Returns:
        list of str, empty when the routing is healthy.

    Example:

    >>> s = routing_statistics.summary([1.0, 0.0, 0.0, 0.0], [8, 0, 0, 0])
    >>> [r.split(" (")[0] for r in collapse_reasons(s)][:1]
    ['3 experts got no token']
    """
    t, s = thresholds, statistics
    reasons = []
    if t.zero_expert_fraction_threshold is not None:
        if s["zero_expert_fraction"] > t.zero_expert_fraction_threshold:
            reasons.append(
                f"{int(s['zero_experts'])} experts got no token (fraction "
                f"{s['zero_expert_fraction']:.3f} > zero_expert_fraction_threshold="
                f"{t.zero_expert_fraction_threshold})"
            )
    if t.max_mean_threshold is not None:
        if s["max_mean_load"] > t.max_mean_threshold:
            reasons.append(
                f"max/mean load {s['max_mean_load']:.3f} > max_mean_threshold="
                f"{t.max_mean_threshold}"
            )
    if t.top_share_threshold is not None:
        if s["top_share"] > t.top_share_threshold:
            reasons.append(
                f"the busiest {t.top_fraction:.0%} of experts took "
                f"{s['top_share']:.3f} of the load > top_share_threshold="
                f"{t.top_share_threshold}"
            )
    return reasons


def set_summary(layer_result, top_fraction=0.1):
    """`statistics.summary` of one layer of `RoutingStatistics.result()` (the whole set).

    Every load statistic is scale-free, so the set's load shares
    (`set_load_share`) give them exactly; `cv_importance` is the set's
    (`set_cv_importance`).

    Example:

    >>> r = {"set_load_share": [0.75, 0.25, 0.0, 0.0], "set_cv_importance": 1.2}
    >>> s = set_summary(r)
    >>> s["max_mean_load"], s["zero_experts"], s["cv_importance"]
    (3.0, 2.0, 1.2)
    """
    shares = [float(x) for x in layer_result["set_load_share"]]
    out = routing_statistics.summary(shares, shares, top_fraction)
    out["cv_importance"] = float(layer_result["set_cv_importance"])
    return out


def check_routing(routing, thresholds=DEFAULT_THRESHOLDS):
    """The collapse test of every layer of a `RoutingStatistics.result()`.

    Args:
        routing: `{layer name: RoutingStatistics.result() entry}`, e.g. the
            `routing` of an evaluation (clean, inference-mode routing).
        thresholds: a `CollapseThresholds`.

    Returns:
        `{layer name: {"statistics": set_summary(...), "reasons": [...]}}`;
        a layer that routed nothing is left out.
    """
    out = {}
    for name, result in (routing or {}).items():
        if not sum(result["set_load_share"]):
            continue
        stats = set_summary(result, thresholds.top_fraction)
        out[name] = {"statistics": stats, "reasons": collapse_reasons(stats, thresholds)}
    return out


def warning_lines(checked, where="clean (inference) routing"):
    """One line per collapsed layer of `check_routing`'s result, naming it and its numbers."""
    lines = []
    for name, entry in checked.items():
        if entry["reasons"]:
            lines.append(f"routing collapse in MoE layer {name!r} ({where}): "
                         + "; ".join(entry["reasons"]))
    return lines

