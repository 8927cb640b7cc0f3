"""`keras-moe experts heatmap`: expert x domain usage of a run, as PNG and HTML.

For every MoE layer of a run, a grid of experts (rows) by domains
(columns) whose cell is the domain's share on the expert: the expert's
routed (token, expert) pairs from that domain over all the domain's pairs
(`keras_moe.pipelines.inspection.domains.domain_usage`; each column sums
to 1). Rows are ordered by `domains.expert_order`: experts grouped by
their dominant domain, so domain-level specialisation shows as blocks
down the diagonal, and a router that spreads every domain over every
expert as a uniform grid.

Writes into `out`: `heatmap_<layer>.png` (matplotlib, the `plots` extra),
`heatmap.html` (one table per layer, cells shaded by share, with the PNG
embedded) and `heatmap.json` (the counts, shares and order). For a
translation run the domain files are source-language text and the
encoder's MoE layer is drawn (the decoder's routing depends on a
reference), as `keras-moe inspect` does.
"""

import base64
import html
import json
import os

import numpy as np

from keras_moe.pipelines.experts import runs
from keras_moe.pipelines.inspection import domains as domains_lib


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the PNG heat map needs matplotlib: pip install 'keras-moe[plots]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_png(shares, order, domain_names, path, title):
    """A labelled heat map of `shares` ([E][D]) with rows in `order`, saved to `path`."""
    plt = _pyplot()
    grid = np.asarray(shares, np.float64)[order]
    height = max(3.0, 0.18 * len(order) + 1.5)
    width = max(4.0, 0.9 * len(domain_names) + 2.5)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(domain_names)), domain_names, rotation=30, ha="right")
    step = max(1, len(order) // 40)
    axes.set_yticks(range(0, len(order), step), [str(order[i]) for i in range(0, len(order), step)])
    axes.set_xlabel("domain")
    axes.set_ylabel("expert (ordered by dominant domain)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="share of the domain's routed pairs")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _html_table(layer, usage, order):
    shares = np.asarray(usage["layers"][layer]["shares"])
    counts = np.asarray(usage["layers"][layer]["counts"])
    peak = max(float(shares.max()), 1e-12)
    head = "".join(f"<th>{html.escape(d)}</th>" for d in usage["domains"])
    rows = []
    for e in order:
        cells = []
        for d in range(shares.shape[1]):
            alpha = shares[e, d] / peak
            cells.append(
                f'<td style="background: rgba(31, 119, 180, {alpha:.3f})" '
                f'title="{int(counts[e, d])} pairs">{shares[e, d]:.3f}</td>')
        rows.append(f"<tr><th>expert {e}</th>{''.join(cells)}</tr>")
    return (f'<table class="heatmap"><thead><tr><th>expert</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def render_html(run_dir, usage, orders, images):
    """The self-contained HTML page: per layer, its table and its PNG."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>expert x domain usage</title>",
        "<style>body{font-family:sans-serif} table.heatmap{border-collapse:collapse}"
        " td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>",
        f"<h1>Expert x domain usage: {html.escape(os.fspath(run_dir))}</h1>",
        "<p>Cell: the domain's share of its routed (token, expert) pairs that went to the "
        "expert (each column sums to 1). Experts grouped by their dominant domain.</p>",
        "<p>Domains: " + ", ".join(
            f"{html.escape(n)} ({docs} documents, {tokens} tokens)" for n, docs, tokens in
            zip(usage["domains"], usage["documents"], usage["tokens"], strict=True)) + "</p>",
    ]
    for layer, order in orders.items():
        parts.append(f"<h2>{html.escape(layer)}</h2>")
        with open(images[layer], "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(f'<img alt="expert x domain heat map of {html.escape(layer)}" '
                     f'src="data:image/png;base64,{data}">')
        parts.append(_html_table(layer, usage, order))
    parts.append("</body></html>")
    return "\n".join(parts)


def heatmap(run_dir, domains, out, max_documents=100, layer=None, quiet=False):
    """Write the expert x domain heat maps of a run into `out`; returns the numbers.

    Args:
        run_dir: a language-model or translation run.
        domains: `{name: file}` or `NAME=FILE` strings (at least one).
        out: output directory (created).
        max_documents: int >= 1, documents per domain.
        layer: None (every MoE layer; a translation run's encoder layer) or one.
        quiet: bool; True prints nothing.

    Returns:
        dict with `domains`, `documents`, `tokens`, `layers` (counts,
        shares, `order`), `png` (per layer) and `html`.
    """
    domains = domains_lib.parse_domains(domains)
    _pyplot()  # fail before the routing when matplotlib is missing
    run = runs.load(run_dir)
    forward = None
    if run.kind == "translate":
        if run.model.middle_block != "moe":
            raise ValueError(f"{run_dir}: the translation model's encoder has no MoE layer")
        layer = layer or f"encoder_{run.model.middle_block}"
        forward = domains_lib.encode_source
    usage = domains_lib.domain_usage(run.model, run.vocab, domains, max_documents, layer,
                                     forward)
    os.makedirs(out, exist_ok=True)
    orders, images = {}, {}
    for name, numbers in usage["layers"].items():
        orders[name] = domains_lib.expert_order(numbers["shares"])
        numbers["order"] = orders[name]
        images[name] = draw_png(numbers["shares"], orders[name], usage["domains"],
                                os.path.join(out, f"heatmap_{name}.png"),
                                f"{name}: expert x domain usage")
    page = os.path.join(out, "heatmap.html")
    with open(page, "w", encoding="utf-8") as f:
        f.write(render_html(run_dir, usage, orders, images))
    result = {**usage, "png": images, "html": page}
    with open(os.path.join(out, "heatmap.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    if not quiet:
        print(domains_lib.format_top_domains(domains_lib.top_domains(usage)))
        print(f"heat maps: {', '.join(images.values())}; HTML: {page}")
    return result
