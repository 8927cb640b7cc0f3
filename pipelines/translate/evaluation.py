"""Evaluating translation models: decoding, scores, the validation callback, checkpoint averaging.

Used by `keras_moe.pipelines.translate.train` (which re-exports these names)
during training, for the final scores, and by `evaluate`, `run` and
`export`:

- `translate_ids` / `translate_lines`: batched greedy or beam-search
  decoding of token ids or raw sentences;
- `evaluate_pairs`: teacher-forced loss and per-token perplexity over a
  whole set (and the routing statistics of every MoE layer), with one
  compiled step per model whatever the batch shapes (`evaluation_step`);
- `limit_lines`: sentences cut to `data.max_eval_pieces` pieces, so that one
  overlong validation or test line cannot stall decoding (counted and
  reported by `score_split` and `evaluate`);
- `score_split`: translate a split, write its hypotheses, score them
  (sacreBLEU with signature, tokenized BLEU, chrF, perplexity);
- `ValidationScores`: the callback that adds `val_bleu`, `val_chrf`,
  `val_perplexity` and `val_loss` to the epoch logs;
- `KeepLastCheckpoints`, `step_checkpoints`, `average_checkpoints`,
  `averaged_model`: the last N step checkpoints and their average.
"""

import math
import os
import sys
import weakref

import keras
import numpy as np
import tensorflow as tf

import keras_moe
from keras_moe.models.decoding import beam_search, greedy_decode
from keras_moe.pipelines import progress
from keras_moe.pipelines.training import routing_checks, trainer
from keras_moe.pipelines.training.rundir import RunDir, step_checkpoint, step_checkpoints
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import scoring
from keras_moe.statistics import RoutingStatistics

CONVENTION = (
    "perplexity per target WordPiece token: exp(total negative log-likelihood / tokens), "
    "every piece of every reference sentence and its <eos> counted, teacher forcing"
)


def translate_ids(model, source_rows, decode_config, batch_size, beam_width=None,
                  phase="decode"):
    """Decode id rows (each ending in `<eos>`); returns the output ids without `<eos>`.

    Prints progress lines (`phase`, sentences and output tokens per second)
    while a long set decodes.
    """
    d = decode_config
    beam = d.beam_width if beam_width is None else beam_width
    eos = 2
    outputs = [None] * len(source_rows)
    meter = progress.Progress(f"{phase}, beam {beam}" if beam > 1 else f"{phase}, greedy",
                              "sentences", total=len(source_rows))
    for indices, batch in translate_input.length_sorted_batches(source_rows, batch_size):
        if beam == 1:
            ids, _ = greedy_decode(model, batch, bos_id=eos, eos_id=eos,
                                   max_length_ratio=d.max_length_ratio, min_extra=d.min_extra)
        else:
            ids, _ = beam_search(model, batch, bos_id=eos, eos_id=eos, beam_width=beam,
                                 alpha=d.alpha, beta=d.beta,
                                 max_length_ratio=d.max_length_ratio, min_extra=d.min_extra)
        tokens = 0
        for i, row in zip(indices, ids.numpy().tolist(), strict=True):
            end = row.index(eos) if eos in row else len(row)
            outputs[i] = [t for t in row[:end] if t != 0]
            tokens += len(outputs[i])
        meter.update(len(indices), tokens=tokens)
    meter.done()
    return outputs


def limit_lines(vocab, lines, max_pieces):
    """`lines` with each sentence of more than `max_pieces` WordPiece pieces cut to fit.

    A long sentence keeps its first whole words, as many as fit in
    `max_pieces` pieces (its `<eos>` aside). Decoding time grows with the
    source length (and the output it allows), and teacher forcing pads a
    batch to its longest sentence: one 100k-character validation line once
    held a run in validation for 12 minutes at 4 GB.

    Args:
        vocab: a `WordPieceVocabulary`.
        lines: the sentences.
        max_pieces: the most pieces kept per sentence; None: no limit.

    Returns:
        `(lines, cut)`: the new list, and the indices of the sentences cut.
    """
    lines = list(lines)
    if max_pieces is None or not lines:
        return lines, []
    cut = [i for i, row in enumerate(vocab.encode_lines(lines)) if len(row) - 1 > max_pieces]
    for i in cut:
        words = lines[i].split()
        kept, pieces = 0, 0
        for row in vocab.encode_lines(words):
            pieces += len(row) - 1
            if pieces > max_pieces:
                break
            kept += 1
        lines[i] = " ".join(words[:kept])
    return lines, cut


def limit_pairs(vocab, pairs, max_pieces, name):
    """Both sides of `pairs` cut to `max_pieces` pieces (`limit_lines`); reported on stderr.

    Returns:
        `(pairs, report)`: the cut pairs and `{"max_pieces", "sources",
        "references"}`, how many sentences of each side were cut.
    """
    pairs = list(pairs)
    sources, cut_sources = limit_lines(vocab, [s for s, _ in pairs], max_pieces)
    targets, cut_targets = limit_lines(vocab, [t for _, t in pairs], max_pieces)
    report = {"max_pieces": max_pieces, "sources": len(cut_sources),
              "references": len(cut_targets)}
    warn_truncated(name, report)
    return list(zip(sources, targets, strict=True)), report


