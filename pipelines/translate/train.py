"""Train, evaluate and use translation models: the library behind `keras-moe translate`.

`train(config, run_dir)` runs `model.fit` with App. E's optimiser and
schedule and writes everything into `run_dir`:

```
run_dir/config.yaml              the resolved configuration (written first)
run_dir/cleaning.json            pairs read, kept, and dropped per reason
run_dir/wordpiece.txt            the shared source/target vocabulary
run_dir/tensorboard/             loss, perplexity, BLEU, chrF, learning rate, routing
                                 metrics per MoE layer, routing histograms and bar charts
run_dir/checkpoints/             last.keras, best.keras (by validation BLEU) and the
                                 last `keep_checkpoints` step-N.weights.h5 for averaging
run_dir/backup/                  BackupAndRestore state: a killed run resumes here
run_dir/history.csv              one row per evaluation
run_dir/model.keras              the final model
run_dir/translations/            hypotheses of the final evaluation, one file per split
run_dir/results.json             final scores (BLEU with signature, chrF, perplexity), routing,
                                 strategy and replicas
```

Running `train` again on the same directory with the same configuration
resumes from the backup; a different configuration is refused, and nothing
already in the directory is deleted or overwritten by a refused run.

`train.strategy` and `train.expert_parallel` choose the `tf.distribute`
strategy as for the language models (see `keras_moe.pipelines.lm.train` and
`keras_moe.pipelines.training.distribution`); `multi_worker` trains with
`keras_moe.pipelines.training.multi_worker.train` (see `train_multi_worker`).
"""

import json
import os

import keras
import numpy as np

from keras_moe.models import translation_presets
from keras_moe.models.training import TokenPerplexity, WarmupInverseSqrt
from keras_moe.pipelines import config as config_lib
from keras_moe.pipelines.data import parallel_corpora
from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary
from keras_moe.pipelines.training import distribution
from keras_moe.pipelines.training.runs import (
    find_model,
    fit_and_save,
    prepare_run_dir,
    run_callbacks,
)
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import scoring
from keras_moe.pipelines.translate.config import TranslateConfig

# Re-exported: the evaluation half of the pipeline lives in translate_eval.
from keras_moe.pipelines.translate.evaluation import (  # noqa: F401
    CONVENTION,
    KeepLastCheckpoints,
    ValidationScores,
    average_checkpoints,
    averaged_model,
    evaluate_pairs,
    score_split,
    step_checkpoints,
    translate_ids,
    translate_lines,
)


def check_inputs(config):
    """Fail before anything is written: the preset exists, every corpus can be read.

    Reads the training pairs through once (their cleaning counts are the
    result) and the validation and test pairs whole.

    Returns:
        The training data's `parallel_corpora.CleaningCounts`.
    """
    translation_presets.get_preset(config.model.preset)
    counts = parallel_corpora.CleaningCounts()
    for _ in translate_input.pairs_factory(config.data, "train", counts)():
        pass
    if counts.kept == 0:
        raise ValueError(
            f"no training pair left after cleaning ({counts.summary()}); check data.train, "
            "data.max_length and data.max_ratio"
        )
    for split in ("valid", "test"):
        if split == "valid" or config.data.test:
            if not list(translate_input.pairs_factory(config.data, split)()):
                raise ValueError(f"`data.{split}` holds no sentence pair")
    return counts


def build_vocabulary(config, run_dir):
    """The run's saved vocabulary, or a new shared one learned from both sides.

    A new vocabulary is returned unsaved, so bad training text fails before
    the run directory is touched. `run_dir=None` always learns it (a
    deterministic function of the training text).
    """
    if run_dir is not None and os.path.exists(os.path.join(run_dir, "wordpiece.txt")):
        return WordPieceVocabulary.load(run_dir)
    c = config.data
    pairs = translate_input.pairs_factory(c, "train")()
    sample = (line for _, pair in zip(range(c.vocab_max_pairs), pairs, strict=False)
              for line in pair)
    return WordPieceVocabulary.learn(
        sample, c.vocab_size, max_lines=2 * c.vocab_max_pairs, num_iterations=c.vocab_iterations,
        max_input_tokens=c.vocab_max_words or -1,
    )


