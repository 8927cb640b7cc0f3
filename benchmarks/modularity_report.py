"""Issue 27's experiment, the numbers read off it: cluster metrics, targets, the summary.

`benchmarks/modularity.py` runs the experiment; this module turns its
result into the cluster metrics of the heat map, the issue's targets as
met/missed lines, and the printed markdown summary (four tables, the
cluster metrics and the targets).

Cluster metrics. For a MoE layer, `S[e, d]` is domain `d`'s share of its
routed (token, expert) pairs that went to expert `e` (inference mode, on
its select documents: each column sums to 1; `E` experts, `D` domains).

- concentration of domain `d` at fraction `f`: the sum of the
  `n = max(1, round(f * E))` largest `S[e, d]` over `e`, the share of the
  domain's pairs that already go to the `n` experts a subset of `f` keeps.
  1.0: the domain uses only `n` experts; `n / E`: all of them evenly.
- purity: the mean, over the experts with any pair, of
  `max_d S[e, d] / sum_d S[e, d]`, the part of the expert's traffic that
  comes from its dominant domain, every domain weighted equally. 1.0:
  each expert serves one domain; `1 / D`: every expert serves all evenly.
- overlap at fraction `f`: the mean, over pairs of domains, of the Jaccard
  index of their `n` top experts. 0: disjoint blocks; 1: the same experts.

The functions take a `[E][D]` matrix of counts `C[e, d]` or of shares:
they normalise each column (`S = C / sum_e C`).

Targets (issue 27), printed as met/missed lines:
- the pooled model's full-model perplexity on the mixed text is within 2%
  of the standard model's;
- with 25% of the experts, the pooled model loses at most 3% perplexity in
  every domain, and the standard model loses 10% or more in every domain;
- the pooled model's heat map shows domain-level clusters: here, its mean
  concentration at 25% is at least `CLUSTER_MIN_CONCENTRATION` and its
  purity at least `CLUSTER_MIN_PURITY` (6 domains: uniform is 0.25 and
  0.167), both above the standard model's.
"""

import numpy as np

CLUSTER_MIN_CONCENTRATION = 0.75
CLUSTER_MIN_PURITY = 0.5
CLUSTER_FRACTION = 0.25


# --- cluster metrics --------------------------------------------------------------------------


def domain_shares(counts):
    """`S[e, d] = C[e, d] / sum_e C[e, d]` (a column of zeros stays zero)."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=0, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def top_count(fraction, num_experts):
    """`max(1, round(fraction * E))`, the experts `experts select --keep fraction` keeps."""
    return max(1, int(round(fraction * num_experts)))


def concentration(counts, fraction=CLUSTER_FRACTION):
    """Per domain, the share of its pairs on its `top_count(fraction, E)` experts.

    Example:

    >>> concentration([[3, 1], [1, 1], [0, 1], [0, 1]], 0.25)
    [0.75, 0.25]
    """
    shares = domain_shares(counts)
    n = top_count(fraction, shares.shape[0])
    top = -np.sort(-shares, axis=0)[:n]
    return [float(v) for v in top.sum(axis=0)]


def purity(counts):
    """Mean over used experts of the dominant domain's part of the expert's shares.

    Example:

    >>> purity([[2, 0], [1, 1], [0, 0]])  # S = [[2/3, 0], [1/3, 1]]
    0.875
    """
    shares = domain_shares(counts)
    row = shares.sum(axis=1)
    used = row > 0
    if not used.any():
        return 0.0
    return float(np.mean(shares[used].max(axis=1) / row[used]))


def overlap(counts, fraction=CLUSTER_FRACTION):
    """Mean Jaccard index of the domains' top-expert sets over pairs of domains."""
    shares = domain_shares(counts)
    n = top_count(fraction, shares.shape[0])
    tops = [set(np.argsort(-shares[:, d], kind="stable")[:n].tolist())
            for d in range(shares.shape[1])]
    pairs = [(a, b) for i, a in enumerate(tops) for b in tops[i + 1:]]
    if not pairs:
        return None
    return float(np.mean([len(a & b) / len(a | b) for a, b in pairs]))


