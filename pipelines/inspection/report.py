"""Routing inspector for a trained run: the library behind `keras-moe inspect`.

`inspect_run(run_dir, data)` routes the first lines of a corpus through a
run's model (`keras_moe.pipelines.inspection.routes.route`, inference mode) and reports, for
every MoE layer: each expert's share of the traffic and its characteristic
tokens and contexts (in the spirit of Table 9 of Shazeer et al. 2017), and
for a few sentences, each token's chosen experts with their gates, the
clean logits, the noise scale and the margin that decided the last chosen
expert. The report is printed as plain-text tables and written as one
self-contained HTML file (inline CSS, PNG images as `data:` URIs, no
network access needed) with an expert-load bar chart per layer and a
token x expert gate heatmap per sentence.

Each line is routed on its own: a recurrent model starts it from a fresh
state, as for the first line of a corpus.

Translation runs (`keras-moe translate train`) are inspected on
source-language text through the encoder alone (`TranslationModel.encode`),
so the report covers the encoder's MoE layer. The decoder's MoE routes
target positions whose states depend on the source sentence through the
attention, so it has no per-line view here; its load is in TensorBoard
(`RoutingMonitor`) and in `results.json` (`routing_valid`).
"""

import base64
import html
import os

import numpy as np
import tensorflow as tf

from keras_moe import statistics
from keras_moe.monitoring import bar_chart
from keras_moe.pipelines.data import lm_corpora
from keras_moe.pipelines.inspection import routes as routing_inspect
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.translate import train as translate_train
from keras_moe.validation import check_int

HEAT_COLOR = (8, 48, 107)  # colour of gate 1; gate 0 is white
EXAMPLE_LINES = 3  # sentences shown when none is given


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


def read_lines(data, format="text", max_lines=2000):
    """The first `max_lines` non-empty lines of a corpus (file, glob or directory)."""
    lines = []
    for line in lm_corpora.iter_lines(data, format=format, split="test"):
        if line.strip():
            lines.append(line)
            if len(lines) >= max_lines:
                break
    if not lines:
        raise ValueError(f"{data}: no non-empty line to route")
    return lines


def inspect_run(run_dir, data, sentences=(), layer=None, out=None, max_lines=2000, top=10,
                min_count=2, quiet=False, domains=()):
    """Report how a run's MoE layers route a corpus and a few sentences.

    Args:
        run_dir: a directory written by `keras_moe.pipelines.lm.train.train`
            or `keras_moe.pipelines.translate.train.train` (then `data` is
            source-language text and the encoder's MoE layer is reported).
        data: the corpus (file, glob or directory, in the run's format);
            its first `max_lines` non-empty lines are routed.
        sentences: texts whose tokens are reported one by one; when empty,
            the first three lines of `data`.
        layer: None (every MoE layer) or the name of one.
        out: path of the HTML report; None means `<run_dir>/inspect.html`.
        max_lines: int >= 1.
        top: characteristic tokens shown per expert.
        min_count: pairs a token needs on an expert to be characteristic.
        quiet: bool; True does not print the plain-text tables to stdout.
        domains: `{name: file}` or `NAME=FILE` strings: adds `domains`, each
            expert's top domains (`keras_moe.pipelines.inspection.domains`).

    Returns:
        dict with `run_dir`, `model`, `data`, `lines`, `sentences`,
        `layers` (per layer: the `route` result of the corpus without its
        per-token list, plus `statistics`, `characteristic`, `contexts`,
        `sentences`: the per-token results of the sentences), `tables`
        (the printed text) and `report` (the HTML path).

    Raises:
        FileNotFoundError, ValueError: naming the run, file, or layer at fault.
    """
    check_int("max_lines", max_lines)
    if is_translation_run(run_dir):
        _, vocab, model, model_path = translate_train.load_run(run_dir, average=0)
        lines = read_lines(data, "text", max_lines)
        encoder_layers = [f"encoder_{model.middle_block}"] if model.middle_block == "moe" else []
        if layer is not None and layer not in encoder_layers:
            raise ValueError(
                f"`layer` must be an encoder MoE layer of this translation model "
                f"({', '.join(encoder_layers) or 'it has none'}); the decoder's routing depends "
                f"on the source sentence and is not inspected line by line. Received: "
                f"layer={layer!r}"
            )
        report = build_report(model, vocab, lines, sentences, layer or encoder_layers[0], top,
                              min_count, forward=_encode)
    else:
        config, vocab, model, model_path = lm_train.load_run(run_dir)
        lines = read_lines(data, config.data.format, max_lines)
        report = build_report(model, vocab, lines, sentences, layer, top, min_count)
    report = {"run_dir": os.fspath(run_dir), "model": model_path, "data": os.fspath(data),
              **report}
    report["tables"] = format_tables(report)
    if domains:
        from keras_moe.pipelines.inspection.domains import inspect_domains

        forward = _encode if is_translation_run(run_dir) else None
        report["domains"] = inspect_domains(model, vocab, domains, list(report["layers"])[0]
                                            if forward else layer, forward)
        report["tables"] += "\n\n" + report["domains"]["table"]
    out = os.fspath(out) if out is not None else RunDir(run_dir).inspect_report
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render_html(report))
    report["report"] = out
    if not quiet:
        print(report["tables"])
        print(f"HTML report: {out}")
    return report


