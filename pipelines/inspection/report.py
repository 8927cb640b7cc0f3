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
source-language text, and the report covers every MoE layer: the
encoder's routes the source tokens (through `TranslationModel.encode`);
the decoder's routes the positions of the model's own greedy translation
of each line (its input `<eos> y1 ... yn`, teacher-forced with the source
sentence), which is the routing it does when it translates.

Every layer's line carries the collapse alarm on this clean routing
(`keras_moe.alarms.collapse_reasons`, `RoutingMonitor`'s default
thresholds; a warning on stderr when it fires) and, when the run's
`history.csv` has them, its last training routing values beside it.
"""

import os

from keras_moe import alarms, statistics
from keras_moe.pipelines.data import lm_corpora
from keras_moe.pipelines.inspection import routes as routing_inspect
from keras_moe.pipelines.inspection.page import (  # noqa: F401 (re-exported)
    HEAT_COLOR,
    gate_heatmap,
    heatmap_cell,
    png_data_uri,
    render_html,
)
from keras_moe.pipelines.inspection.tables import format_tables
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.training import routing_checks
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import train as translate_train
from keras_moe.validation import check_int

EXAMPLE_LINES = 3  # sentences shown when none is given


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
        config, vocab, model, model_path = translate_train.load_run(run_dir, average=0)
        lines = read_lines(data, "text", max_lines)
        report = build_translation_report(model, vocab, lines, sentences, config.decode, layer,
                                          top, min_count)
    else:
        config, vocab, model, model_path = lm_train.load_run(run_dir)
        lines = read_lines(data, config.data.format, max_lines)
        report = build_report(model, vocab, lines, sentences, layer, top, min_count)
    training = routing_checks.last_training_values(run_dir, report["layers"])
    for name, result in report["layers"].items():
        if name in training:
            result["training"] = training[name]
        for line in alarms.warning_lines({name: {"reasons": result["collapse_reasons"]}},
                                         f"clean (inference) routing on {os.fspath(data)}"):
            routing_checks.logger.warning(line)
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


def _decode(model, tokens, source):
    """A translation model teacher-forced on `tokens` (decoder input) for `source`."""
    return model((source, tokens), training=False)


def translation_layers(model):
    """`(encoder MoE layer names, decoder MoE layer names)` of a `TranslationModel`."""
    if model.middle_block != "moe":
        return [], []
    return [f"encoder_{model.middle_block}"], [f"decoder_{model.middle_block}"]


def build_translation_report(model, vocabulary, lines, sentences=(), decode_config=None,
                             layer=None, top=10, min_count=2):
    """`build_report` of a translation model: its encoder and decoder MoE layers.

    The encoder's layer routes the source `lines`; the decoder's routes the
    decoder input of each line's greedy translation (`<eos>` and the
    translation's pieces), teacher-forced with the line as the source.
    Each decoder sentence is shown as `source => translation`.
    `decode_config` is the run's `decode` section (its length limits).
    """
    encoder, decoder = translation_layers(model)
    if layer is not None and layer not in encoder + decoder:
        raise ValueError(
            f"`layer` must be a MoE layer of this translation model "
            f"({', '.join(encoder + decoder) or 'it has none'}). Received: layer={layer!r}"
        )
    if not encoder:
        raise ValueError(f"model {model.name!r} has no MoE layer (middle_block="
                         f"{model.middle_block!r})")
    report = None
    if layer is None or layer in encoder:
        report = build_report(model, vocabulary, lines, sentences, encoder[0], top, min_count,
                              forward=_encode)
    if layer is None or layer in decoder:
        shown = _checked_sentences(sentences, lines)
        sources = vocabulary.encode_lines(lines)
        shown_sources = vocabulary.encode_lines(shown)
        batch = 64
        hypotheses = translate_train.translate_ids(model, sources, decode_config, batch, 1)
        shown_hypotheses = translate_train.translate_ids(model, shown_sources, decode_config,
                                                         batch, 1)
        start = translate_input.eos_id(vocabulary)  # also the decoder's start symbol
        decoded = build_report(
            model, vocabulary, [[start, *h] for h in hypotheses],
            [[start, *h] for h in shown_hypotheses], decoder[0], top, min_count,
            forward=_decode, context=sources, sentence_context=shown_sources,
        )
        layer_result = decoded["layers"][decoder[0]]
        layer_result["sentence_texts"] = [
            f"{text} => {vocabulary.decode(h)}"
            for text, h in zip(shown, shown_hypotheses, strict=True)
        ]
        if report is None:
            report = {**decoded, "lines": len(lines), "sentences": shown}
        else:
            report["layers"].update(decoded["layers"])
    return report


def _checked_sentences(sentences, lines):
    if isinstance(sentences, str):
        raise ValueError(f"`sentences` must be a list of strings. Received: {sentences!r:.80}")
    sentences = list(sentences) or lines[:EXAMPLE_LINES]
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError(f"`sentences[{i}]` must be a non-empty string. Received: {sentence!r}")
    return sentences


def build_report(model, vocabulary, lines, sentences=(), layer=None, top=10, min_count=2,
                 forward=None, context=None, sentence_context=None):
    """The numbers of an `inspect_run` report for any model and vocabulary.

    `lines` and `sentences` are strings, or token-id lists when `context`
    and `sentence_context` (one id list per line and per sentence) are
    given to `forward` (see `routes.route`).

    Returns:
        dict with `lines` (how many were routed), `sentences` and `layers`
        (see `inspect_run`); each layer's `collapse_reasons` is the alarm
        on its clean routing (`keras_moe.alarms.collapse_reasons`).
    """
    if context is None:
        sentences = _checked_sentences(sentences, lines)
    corpus = routing_inspect.route(model, lines, vocabulary, layer=layer, details=False,
                                   forward=forward, context=context)
    shown = routing_inspect.route(model, sentences, vocabulary, layer=layer, forward=forward,
                                  context=sentence_context)
    layers = {}
    for name, result in corpus["layers"].items():
        counts = [e["count"] for e in result["experts"]]
        importance = [e["importance"] for e in result["experts"]]
        summary = {key: value for key, value in result.items() if key != "tokens"}
        stats = statistics.summary(importance, counts)
        layers[name] = {
            **summary,
            "statistics": stats,
            "collapse_reasons": alarms.collapse_reasons(stats),
            "characteristic": routing_inspect.characteristic_tokens(result, top, min_count),
            "contexts": routing_inspect.expert_contexts(result),
            "sentences": shown["layers"][name]["tokens"],
        }
    return {"lines": len(lines), "sentences": shown["texts"], "layers": layers}