def warn_truncated(name, report):
    """One line on stderr when sentences of `name` were cut (never silenced: it changes scores)."""
    if report["sources"] or report["references"]:
        print(f"{name}: {report['sources']} source and {report['references']} reference "
              f"sentences longer than {report['max_pieces']} pieces were cut to "
              f"{report['max_pieces']} for decoding and perplexity (data.max_eval_pieces)",
              file=sys.stderr, flush=True)


def translate_lines(model, vocab, lines, decode_config, batch_size=64, beam_width=None,
                    max_pieces=None, phase="decode"):
    """Translations of raw source lines (detokenized: pieces joined, words spaced).

    Args:
        model: a `TranslationModel`.
        vocab: the run's `WordPieceVocabulary`.
        lines: list of source sentences.
        decode_config: a `translate_config.DecodeConfig`.
        batch_size: sentences decoded together (sorted by length first).
        beam_width: overrides `decode_config.beam_width` (1: greedy).
        max_pieces: sources of more pieces are cut to their first
            `max_pieces` (None: no limit; `limit_lines` cuts at words).
        phase: the name on the progress lines.

    Returns:
        A list of strings, one per line, in order.
    """
    lines = list(lines)
    if not lines:
        return []
    rows = vocab.encode_lines(lines)
    if max_pieces is not None:
        rows = [row if len(row) - 1 <= max_pieces else row[:max_pieces] + row[-1:]
                for row in rows]
    return [vocab.decode(ids) for ids in
            translate_ids(model, rows, decode_config, batch_size, beam_width, phase)]


# One compiled evaluation step per model (and routing flag), kept while the
# model lives: a new `tf.function` per call would trace again at every
# evaluation, and batches of every length would retrace it.
_STEPS = weakref.WeakKeyDictionary()


def evaluation_step(model, routing=False):
    """The teacher-forced step of `model`: `(inputs, targets, weights)` -> `(nll, count, routings)`.

    Traced once per model: its input signature leaves the batch and length
    dimensions open, so batches of any shape reuse the one graph.
    """
    steps = _STEPS.setdefault(model, {})
    if routing not in steps:
        steps[routing] = _make_step(weakref.ref(model), routing)
    return steps[routing]


def _make_step(model_ref, with_routing):
    ids = tf.TensorSpec([None, None], tf.int32)
    signature = [{"source": ids, "target_in": ids}, ids, tf.TensorSpec([None, None], tf.float32)]

    @tf.function(input_signature=signature)
    def step(inputs, targets, weights):
        # A weak reference: the cache must not keep the model alive.
        model = model_ref()
        if with_routing:
            logits, extras = model(inputs, training=False, return_routing=True)
            routings = extras["routing"]
        else:
            logits, routings = model(inputs, training=False), {}
        nll = tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        return tf.reduce_sum(nll * weights), tf.reduce_sum(weights), routings

    return step


def evaluate_pairs(model, vocab, pairs, batch_size=64, routing=False, phase="perplexity"):
    """Perplexity per target piece of `model` on `(source, reference)` pairs.

    With `routing=True` the same forward pass also collects the routing of
    every MoE layer (inference mode) into `result["routing"]`
    (`runs.RoutingStatistics`). Long sets print progress lines (`phase`).
    """
    with_routing = routing and bool(keras_moe.monitoring.find_moe_layers(model))
    step = evaluation_step(model, with_routing)
    meter = progress.Progress(phase, "sentences", total=len(pairs) if hasattr(pairs, "__len__")
                              else None)
    total, count, stats, sentences = 0.0, 0.0, RoutingStatistics(), 0
    for inputs, targets, weights in translate_input.evaluation_batches(pairs, vocab, batch_size):
        summed, weight, routings = step(inputs, targets, weights)
        total += float(summed)
        count += float(weight)
        sentences += len(targets)
        stats.add(routings)
        meter.update(len(targets), tokens=int(weight))
    meter.done()
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
    """Translate and score `pairs`; write `out_dir/<name>.hyp`; return the scores.

    Sentences longer than `config.data.max_eval_pieces` pieces are cut for
    decoding and perplexity (`limit_pairs`; `result["truncated"]` counts
    them); BLEU and chrF compare against the whole references.
    """
    c, d = config.data, config.decode
    limited, truncated = limit_pairs(vocab, pairs, c.max_eval_pieces, name)
    result = evaluate_pairs(model, vocab, limited, c.eval_batch_size, routing=routing,
                            phase=f"{name} perplexity")
    hypotheses = translate_lines(model, vocab, [s for s, _ in limited], d, c.eval_batch_size,
                                 beam_width, phase=f"{name} decode")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.hyp")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hypotheses))
    scores = scoring.score(hypotheses, [[t for _, t in pairs]],
                           target_language=c.target_language)
    return {**scores, **result, "truncated": truncated, "hypotheses_file": path,
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
