"""The self-contained HTML page of a `keras-moe inspect` report (see `report.inspect_run`).

Inline CSS, PNG images as `data:` URIs (no network access needed): an
expert-load bar chart per layer and a token x expert gate heatmap per
sentence.
"""

import base64
import html

import numpy as np
import tensorflow as tf

from keras_moe.monitoring import bar_chart
from keras_moe.pipelines.inspection import experts as expert_tables
from keras_moe.pipelines.inspection.tables import (
    characteristic_text,
    check_lines,
    choice_cells,
    layer_heading,
    sentence_texts,
    summary_line,
)

HEAT_COLOR = (8, 48, 107)  # colour of gate 1; gate 0 is white


def png_data_uri(image):
    """A uint8 `[H, W, 3]` image as a `data:image/png;base64,...` URI."""
    png = tf.io.encode_png(tf.constant(np.asarray(image, np.uint8))).numpy()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def gate_heatmap(gates, cell=12):
    """Token x expert gates as an image: row `t`, column `e`, white (0) to dark blue (1).

    Args:
        gates: float `[tokens, experts]` in [0, 1].
        cell: int >= 1, pixels per cell side.

    Returns:
        uint8 `[tokens * cell, experts * cell, 3]`.

    Example:

    >>> image = gate_heatmap([[0.0, 1.0]], cell=2)
    >>> image.shape, image[0, 0].tolist(), image[0, 3].tolist()
    ((2, 4, 3), [255, 255, 255], [8, 48, 107])
    """
    gates = np.clip(np.asarray(gates, np.float64), 0.0, 1.0)[..., None]
    white = np.full(3, 255.0)
    colours = np.round(white + gates * (np.array(HEAT_COLOR) - white)).astype(np.uint8)
    return np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)


def heatmap_cell(num_experts):
    """Pixels per heatmap cell: 20 for few experts, down to 2 (the image is <= ~640 wide)."""
    return max(2, min(20, 640 // num_experts))


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: monospace; }
img { image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.9em; color: #555; }
"""

# Records whether every image decoded and whether any script or resource
# error happened, on the <body>: a headless browser's DOM dump shows it.
CHECK_SCRIPT = """
(function () {
  var errors = 0;
  window.addEventListener("error", function () { errors += 1; }, true);
  window.addEventListener("load", function () {
    var images = document.images, ok = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) { ok += 1; }
    }
    document.body.setAttribute("data-images-total", String(images.length));
    document.body.setAttribute("data-images-ok", String(ok));
    document.body.setAttribute("data-errors", String(errors));
  });
})();
"""


def _e(value):
    return html.escape(str(value))


def _table(header, rows, numeric=()):
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
            for i, v in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(image, alt, caption):
    return (f'<figure><img src="{png_data_uri(image)}" alt="{_e(alt)}" '
            f'width="{image.shape[1]}" height="{image.shape[0]}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _numbers(values, sign="+"):
    return " ".join(f"{i}:{v:{sign}.3g}" for i, v in enumerate(values))


def _layer_html(report, result):
    name = result["name"]
    parts = [f'<section class="layer" id="layer-{_e(name)}"><h2>{_e(layer_heading(result))}</h2>',
             f"<p>{_e(summary_line(result))}</p>",
             *(f"<p>{_e(line)}</p>" for line in check_lines(result))]
    counts = [e["count"] for e in result["experts"]]
    parts.append(_figure(
        bar_chart(counts, height=96, max_columns=512), f"expert load of {name}",
        f"Tokens routed to each expert, expert 0 leftmost ({len(counts)} experts); "
        "red line: the mean.",
    ))
    grouped = "group" in result["experts"][0]
    rows = []
    for e, entry, contexts in zip(result["experts"], result["characteristic"],
                                  result["contexts"], strict=True):
        rows.append([e["expert"], *([e["group"]] if grouped else []), e["count"],
                     f"{e['share']:.1%}", f"{e['importance']:.2f}",
                     characteristic_text(entry) or "-",
                     " | ".join(f"{c['context']} ({c['gate']:.2f})" for c in contexts) or "-"])
    header = ["expert", *(["group"] if grouped else []), "count", "share", "importance",
              "characteristic tokens: token xP(t|e)/P(t) (pairs)", "largest gates in context"]
    parts.append(f"<h3>Experts</h3>{_table(header, rows, numeric=range(5 if grouped else 4))}")
    level = "group" if result["logits_level"] == "groups" else "expert"
    for i, (text, tokens) in enumerate(zip(sentence_texts(report, result),
                                           result["sentences"], strict=True)):
        parts.append(f'<h3 class="sentence">Sentence {i + 1}: {_e(text)}</h3>')
        gates = expert_tables.gate_matrix(result | {"tokens": result["sentences"]}, i)
        cell = heatmap_cell(result["num_experts"])
        parts.append(_figure(
            gate_heatmap(gates, cell), f"gates of sentence {i + 1} in {name}",
            f"Gates: one row per token (top to bottom: {' '.join(t['token'] for t in tokens)}), "
            "one column per expert (expert 0 leftmost); white 0, dark blue 1.",
        ))
        rows = []
        for token in tokens:
            secondary = "; ".join(
                f"g{s['group']}: logits {_numbers(s['clean_logits'])}"
                + ("" if s["margin"] is None else f", margin {s['margin']:.3g}")
                for s in token.get("secondary", [])
            )
            rows.append([
                token["position"], token["token"], choice_cells(token),
                "-" if token["margin"] is None else f"{token['margin']:.3g}",
                _numbers(token["clean_logits"]),
                "-" if token["noise_std"] is None else _numbers(token["noise_std"], ""),
                *([secondary] if "secondary" in token else []),
            ])
        header = ["pos", "token", "experts (gate)", "margin", f"clean logits per {level}",
                  f"noise std per {level}"]
        if tokens and "secondary" in tokens[0]:
            header.append("within the chosen groups")
        parts.append(_table(header, rows, numeric=(0, 3)))
    parts.append("</section>")
    return "".join(parts)


def render_html(report):
    """The self-contained HTML page of an `inspect_run` report."""
    any_layer = next(iter(report["layers"].values()))
    margin_rule = (
        f"margin: the k-th largest minus the (k+1)-th largest clean logit "
        f"({'of the groups' if any_layer['logits_level'] == 'groups' else 'of the experts'}), "
        "i.e. how far the last chosen one is ahead of the first one left out. Noise std: "
        "softplus(x W_noise) + noise_epsilon, the scale of the noise the gate adds in "
        "training (inference adds none)."
    )
    sections = "".join(_layer_html(report, r) for r in report["layers"].values())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>keras-moe routing report</title>
<script>{CHECK_SCRIPT}</script>
<style>{STYLE}</style></head>
<body>
<h1>Routing report</h1>
<p>Model <code>{_e(report['model'])}</code>, data <code>{_e(report['data'])}</code>:
{report['lines']} lines routed in inference mode (no noise), each line on its own.</p>
<p>{_e(margin_rule)}</p>
{sections}
</body></html>
"""