def cluster_metrics(counts, domain_names, fraction=CLUSTER_FRACTION):
    """The three metrics of one layer's `[E][D]` counts (see the module docstring)."""
    per_domain = concentration(counts, fraction)
    return {
        "fraction": fraction,
        "experts_counted": top_count(fraction, len(counts)),
        "concentration": dict(zip(domain_names, per_domain, strict=True)),
        "mean_concentration": float(np.mean(per_domain)),
        "uniform_concentration": top_count(fraction, len(counts)) / len(counts),
        "purity": purity(counts),
        "uniform_purity": 1.0 / len(domain_names),
        "overlap": overlap(counts, fraction),
    }


# --- targets and the summary ------------------------------------------------------------------


def _change_at(model, fraction):
    """`{domain: relative change}` at a keep fraction (domains with an error left out)."""
    out = {}
    for domain, entry in model["domains"].items():
        kept = entry["keep"].get(f"{fraction:g}", {})
        if "change" in kept:
            out[domain] = kept["change"]
    return out


def targets(result):
    """The issue's targets as `{"target", "met" (True/False/None), "detail"}` rows."""
    std, pool = result["models"]["standard"], result["models"]["pooled"]
    rows = []
    a, b = std["inference_k"]["perplexity"], pool["inference_k"]["perplexity"]
    ratio = (b - a) / a
    rows.append({"target": "pooled full-model perplexity within 2% of the standard MoE's",
                 "met": ratio <= 0.02,
                 "detail": f"mixed text: standard {a:.2f}, pooled {b:.2f} ({100 * ratio:+.1f}%)"})
    for label, model, test, bound in (
            ("pooled model loses at most 3% per domain with 25% of the experts", pool,
             lambda c: c <= 0.03, "worst"),
            ("standard MoE loses 10% or more per domain with 25% of the experts", std,
             lambda c: c >= 0.10, "least")):
        changes = _change_at(model, 0.25)
        if not changes:
            rows.append({"target": label, "met": None, "detail": "not measured (--keep 0.25)"})
            continue
        worst = max(changes.values()) if bound == "worst" else min(changes.values())
        missing = [d for d in model["domains"] if d not in changes]
        rows.append({"target": label,
                     "met": all(test(c) for c in changes.values()) and not missing,
                     "detail": f"{bound} {100 * worst:+.1f}%; " + ", ".join(
                         f"{d} {100 * c:+.1f}%" for d, c in changes.items())
                     + (f"; no number for {', '.join(missing)}" if missing else "")})
    first = next(iter(pool["heatmap"]["layers"].values()))
    base = next(iter(std["heatmap"]["layers"].values()))
    met = (first["mean_concentration"] >= CLUSTER_MIN_CONCENTRATION
           and first["purity"] >= CLUSTER_MIN_PURITY
           and first["mean_concentration"] > base["mean_concentration"]
           and first["purity"] > base["purity"])
    rows.append({"target": "the pooled model's heat map shows domain-level clusters",
                 "met": met,
                 "detail": f"concentration@25% {first['mean_concentration']:.3f} (standard "
                 f"{base['mean_concentration']:.3f}, needs >= {CLUSTER_MIN_CONCENTRATION}), "
                 f"purity {first['purity']:.3f} (standard {base['purity']:.3f}, needs >= "
                 f"{CLUSTER_MIN_PURITY})"})
    return rows


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _ppl(value, change=None):
    if value is None:
        return "-"
    return f"{value:.2f}" if change is None else f"{value:.2f} ({100 * change:+.1f}%)"


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def summary(result):
    """The markdown summary: four tables, the cluster metrics and the targets."""
    models, keeps = result["models"], result["settings"]["keep"]
    parts = ["## Per-domain perplexity: full model and expert subsets (change vs full)"]
    header = ["domain"]
    for name in models:
        header += [f"{name} full"] + [f"{name} {100 * f:g}%" for f in keeps]
    rows = []
    for domain in result["domains"]:
        row = [domain]
        for model in models.values():
            entry = model["domains"][domain]
            row.append(_ppl(entry["full"]["perplexity"]))
            for f in keeps:
                kept = entry["keep"].get(f"{f:g}", {})
                row.append(_ppl(kept.get("perplexity"), kept.get("change"))
                           if "perplexity" in kept else "error")
        rows.append(row)
    parts.append(_table(header, rows))
    parts.append("## Inference-time k' (mixed text)")
    rows = []
    for name, model in models.items():
        for r in model["inference_k"]["rows"]:
            trained = " (trained)" if r["k"] == model["inference_k"]["trained_k"] else ""
            rows.append([name, f"{r['k']}{trained}", _ppl(r.get("perplexity"), r.get("change"))
                         if "perplexity" in r else "error",
                         f"{r['tokens_per_second']:,.0f}" if "perplexity" in r else "-"])
    parts.append(_table(["model", "k'", "perplexity (change vs trained k)", "tokens/s"], rows))
    parts.append("## Pruning and merging (usage from all select documents; mixed text)")
    rows = []
    for name, model in models.items():
        for r in model.get("surgery", {}).get("rows", []):
            what = f"{r['command']} {r['value']:g}"
            if "error" in r:
                rows.append([name, what, "error", "-", "-"])
                continue
            experts = (f"{sum(r['experts_before'].values())} -> "
                       f"{sum(r['experts_after'].values())}")
            rows.append([name, what, _ppl(r["before"]), _ppl(r["after"], r["change"]), experts])
    parts.append(_table(["model", "operation", "before", "after (change)", "experts"], rows))
    parts.append(f"## File sizes (RSS at load: {result['settings']['rss_domain'] or 'none'})")
    rows = []
    for name, model in models.items():
        full = model["sizes"]
        rows.append([name, "full (run's file, with optimizer slots)", _mib(full["file_bytes"]),
                     _mib(full["weight_bytes"]), _mib(full.get("rss_bytes"))])
        rows.append([name, "full, weights only", _mib(full["file_bytes_weights_only"]),
                     _mib(full["weight_bytes"]), "-"])
        for f in keeps:
            sizes = [e["keep"].get(f"{f:g}", {}) for e in model["domains"].values()]
            sizes = [s for s in sizes if "file_bytes" in s]
            if not sizes:
                continue
            rss = next((s["rss_bytes"] for s in sizes if "rss_bytes" in s), None)
            experts = sum(sizes[0]["experts"].values())
            rows.append([name, f"keep {100 * f:g}% ({experts} experts)",
                         _mib(max(s["file_bytes"] for s in sizes)),
                         _mib(max(s["weight_bytes"] for s in sizes)), _mib(rss)])
    parts.append(_table(["model", "file", "model.keras", "weights in memory", "RSS at load"],
                        rows))
    parts.append("## Domain clusters (usage shares on the select documents)")
    rows = []
    for name, model in models.items():
        for layer, m in model["heatmap"]["layers"].items():
            rows.append([name, layer, f"{m['mean_concentration']:.3f} "
                         f"(uniform {m['uniform_concentration']:.3f})",
                         f"{m['purity']:.3f} (uniform {m['uniform_purity']:.3f})",
                         "-" if m["overlap"] is None else f"{m['overlap']:.3f}",
                         ", ".join(f"{d} {v:.2f}" for d, v in m["concentration"].items())])
    parts.append(_table(["model", "layer", "concentration@25%", "purity", "top-25% overlap",
                         "per domain"], rows))
    parts.append("## Targets")
    states = {True: "met", False: "missed", None: "not measured"}
    parts.append("\n".join(f"- {states[t['met']]}: {t['target']} ({t['detail']})"
                           for t in result["targets"]))
    seconds = result.get("seconds", {}).get("total")
    if seconds is not None:
        parts.append(f"Run time {seconds / 60:.1f} min; {result.get('note', '')}.")
    return "\n\n".join(parts)