def make_optimizer(train_config):
    """Adam with App. E's schedule (`WarmupInverseSqrt` with `hold_steps`)."""
    t = train_config
    return distribution.expert_parallel_optimizer(keras.optimizers.Adam(
        WarmupInverseSqrt(t.learning_rate, t.warmup_steps, t.decay, hold_steps=t.hold_steps),
        beta_1=t.beta_1, beta_2=t.beta_2, epsilon=t.epsilon, clipnorm=t.clipnorm,
    ), t.expert_parallel)


def build_model(config, vocab_size, compile=True):
    """The preset's `TranslationModel` with the overrides, built (and compiled).

    Call it inside the strategy's scope.
    """
    t = config.train
    model = translation_presets.build_translation_model(
        config.model.preset, vocab_size, seed=t.seed, expert_parallel=t.expert_parallel,
        **config.model.overrides()
    )
    # Built now: BackupAndRestore restores weights into a built model only.
    # (The constructor builds every weight; an expert-parallel model cannot
    # be called outside the replicas, so it skips this first call.)
    if not t.expert_parallel:
        model((np.full((1, 2), 2, np.int32), np.full((1, 2), 2, np.int32)))
    if not compile:
        return model
    model.compile(
        optimizer=make_optimizer(t),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[TokenPerplexity()],
    )
    return model


def make_callbacks(config, run_dir, vocab, model, valid_pairs):
    t = config.train
    validation = ValidationScores(
        valid_pairs, vocab, config.decode, config.data.eval_batch_size,
        config.data.valid_bleu_sentences, config.decode.valid_beam_width,
        config.data.target_language,
    )
    extra = [KeepLastCheckpoints(os.path.join(run_dir, "checkpoints"), t.keep_checkpoints)]
    if t.early_stopping_patience:
        extra.append(keras.callbacks.EarlyStopping(
            monitor="val_bleu", mode="max", patience=t.early_stopping_patience))
    return run_callbacks(run_dir, model, t, validation, "val_bleu", "max", extra)


def train(config, run_dir, strategy=None):
    """Train the translation model `config` describes; write the run into `run_dir`.

    Args:
        config: a `TranslateConfig`.
        run_dir: the run directory (created; resumed when it holds a backup
            of the same configuration).
        strategy: optional `tf.distribute.Strategy` of `train.strategy`,
            already made (`distribution.make_strategy`); None makes it.

    Returns:
        The results dict also written to `run_dir/results.json` (on a
        non-chief `multi_worker` task: `chief`, `task` and `steps` only).

    Raises:
        FileNotFoundError, ValueError: naming the file or key at fault;
            raised before the run directory is touched.
    """
    if not isinstance(config, TranslateConfig):
        raise TypeError(f"`config` must be a TranslateConfig. Received: {type(config).__name__}")
    t = config.train
    if strategy is None:
        # First: `multi_worker` and `tpu` must start before any TensorFlow op.
        strategy = distribution.make_strategy(t.strategy)
    if t.strategy == "multi_worker":
        return train_multi_worker(config, run_dir, strategy)
    counts = check_inputs(config)
    vocab = build_vocabulary(config, run_dir)
    resumed = _prepare(config, run_dir, vocab, counts)
    keras.utils.set_random_seed(t.seed)
    with strategy.scope():
        model = build_model(config, len(vocab))
    distribution.check_model(model, t.strategy)
    distribution.attach_evaluation_copy(model, t.strategy)
    dataset = translate_input.training_dataset(
        translate_input.pairs_factory(config.data, "train"), vocab, config.data, seed=t.seed
    )
    valid_pairs = list(translate_input.pairs_factory(config.data, "valid")())
    callbacks = make_callbacks(config, run_dir, vocab, model, valid_pairs)
    fitted = fit_and_save(model, dataset, t, callbacks, run_dir)
    results = {
        "preset": config.model.preset,
        "resumed": resumed,
        "steps": fitted["steps"],
        "train_seconds": fitted["train_seconds"],
        "elapsed_minutes": fitted["elapsed_minutes"],
        "strategy": t.strategy,
        "replicas": int(strategy.num_replicas_in_sync),
        "cleaning": vars(counts),
        "costs": translation_presets.costs(model.get_config()),
        "history": fitted["history"],
    }
    return _finish(config, run_dir, distribution.evaluation_model(model), vocab, valid_pairs,
                   results)


