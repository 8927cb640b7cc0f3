"""A run's model, its documents, and what the experts commands measure on them.

Language-model and translation runs are read with their pipelines'
`load_run` and measured with their own evaluators (`lm.train.evaluate_lines`,
`translate.evaluation.evaluate_pairs`, `translate_lines` and
`translate.scoring.score`): one inference-mode pass gives the quality
(perplexity, and BLEU for translation) and each MoE layer's usage, the
share of routed (token, expert) pairs each expert received
(`keras_moe.statistics.RoutingStatistics`'s `set_load_share`).

Documents (`keras_moe.pipelines.inspection.domains.read_documents`): a
domain file is UTF-8 text; when it has blank lines, a document is a group
of consecutive non-blank lines (a paragraph, an article), otherwise each
line is a document. The commands route the first `max_documents`
documents. For a translation run the file is the source
side and `target` the line-aligned target side; a document is then one
sentence pair (the decoder's routing needs the reference).
"""

import dataclasses
import os

from keras_moe import pruning, surgery
from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines import config as config_lib
from keras_moe.pipelines.data import parallel_corpora
from keras_moe.pipelines.inspection.domains import read_documents
from keras_moe.pipelines.inspection.report import is_translation_run
from keras_moe.pipelines.lm import inputs as lm_input
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import scoring
from keras_moe.pipelines.translate import train as translate_train

SAMPLE_BATCHES = 2  # batches whose MoE inputs are recorded for merging


@dataclasses.dataclass
class Run:
    """A loaded run: `kind` (`"lm"` or `"translate"`), configuration, vocabulary, model."""

    run_dir: str
    kind: str
    config: object
    vocab: object
    model: object
    model_path: str


def load(run_dir):
    """The run in `run_dir` (a translation run's final weights, not a checkpoint average)."""
    RunDir(run_dir).check_is_run()
    if is_translation_run(run_dir):
        config, vocab, model, path = translate_train.load_run(run_dir, average=0)
        return Run(os.fspath(run_dir), "translate", config, vocab, model, path)
    config, vocab, model, path = lm_train.load_run(run_dir)
    return Run(os.fspath(run_dir), "lm", config, vocab, model, path)


@dataclasses.dataclass
class Sample:
    """The documents a command routes: LM lines, or translation `(source, target)` pairs."""

    documents: int
    lines: list = None
    pairs: list = None


def read_sample(run, data, target=None, max_documents=100, target_flag="--target"):
    """The first `max_documents` documents of `data` (and `target`) for `run`.

    `target_flag` is how an error names the missing target side.
    """
    if run.kind == "lm":
        documents = read_documents(data, max_documents)
        if getattr(run.config.data, "document_rows", False):
            # Rows stay inside a document: keep the blank line between documents
            # that `data.document_rows` reads as the boundary.
            lines = [line for doc in documents for line in [*doc, ""]]
            return Sample(len(documents), lines=lines[:-1])
        return Sample(len(documents), lines=[line for doc in documents for line in doc])
    if target is None:
        raise ValueError(
            f"{target_flag}: a translation run needs the target side of its text (the "
            "decoder's routing and the perplexity need the reference)"
        )
    sources = parallel_corpora.read_sentences(data)
    targets = parallel_corpora.read_sentences(target)
    if len(sources) != len(targets):
        raise ValueError(f"{data} has {len(sources)} lines but {target} has {len(targets)}")
    pairs = [(s, t) for s, t in zip(sources, targets, strict=True) if s.strip() and t.strip()]
    if not pairs:
        raise ValueError(f"{data}: no non-blank sentence pair")
    pairs = pairs[:max_documents]
    return Sample(len(pairs), pairs=pairs)


def measure(run, model, sample, bleu=True):
    """Quality and per-layer usage of `model` (the run's, or a smaller one) on `sample`.

    Returns:
        dict with `perplexity`, `loss`, `tokens`, for translation `bleu`
        (unless `bleu=False`), and `usage`: `{layer name: [E] shares}`.
    """
    if run.kind == "lm":
        data_config = run.config.data
        result = lm_train.evaluate_lines(model, lambda: iter(sample.lines), run.vocab,
                                         data_config, routing=True)
    else:
        c = run.config
        result = translate_train.evaluate_pairs(model, run.vocab, sample.pairs,
                                                c.data.eval_batch_size, routing=True)
        if bleu:
            hypotheses = translate_train.translate_lines(
                model, run.vocab, [s for s, _ in sample.pairs], c.decode, c.data.eval_batch_size)
            scores = scoring.score(hypotheses, [[t for _, t in sample.pairs]],
                                   target_language=c.data.target_language)
            result["bleu"] = scores["bleu"]
    usage = {name: stats["set_load_share"] for name, stats in result.pop("routing").items()}
    keys = ("perplexity", "loss", "tokens", "words", "bleu")
    return {**{key: result[key] for key in keys if key in result}, "usage": usage}


def sample_rows(run, sample, batches=SAMPLE_BATCHES):
    """Each MoE layer's input rows on the first `batches` batches of `sample` (eager calls)."""
    if run.kind == "lm":
        stream = lm_input.evaluation_batches(iter(sample.lines), run.vocab, run.config.data)
    else:
        stream = translate_input.evaluation_batches(sample.pairs, run.vocab,
                                                    run.config.data.eval_batch_size)
    chosen = [inputs for (inputs, _, _), _ in zip(stream, range(batches), strict=False)]

    def call():
        for inputs in chosen:
            run.model(inputs, training=False)

    return {name: r["rows"] for name, r in pruning.record_routing(run.model, call).items()}


def check_out(out):
    """`out` as a path; FileExistsError naming `--out` when it exists and is not empty."""
    out = os.fspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out}: exists and is not empty; choose a new directory")
    return out


def save_run(run, model, out):
    """Write `out` as a run directory of `model`: config.yaml, the vocabulary, model.keras.

    The configuration is the run's with `model.num_experts` set to the new
    model's (and `model.pool_size`, `model.pool_size_range` clamped to it),
    so the pipelines' `evaluate`, `run` and `export` read `out`
    as any finished run.

    Raises:
        FileExistsError: naming `out` when it exists and is not empty.
    """
    out = check_out(out)
    target = RunDir(out)
    target.makedirs()
    experts = find_moe_layers(model)[0].num_experts
    # Document pools larger than the experts left shrink to them, as the
    # model's own (`surgery.clamp_pools`).
    pools = surgery.clamp_pools(
        {key: getattr(run.config.model, key, None) for key in ("pool_size", "pool_size_range")},
        experts)
    pools = {key: value for key, value in pools.items() if hasattr(run.config.model, key)}
    config = dataclasses.replace(
        run.config, model=dataclasses.replace(run.config.model, num_experts=experts, **pools))
    config_lib.save_config(config, target.config_file)
    target.save_vocabulary(run.vocab)
    model.save(target.model_file)
    return target