def is_translation_run(run_dir):
    """Whether `run_dir` was written by `translate_train.train` (its config has `decode`)."""
    import yaml

    path = RunDir(run_dir).config_file
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return isinstance(data, dict) and "decode" in data


def _encode(model, tokens):
    """A translation model's encoder alone: its MoE layer routes the source tokens."""
    return model.encode(tokens, training=False)["memory"]


def build_report(model, vocabulary, lines, sentences=(), layer=None, top=10, min_count=2,
                 forward=None):
    """The numbers of an `inspect_run` report for any model and vocabulary.

    Returns:
        dict with `lines` (how many were routed), `sentences` and `layers`
        (see `inspect_run`).
    """
    if isinstance(sentences, str):
        raise ValueError(f"`sentences` must be a list of strings. Received: {sentences!r:.80}")
    sentences = list(sentences) or lines[:EXAMPLE_LINES]
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError(f"`sentences[{i}]` must be a non-empty string. Received: {sentence!r}")
    corpus = routing_inspect.route(model, lines, vocabulary, layer=layer, details=False,
                                   forward=forward)
    shown = routing_inspect.route(model, sentences, vocabulary, layer=layer, forward=forward)
    layers = {}
    for name, result in corpus["layers"].items():
        counts = [e["count"] for e in result["experts"]]
        importance = [e["importance"] for e in result["experts"]]
        summary = {key: value for key, value in result.items() if key != "tokens"}
        layers[name] = {
            **summary,
            "statistics": statistics.summary(importance, counts),
            "characteristic": routing_inspect.characteristic_tokens(result, top, min_count),
            "contexts": routing_inspect.expert_contexts(result),
            "sentences": shown["layers"][name]["tokens"],
        }
    return {"lines": len(lines), "sentences": shown["texts"], "layers": layers}


# --- plain text --------------------------------------------------------------


def _shown(logits, k):
    """Which entries a text row shows: all (<= 8), else the k + 2 largest logits."""
    logits = np.asarray(logits, np.float64)
    return range(len(logits)) if len(logits) <= 8 else np.argsort(-logits)[: k + 2]


def _cells(values, index, prefix="", sign="+"):
    return " ".join(f"{prefix}{i}:{values[i]:{sign}.3g}" for i in index)


def _choice_cells(token):
    cells = []
    for i, (e, g) in enumerate(zip(token["experts"], token["gates"], strict=True)):
        group = f"/g{token['groups'][i]}" if "groups" in token else ""
        cells.append(f"{e}{group} ({g:.3f})")
    return " ".join(cells) or "-"


