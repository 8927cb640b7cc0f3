"""Evaluating translation models: decoding, scores, the validation callback, checkpoint averaging.

Used by `keras_moe.pipelines.translate.train` (which re-exports these names)
during training, for the final scores, and by `evaluate`, `run` and
`export`:

- `translate_ids` / `translate_lines`: batched greedy or beam-search
  decoding of token ids or raw sentences;
- `evaluate_pairs`: teacher-forced loss and per-token perplexity over a
  whole set (and the routing statistics of every MoE layer);
- `score_split`: translate a split, write its hypotheses, score them
  (sacreBLEU with signature, tokenized BLEU, chrF, perplexity);
- `ValidationScores`: the callback that adds `val_bleu`, `val_chrf`,
  `val_perplexity` and `val_loss` to the epoch logs;
- `KeepLastCheckpoints`, `step_checkpoints`, `average_checkpoints`,
  `averaged_model`: the last N step checkpoints and their average.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf

import keras_moe
from keras_moe.models.decoding import beam_search, greedy_decode
from keras_moe.pipelines.training import routing_checks, trainer
from keras_moe.pipelines.training.rundir import RunDir, step_checkpoint, step_checkpoints
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import scoring
from keras_moe.statistics import RoutingStatistics

CONVENTION = (
    "perplexity per target WordPiece token: exp(total negative log-likelihood / tokens), "
    "every piece of every reference sentence and its <eos> counted, teacher forcing"
)


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


class ValidationScores(trainer.Validation):
    """Adds `val_loss`, `val_perplexity`, `val_bleu` and `val_chrf` to the epoch logs.

    BLEU is sacreBLEU on detokenized output of the first `bleu_sentences`
    validation pairs (all when 0), decoded with `beam_width` (1: greedy).
    The loss pass also gives the clean routing of every MoE layer (encoder
    and decoder): `routing_checks.validation_logs` adds `val_<layer>_cv_load`
    and the rest, and warns when it collapsed.
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

    def validate(self, model):
        # The same pass gives the clean routing of every MoE layer and its collapse check.
        result = evaluate_pairs(model, self.vocab, self.pairs, self.batch_size, routing=True)
        hypotheses = translate_lines(
            model, self.vocab, [s for s, _ in self.bleu_pairs], self.decode_config,
            self.batch_size, self.beam_width,
        )
        scores = scoring.score(hypotheses, [[t for _, t in self.bleu_pairs]],
                               target_language=self.target_language)
        self.last_signature = scores["bleu_signature"]
        return {"val_loss": result["loss"], "val_perplexity": result["perplexity"],
                "val_bleu": scores["bleu"], "val_chrf": scores["chrf"],
                **routing_checks.validation_logs(result["routing"],
                                                 routing_checks.training_step(self.model))}


class KeepLastCheckpoints(keras.callbacks.Callback):
    """Writes `step-N.weights.h5` after every evaluation and keeps the last `keep`."""

    def __init__(self, directory, keep):
        super().__init__()
        self.directory = directory
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.model.save_weights(step_checkpoint(self.directory, step))
        for path in step_checkpoints(self.directory)[: -self.keep]:
            os.remove(path)


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


def averaged_model(model, run_dir, average):
    """`model`, or a copy holding the average of the last `average` step checkpoints."""
    if not average or average < 2:
        return model
    paths = RunDir.wrap(run_dir).step_checkpoints()[-average:]
    if len(paths) < 2:
        return model
    copy = keras.models.clone_model(model)
    copy((np.full((1, 2), 2, np.int32), np.full((1, 2), 2, np.int32)))
    average_checkpoints(copy, paths)
    copy.averaged_checkpoints = len(paths)
    return copy
