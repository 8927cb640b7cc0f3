"""The plain-text tables of a `keras-moe inspect` report (see `report.inspect_run`)."""

import numpy as np


def _shown(logits, k):
    """Which entries a text row shows: all (<= 8), else the k + 2 largest logits."""
    logits = np.asarray(logits, np.float64)
    return range(len(logits)) if len(logits) <= 8 else np.argsort(-logits)[: k + 2]


def _cells(values, index, prefix="", sign="+"):
    return " ".join(f"{prefix}{i}:{values[i]:{sign}.3g}" for i in index)


def choice_cells(token):
    cells = []
    for i, (e, g) in enumerate(zip(token["experts"], token["gates"], strict=True)):
        group = f"/g{token['groups'][i]}" if "groups" in token else ""
        cells.append(f"{e}{group} ({g:.3f})")
    return " ".join(cells) or "-"


def layer_heading(result):
    if result["type"] == "HierarchicalMoE":
        shape = (f"{result['num_groups']} groups x {result['experts_per_group']} experts, "
                 f"k={result['k_primary']}x{result['k_secondary']}")
    else:
        shape = f"{result['num_experts']} experts, k={result['k']}"
    return f"{result['name']}: {result['type']}, {result['gating']} gating, {shape}"


def summary_line(result):
    s = result["statistics"]
    return (f"tokens {result['tokens_routed']}, routed pairs {result['pairs']}; "
            f"CV load {s['cv_load']:.3f}, CV importance {s['cv_importance']:.3f}, "
            f"max/mean load {s['max_mean_load']:.3f}, experts without tokens "
            f"{int(s['zero_experts'])}, router entropy {s['router_entropy']:.3f}")


def check_lines(result):
    """The alarm on the clean routing, and the run's training routing beside it."""
    out = []
    reasons = result.get("collapse_reasons") or []
    out.append("ROUTING COLLAPSE (clean routing): " + "; ".join(reasons) if reasons else
               "clean routing: no collapse (thresholds of keras_moe.alarms.CollapseThresholds)")
    t = result.get("training")
    if t:
        values = ", ".join(f"{key.replace('_', ' ')} {t[key]:.3f}" for key in
                           ("cv_load", "max_mean_load", "zero_expert_fraction") if key in t)
        out.append(f"training routing (noisy, history.csv at step {t['step']}): {values}")
    return out


def sentence_texts(report, result):
    return result.get("sentence_texts") or report["sentences"]


def characteristic_text(entry):
    return ", ".join(f"{t['token']} x{t['ratio']:.2f} ({t['count']})" for t in entry["tokens"])


def _token_row(result, token):
    k = result["k_primary"] if result["type"] == "HierarchicalMoE" else result["k"]
    prefix = "g" if result["logits_level"] == "groups" else ""
    margin = "-" if token["margin"] is None else f"{token['margin']:.3g}"
    index = _shown(token["clean_logits"], k)
    noise = "-"
    if token["noise_std"] is not None:
        noise = _cells(token["noise_std"], index, prefix, sign="")
    return (token["position"], token["token"], choice_cells(token), margin,
            _cells(token["clean_logits"], index, prefix), noise)


def format_tables(report):
    """The plain-text tables of an `inspect_run` report."""
    out = [f"Routing of {report['model']} on {report['data']} ({report['lines']} lines)"]
    for result in report["layers"].values():
        out += ["", f"== {layer_heading(result)} ==", summary_line(result),
                *check_lines(result), ""]
        out.append(f"{'expert':>6} {'count':>8} {'share':>7} {'importance':>10}  "
                   "characteristic tokens: token xP(t|e)/P(t) (pairs)")
        for e, entry in zip(result["experts"], result["characteristic"], strict=True):
            out.append(f"{e['expert']:>6} {e['count']:>8} {e['share']:>7.1%} "
                       f"{e['importance']:>10.2f}  {characteristic_text(entry)}")
        level = "groups" if result["logits_level"] == "groups" else "experts"
        for text, tokens in zip(sentence_texts(report, result), result["sentences"],
                                strict=True):
            out += ["", f"sentence: {text}",
                    f"{'pos':>4} {'token':<14} {'experts (gate)':<28} {'margin':>7}  "
                    f"clean logits of {level} | noise std (all, or of the k + 2 best logits)"]
            for row in (_token_row(result, token) for token in tokens):
                out.append(f"{row[0]:>4} {row[1]:<14} {row[2]:<28} {row[3]:>7}  "
                           f"{row[4]} | {row[5]}")
    return "\n".join(out)