def _prepare(config, run_dir, vocab, counts):
    """`prepare_run_dir`, then the vocabulary and `cleaning.json`; True when resuming."""
    resumed = prepare_run_dir(config, run_dir)
    if not resumed:
        vocab.save(run_dir)
    with open(os.path.join(run_dir, "cleaning.json"), "w", encoding="utf-8") as f:
        json.dump({**vars(counts), "summary": counts.summary()}, f, indent=2)
    return resumed


def _finish(config, run_dir, model, vocab, valid_pairs, results):
    """Final scores of `model` (or its checkpoint average) into `results`; write them."""
    evaluated = averaged_model(model, run_dir, config.decode.average_checkpoints)
    # How many step checkpoints the evaluated weights average (0: the final weights).
    results["averaged_checkpoints"] = getattr(evaluated, "averaged_checkpoints", 0)
    out_dir = os.path.join(run_dir, "translations")
    valid = score_split(evaluated, vocab, config, valid_pairs, "valid", out_dir, routing=True)
    results["routing_valid"] = valid.pop("routing")
    results["valid"] = valid
    if config.data.test:
        test_pairs = list(translate_input.pairs_factory(config.data, "test")())
        results["test"] = score_split(evaluated, vocab, config, test_pairs, "test", out_dir)
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def train_multi_worker(config, run_dir, strategy):
    """`train` under `MultiWorkerMirroredStrategy`: `keras_moe.pipelines.training.multi_worker.train`, not `fit`.

    As `lm_train.train_multi_worker`: every worker reads the seeded training
    batches built with `data.batch_tokens / replicas` tokens and keeps every
    n-th batch; the objective is the loop's (weighted token losses over the
    global batch's positions, padding included, plus the balancing losses);
    checkpoints go to `run_dir/checkpoints/multi_worker` every
    `train.steps_per_eval` steps, and a restarted run resumes from them.
    Not in this path: validation (loss, BLEU) during training,
    `BackupAndRestore`, the `.keras` and `step-N.weights.h5` checkpoints
    (so no checkpoint averaging), `history.csv`, `RoutingMonitor`, early
    stopping and `train.time_limit_minutes`.

    Only the chief (task 0) writes the run directory (`config.yaml`, the
    vocabulary, `cleaning.json`, `tensorboard/train` with the loss every
    `train.monitor_every_n_steps` steps, then `model.keras`, the
    translations and `results.json`, scored on a one-device copy); the
    other workers write only `multi_worker.train`'s temporary checkpoints
    and wait for the chief's evaluation before they exit.
    """
    t = config.train
    chief = distribution.is_chief(strategy)
    counts = check_inputs(config)
    # Every worker learns the same vocabulary; only the chief reads or writes the run.
    vocab = build_vocabulary(config, run_dir if chief else None)
    resumed = _prepare(config, run_dir, vocab, counts) if chief else False
    def build():
        return build_model(config, len(vocab), compile=False), make_optimizer(t)

    factory = translate_input.pairs_factory(config.data, "train")

    def make_dataset(data_config):
        return translate_input.training_dataset(factory, vocab, data_config, seed=t.seed)

    model, results = distribution.train_multi_worker(
        config, run_dir, strategy, build, make_dataset, ("batch_tokens",), resumed
    )
    if chief:
        results["cleaning"] = vars(counts)
        results["costs"] = translation_presets.costs(model.get_config())
        valid_pairs = list(translate_input.pairs_factory(config.data, "valid")())
        results = _finish(config, run_dir, distribution.evaluation_model(model), vocab,
                          valid_pairs, results)
    distribution.barrier(strategy)
    return results