def _layer_heading(result):
    if result["type"] == "HierarchicalMoE":
        shape = (f"{result['num_groups']} groups x {result['experts_per_group']} experts, "
                 f"k={result['k_primary']}x{result['k_secondary']}")
    else:
        shape = f"{result['num_experts']} experts, k={result['k']}"
    return f"{result['name']}: {result['type']}, {result['gating']} gating, {shape}"


def _summary_line(result):
    s = result["statistics"]
    return (f"tokens {result['tokens_routed']}, routed pairs {result['pairs']}; "
            f"CV load {s['cv_load']:.3f}, CV importance {s['cv_importance']:.3f}, "
            f"max/mean load {s['max_mean_load']:.3f}, experts without tokens "
            f"{int(s['zero_experts'])}, router entropy {s['router_entropy']:.3f}")


def _characteristic_text(entry):
    return ", ".join(f"{t['token']} x{t['ratio']:.2f} ({t['count']})" for t in entry["tokens"])


def _token_row(result, token):
    k = result["k_primary"] if result["type"] == "HierarchicalMoE" else result["k"]
    prefix = "g" if result["logits_level"] == "groups" else ""
    margin = "-" if token["margin"] is None else f"{token['margin']:.3g}"
    index = _shown(token["clean_logits"], k)
    noise = "-"
    if token["noise_std"] is not None:
        noise = _cells(token["noise_std"], index, prefix, sign="")
    return (token["position"], token["token"], _choice_cells(token), margin,
            _cells(token["clean_logits"], index, prefix), noise)


def format_tables(report):
    """The plain-text tables of an `inspect_run` report."""
    out = [f"Routing of {report['model']} on {report['data']} ({report['lines']} lines)"]
    for result in report["layers"].values():
        out += ["", f"== {_layer_heading(result)} ==", _summary_line(result), ""]
        out.append(f"{'expert':>6} {'count':>8} {'share':>7} {'importance':>10}  "
                   "characteristic tokens: token xP(t|e)/P(t) (pairs)")
        for e, entry in zip(result["experts"], result["characteristic"], strict=True):
            out.append(f"{e['expert']:>6} {e['count']:>8} {e['share']:>7.1%} "
                       f"{e['importance']:>10.2f}  {_characteristic_text(entry)}")
        level = "groups" if result["logits_level"] == "groups" else "experts"
        for text, tokens in zip(report["sentences"], result["sentences"], strict=True):
            out += ["", f"sentence: {text}",
                    f"{'pos':>4} {'token':<14} {'experts (gate)':<28} {'margin':>7}  "
                    f"clean logits of {level} | noise std (all, or of the k + 2 best logits)"]
            for row in (_token_row(result, token) for token in tokens):
                out.append(f"{row[0]:>4} {row[1]:<14} {row[2]:<28} {row[3]:>7}  "
                           f"{row[4]} | {row[5]}")
    return "\n".join(out)


# --- HTML --------------------------------------------------------------------

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
    parts = [f'<section class="layer" id="layer-{_e(name)}"><h2>{_e(_layer_heading(result))}</h2>',
             f"<p>{_e(_summary_line(result))}</p>"]
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
                     _characteristic_text(entry) or "-",
                     " | ".join(f"{c['context']} ({c['gate']:.2f})" for c in contexts) or "-"])
    header = ["expert", *(["group"] if grouped else []), "count", "share", "importance",
              "characteristic tokens: token xP(t|e)/P(t) (pairs)", "largest gates in context"]
    parts.append(f"<h3>Experts</h3>{_table(header, rows, numeric=range(5 if grouped else 4))}")
    level = "group" if result["logits_level"] == "groups" else "expert"
    for i, (text, tokens) in enumerate(zip(report["sentences"], result["sentences"],
                                           strict=True)):
        parts.append(f'<h3 class="sentence">Sentence {i + 1}: {_e(text)}</h3>')
        gates = routing_inspect.gate_matrix(result | {"tokens": result["sentences"]}, i)
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
                token["position"], token["token"], _choice_cells(token),
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
