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
run_dir/results.json             final scores (BLEU with signature, chrF, perplexity), routing
```

Running `train` again on the same directory with the same configuration
resumes from the backup; a different configuration is refused, and nothing
already in the directory is deleted or overwritten by a refused run.
"""

import glob
import json
import math
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf

import keras_moe
from keras_moe.models import translation_presets
from keras_moe.models.decoding import beam_search, greedy_decode
from keras_moe.models.training import TokenPerplexity, WarmupInverseSqrt
from keras_moe.pipelines import config as config_lib
from keras_moe.pipelines import parallel_corpora, scoring, translate_input
from keras_moe.pipelines.runs import (
    RoutingStatistics,
    WallClockLimit,
    find_model,
    prepare_run_dir,
)
from keras_moe.pipelines.translate_config import TranslateConfig
from keras_moe.pipelines.wordpiece import WordPieceVocabulary

CONVENTION = (
    "perplexity per target WordPiece token: exp(total negative log-likelihood / tokens), "
    "every piece of every reference sentence and its <eos> counted, teacher forcing"
)
_STEP_FILE = re.compile(r"step-(\d+)\.weights\.h5$")


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
    the run directory is touched.
    """
    if os.path.exists(os.path.join(run_dir, "wordpiece.txt")):
        return WordPieceVocabulary.load(run_dir)
    c = config.data
    pairs = translate_input.pairs_factory(c, "train")()
    sample = (line for _, pair in zip(range(c.vocab_max_pairs), pairs, strict=False)
              for line in pair)
    return WordPieceVocabulary.learn(
        sample, c.vocab_size, max_lines=2 * c.vocab_max_pairs, num_iterations=c.vocab_iterations,
        max_input_tokens=c.vocab_max_words or -1,
    )


def build_model(config, vocab_size):
    """The preset's `TranslationModel` with the overrides, built and compiled."""
    t = config.train
    model = translation_presets.build_translation_model(
        config.model.preset, vocab_size, seed=t.seed, **config.model.overrides()
    )
    # Built now: BackupAndRestore restores weights into a built model only.
    model((np.full((1, 2), 2, np.int32), np.full((1, 2), 2, np.int32)))
    optimizer = keras.optimizers.Adam(
        WarmupInverseSqrt(t.learning_rate, t.warmup_steps, t.decay, hold_steps=t.hold_steps),
        beta_1=t.beta_1, beta_2=t.beta_2, epsilon=t.epsilon, clipnorm=t.clipnorm,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        weighted_metrics=[TokenPerplexity()],
    )
    return model


def translate_ids(model, source_rows, decode_config, batch_size, beam_width=None):
    """Decode id rows (each ending in `<eos>`); returns the output ids without `<eos>`."""
    d = decode_config
    beam = d.beam_width if beam_width is None else beam_width
    eos = 2
    outputs = [None] * len(source_rows)
    for indices, batch in translate_input.length_sorted_batches(source_rows, batch_size):
        if beam == 1:
            ids, _ = greedy_decode(model, batch, bos_id=eos, eos_id=eos,
                                   max_length_ratio=d.max_length_ratio, min_extra=d.min_extra)
        else:
            ids, _ = beam_search(model, batch, bos_id=eos, eos_id=eos, beam_width=beam,
                                 alpha=d.alpha, beta=d.beta,
                                 max_length_ratio=d.max_length_ratio, min_extra=d.min_extra)
        for i, row in zip(indices, ids.numpy().tolist(), strict=True):
            end = row.index(eos) if eos in row else len(row)
            outputs[i] = [t for t in row[:end] if t != 0]
    return outputs


def translate_lines(model, vocab, lines, decode_config, batch_size=64, beam_width=None):
    """Translations of raw source lines (detokenized: pieces joined, words spaced).

    Args:
        model: a `TranslationModel`.
        vocab: the run's `WordPieceVocabulary`.
        lines: list of source sentences.
        decode_config: a `translate_config.DecodeConfig`.
        batch_size: sentences decoded together (sorted by length first).
        beam_width: overrides `decode_config.beam_width` (1: greedy).

    Returns:
        A list of strings, one per line, in order.
    """
    lines = list(lines)
    if not lines:
        return []
    rows = vocab.encode_lines(lines)
    return [vocab.decode(ids) for ids in
            translate_ids(model, rows, decode_config, batch_size, beam_width)]


def evaluate_pairs(model, vocab, pairs, batch_size=64, routing=False):
    """Perplexity per target piece of `model` on `(source, reference)` pairs.

    With `routing=True` the same forward pass also collects the routing of
    every MoE layer (inference mode) into `result["routing"]`
    (`runs.RoutingStatistics`).
    """
    with_routing = routing and bool(keras_moe.monitoring.find_moe_layers(model))

    @tf.function(reduce_retracing=True)
    def step(inputs, targets, weights):
        if with_routing:
            logits, extras = model(inputs, training=False, return_routing=True)
            routings = extras["routing"]
        else:
            logits, routings = model(inputs, training=False), {}
        nll = tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        return tf.reduce_sum(nll * weights), tf.reduce_sum(weights), routings

    total, count, stats, sentences = 0.0, 0.0, RoutingStatistics(), 0
    for inputs, targets, weights in translate_input.evaluation_batches(pairs, vocab, batch_size):
        summed, weight, routings = step(inputs, targets, weights)
        total += float(summed)
        count += float(weight)
        sentences += len(targets)
        stats.add(routings)
    loss = total / max(count, 1.0)
    result = {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "tokens": int(count),
              "sentences": sentences, "convention": CONVENTION}
    if routing:
        result["routing"] = stats.result()
    return result


class ValidationScores(keras.callbacks.Callback):
    """Adds `val_loss`, `val_perplexity`, `val_bleu` and `val_chrf` to the epoch logs.

    BLEU is sacreBLEU on detokenized output of the first `bleu_sentences`
    validation pairs (all when 0), decoded with `beam_width` (1: greedy).
    """

    def __init__(self, pairs, vocab, decode_config, batch_size, bleu_sentences, beam_width,
                 target_language):
        super().__init__()
        self.pairs = list(pairs)
        self.vocab = vocab
        self.decode_config = decode_config
        self.batch_size = batch_size
        self.bleu_pairs = self.pairs[:bleu_sentences] if bleu_sentences else self.pairs
        self.beam_width = beam_width
        self.target_language = target_language
        self.last_signature = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        result = evaluate_pairs(self.model, self.vocab, self.pairs, self.batch_size)
        logs["val_loss"] = result["loss"]
        logs["val_perplexity"] = result["perplexity"]
        hypotheses = translate_lines(
            self.model, self.vocab, [s for s, _ in self.bleu_pairs], self.decode_config,
            self.batch_size, self.beam_width,
        )
        scores = scoring.score(hypotheses, [[t for _, t in self.bleu_pairs]],
                               target_language=self.target_language)
        logs["val_bleu"] = scores["bleu"]
        logs["val_chrf"] = scores["chrf"]
        self.last_signature = scores["bleu_signature"]


class KeepLastCheckpoints(keras.callbacks.Callback):
    """Writes `step-N.weights.h5` after every evaluation and keeps the last `keep`."""

    def __init__(self, directory, keep):
        super().__init__()
        self.directory = directory
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.model.save_weights(os.path.join(self.directory, f"step-{step:08d}.weights.h5"))
        for path in step_checkpoints(self.directory)[: -self.keep]:
            os.remove(path)


def step_checkpoints(directory):
    """The `step-N.weights.h5` files of `directory`, oldest first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step-*.weights.h5"))
             if _STEP_FILE.search(p)]
    return sorted(paths, key=lambda p: int(_STEP_FILE.search(p).group(1)))


def average_checkpoints(model, paths):
    """Set `model`'s weights to the mean of the weights files `paths`.

    Floating-point variables are averaged; others (seed states, counters)
    keep the last file's values.

    Raises:
        ValueError: when `paths` is empty.
    """
    if not paths:
        raise ValueError("no checkpoint to average")
    sums = None
    for path in paths:
        model.load_weights(path)
        values = [np.asarray(v.numpy(), np.float64) for v in model.weights]
        sums = values if sums is None else [s + v for s, v in zip(sums, values, strict=True)]
    for variable, total in zip(model.weights, sums, strict=True):
        if np.issubdtype(np.dtype(variable.dtype), np.floating):
            variable.assign((total / len(paths)).astype(variable.dtype))
    return model


def make_callbacks(config, run_dir, vocab, model, valid_pairs):
    t = config.train
    log_dir = os.path.join(run_dir, "tensorboard")
    checkpoints = os.path.join(run_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    callbacks = [
        # First, so that a resumed run has its weights back before anything else runs.
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup")),
        keras.callbacks.TerminateOnNaN(),
        # Before the loggers, checkpoints and early stopping, which read its values.
        ValidationScores(
            valid_pairs, vocab, config.decode, config.data.eval_batch_size,
            config.data.valid_bleu_sentences, config.decode.valid_beam_width,
            config.data.target_language,
        ),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=True),
        keras.callbacks.ModelCheckpoint(os.path.join(checkpoints, "last.keras")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(checkpoints, "best.keras"), monitor="val_bleu", mode="max",
            save_best_only=True,
        ),
        KeepLastCheckpoints(checkpoints, t.keep_checkpoints),
        keras.callbacks.TensorBoard(log_dir, update_freq=t.monitor_every_n_steps),
    ]
    if t.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_bleu", mode="max", patience=t.early_stopping_patience))
    if keras_moe.monitoring.find_moe_layers(model):
        callbacks.append(keras_moe.RoutingMonitor(log_dir, every_n_steps=t.monitor_every_n_steps))
    if t.time_limit_minutes:
        callbacks.append(WallClockLimit(t.time_limit_minutes))
    return callbacks


def score_split(model, vocab, config, pairs, name, out_dir, beam_width=None, routing=False):
    """Translate and score `pairs`; write `out_dir/<name>.hyp`; return the scores."""
    c, d = config.data, config.decode
    result = evaluate_pairs(model, vocab, pairs, c.eval_batch_size, routing=routing)
    hypotheses = translate_lines(model, vocab, [s for s, _ in pairs], d, c.eval_batch_size,
                                 beam_width)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.hyp")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hypotheses))
    scores = scoring.score(hypotheses, [[t for _, t in pairs]],
                           target_language=c.target_language)
    return {**scores, **result, "hypotheses_file": path,
            "beam_width": d.beam_width if beam_width is None else beam_width}


def train(config, run_dir):
    """Train the translation model `config` describes; write the run into `run_dir`.

    Args:
        config: a `TranslateConfig`.
        run_dir: the run directory (created; resumed when it holds a backup
            of the same configuration).

    Returns:
        The results dict also written to `run_dir/results.json`.

    Raises:
        FileNotFoundError, ValueError: naming the file or key at fault;
            raised before the run directory is touched.
    """
    if not isinstance(config, TranslateConfig):
        raise TypeError(f"`config` must be a TranslateConfig. Received: {type(config).__name__}")
    counts = check_inputs(config)
    vocab = build_vocabulary(config, run_dir)
    resumed = prepare_run_dir(config, run_dir)
    if not resumed:
        vocab.save(run_dir)
    with open(os.path.join(run_dir, "cleaning.json"), "w", encoding="utf-8") as f:
        json.dump({**vars(counts), "summary": counts.summary()}, f, indent=2)
    keras.utils.set_random_seed(config.train.seed)
    model = build_model(config, len(vocab))
    t = config.train
    dataset = translate_input.training_dataset(
        translate_input.pairs_factory(config.data, "train"), vocab, config.data, seed=t.seed
    )
    valid_pairs = list(translate_input.pairs_factory(config.data, "valid")())
    callbacks = make_callbacks(config, run_dir, vocab, model, valid_pairs)
    start = time.time()
    history = model.fit(
        dataset, epochs=-(-t.steps // t.steps_per_eval), steps_per_epoch=t.steps_per_eval,
        callbacks=callbacks, verbose=t.verbose, shuffle=False,  # the dataset shuffles itself
    )
    train_seconds = time.time() - start
    model.save(os.path.join(run_dir, "model.keras"))
    results = {
        "preset": config.model.preset,
        "resumed": resumed,
        "steps": int(model.optimizer.iterations.numpy()),
        "train_seconds": round(train_seconds, 1),
        "cleaning": vars(counts),
        "costs": translation_presets.costs(model.get_config()),
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
    }
    evaluated = _evaluation_model(model, run_dir, config.decode.average_checkpoints)
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


def _evaluation_model(model, run_dir, average):
    """`model`, or a copy holding the average of the last `average` step checkpoints."""
    if not average or average < 2:
        return model
    paths = step_checkpoints(os.path.join(run_dir, "checkpoints"))[-average:]
    if len(paths) < 2:
        return model
    copy = keras.models.clone_model(model)
    copy((np.full((1, 2), 2, np.int32), np.full((1, 2), 2, np.int32)))
    average_checkpoints(copy, paths)
    copy.averaged_checkpoints = len(paths)
    return copy


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
    return config, vocab, _evaluation_model(model, run_dir, average), model_path


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
    from keras_moe.pipelines.translate_export import export_translator

    config, vocab, model, _ = load_run(run_dir, average)
    d = config.decode
    return export_translator(
        model, vocab, out, beam_width=d.beam_width if beam_width is None else beam_width,
        alpha=d.alpha, beta=d.beta, max_length_ratio=d.max_length_ratio, min_extra=d.min_extra,
    )