def load_run(run_dir, average=None):
    """The configuration, vocabulary and model of a run directory.

    Args:
        run_dir: a directory written by `train`.
        average: None (the run's `decode.average_checkpoints`), 0 or an int:
            evaluate the mean of the last N step checkpoints.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    config = config_lib.load_config(TranslateConfig, path)
    vocab = WordPieceVocabulary.load(run_dir)
    model_path = find_model(run_dir)
    model = keras.saving.load_model(model_path, compile=False)
    if model.vocab_size != len(vocab):
        raise ValueError(
            f"{model_path}: the model has {model.vocab_size} tokens but "
            f"{run_dir}/wordpiece.txt has {len(vocab)}"
        )
    average = config.decode.average_checkpoints if average is None else average
    return config, vocab, averaged_model(model, run_dir, average), model_path


def evaluate(run_dir, source, references, beam_width=None, average=None, out=None):
    """Translate `source` with a run's model and score it against `references`.

    Args:
        run_dir: a directory written by `train`.
        source: the source file (text, `.gz` or `.sgm`).
        references: list of reference files, each with one line per source line.
        beam_width: None (the run's `decode.beam_width`) or an int (1: greedy).
        average: checkpoint averaging (see `load_run`).
        out: hypotheses file (default `run_dir/eval/<source name>.hyp`); the
            scores are written next to it as `.json`.

    Returns:
        dict with `bleu`, `bleu_signature`, `bleu_tokenized`,
        `bleu_tokenized_convention`, `chrf`, `chrf_signature`, `perplexity`
        (against the first reference), `hypotheses_file` and more.
    """
    if not references:
        raise ValueError("`references` must name at least one reference file")
    sources = parallel_corpora.read_sentences(source)
    streams = [parallel_corpora.read_sentences(r) for r in references]
    for path, stream in zip(references, streams, strict=True):
        if len(stream) != len(sources):
            raise ValueError(
                f"{source} has {len(sources)} sentences but {path} has {len(stream)}"
            )
    config, vocab, model, model_path = load_run(run_dir, average)
    d = config.decode
    beam = d.beam_width if beam_width is None else beam_width
    hypotheses = translate_lines(model, vocab, sources, d, config.data.eval_batch_size, beam)
    out = out or os.path.join(run_dir, "eval", os.path.basename(source) + ".hyp")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hypotheses))
    scores = scoring.score(hypotheses, streams, target_language=config.data.target_language)
    result = evaluate_pairs(model, vocab, list(zip(sources, streams[0], strict=True)),
                            config.data.eval_batch_size, routing=True)
    if not result["routing"]:
        del result["routing"]
    result = {**scores, **result, "beam_width": beam, "source": source,
              "references": list(references), "hypotheses_file": out, "model": model_path}
    with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def run(run_dir, lines, beam_width=None, chunk=64):
    """Translate an iterable of lines chunk by chunk; yields one translation per line."""
    config, vocab, model, _ = load_run(run_dir)
    lines = iter(lines)
    while batch := [line.rstrip("\n") for _, line in zip(range(chunk), lines, strict=False)]:
        yield from translate_lines(model, vocab, batch, config.decode,
                                   config.data.eval_batch_size, beam_width)


def export(run_dir, out, beam_width=None, average=None):
    """Export a run's model as a SavedModel that translates raw strings (see `translate_export`)."""
    from keras_moe.pipelines.translate.export import export_translator

    config, vocab, model, _ = load_run(run_dir, average)
    d = config.decode
    return export_translator(
        model, vocab, out, beam_width=d.beam_width if beam_width is None else beam_width,
        alpha=d.alpha, beta=d.beta, max_length_ratio=d.max_length_ratio, min_extra=d.min_extra,
    )
