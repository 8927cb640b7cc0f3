"""Train, evaluate and use translation models: the library behind `keras-moe translate`.

`train(config, run_dir)` trains with the shared trainer
(`keras_moe.pipelines.training.trainer`: `model.fit` with App. E's
optimiser and schedule) and writes everything into `run_dir`:

```
run_dir/config.yaml              the resolved configuration (written first)
run_dir/cleaning.json            pairs read, kept, and dropped per reason
run_dir/wordpiece.txt            the shared source/target vocabulary
run_dir/tensorboard/             loss, perplexity, BLEU, chrF, learning rate, routing
                                 metrics per MoE layer, routing histograms and bar charts
run_dir/checkpoints/             last.keras, best.keras (by validation BLEU) and the
                                 last `keep_checkpoints` step-N.weights.h5 for averaging
run_dir/backup/                  the backup (training/backup.py): a killed run resumes here
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
`keras_moe.pipelines.training.multi_worker.train` (see
`trainer.train_multi_worker`; not in that path besides the language models'
list: validation BLEU, the `step-N.weights.h5` checkpoints, so no
checkpoint averaging, and early stopping).

What is particular to translation is `TranslationTask`: cleaned parallel
corpora, one shared WordPiece vocabulary, the `translation_presets` models,
validation BLEU, and the final scores of the (checkpoint-averaged) model.
"""


import json
import os
import sys
import time

import keras
import numpy as np

from keras_moe.inference_k import set_inference_k
from keras_moe.models import translation_presets
from keras_moe.pipelines import progress
from keras_moe.pipelines.data import parallel_corpora
from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary
from keras_moe.pipelines.training import guards, routing_checks, trainer
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import scoring
from keras_moe.pipelines.translate.config import TranslateConfig

# Re-exported: the evaluation half of the pipeline lives in translate.evaluation.
from keras_moe.pipelines.translate.evaluation import (  # noqa: F401
    CONVENTION,
    KeepLastCheckpoints,
    ValidationScores,
    average_checkpoints,
    averaged_model,
    evaluate_pairs,
    limit_lines,
    limit_pairs,
    score_split,
    step_checkpoints,
    translate_ids,
    translate_lines,
)


def check_inputs(config):
    """Fail before anything is written: the preset exists, every corpus can be read.

    The model is constructed without its weights
    (`guards.check_model_arguments`), so an argument it refuses fails
    before any file is written. Reads the training pairs through once
    (their cleaning counts are the result) and the validation and test
    pairs whole.

    Returns:
        The training data's `parallel_corpora.CleaningCounts`.
    """
    guards.check_model_arguments(
        translation_presets.REGISTRY, config.model.preset, config.data.vocab_size,
        seed=config.train.seed, expert_parallel=config.train.expert_parallel,
        **config.model.overrides()
    )
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
    saved = None if run_dir is None else RunDir.wrap(run_dir).wordpiece_file
    if saved is not None and os.path.exists(saved):
        return WordPieceVocabulary.load(saved)
    c = config.data
    pairs = translate_input.pairs_factory(c, "train")()
    sample = (line for _, pair in zip(range(c.vocab_max_pairs), pairs, strict=False)
              for line in pair)
    if c.vocab_learner == "tokenizers":
        return WordPieceVocabulary.learn(
            sample, c.vocab_size, max_lines=2 * c.vocab_max_pairs, learner="tokenizers")
    return WordPieceVocabulary.learn(
        sample, c.vocab_size, max_lines=2 * c.vocab_max_pairs, num_iterations=c.vocab_iterations,
        max_input_tokens=c.vocab_max_words or -1,
    )


def build_model(config, vocab_size, compile=True):
    """The preset's `TranslationModel` with the overrides, built (and compiled).

    Call it inside the strategy's scope.
    """
    return trainer.build_model(TASK, config, vocab_size, compile)


def _valid_pairs(config):
    return list(translate_input.pairs_factory(config.data, "valid")())


class TranslationTask(trainer.Task):
    """The translation pipeline's part of training (see `trainer.Task`)."""

    config_noun = "a TranslateConfig"
    config_class = TranslateConfig
    batch_keys = ("batch_tokens",)

    def check_inputs(self, config):
        return check_inputs(config)

    def build_vocabulary(self, config, run_dir):
        return build_vocabulary(config, run_dir)

    def prepare(self, config, run, vocab, counts):
        """The run directory and vocabulary, then `cleaning.json`; True when resuming."""
        resumed = super().prepare(config, run, vocab, counts)
        run.write_json(run.cleaning_file, {**vars(counts), "summary": counts.summary()})
        progress.emit(f"[cleaning] training pairs: {counts.summary()}")
        return resumed

    def build_model(self, config, vocab_size):
        t = config.train
        model = translation_presets.build_translation_model(
            config.model.preset, vocab_size, seed=t.seed, expert_parallel=t.expert_parallel,
            **config.model.overrides()
        )
        # The constructor builds every weight; an expert-parallel model cannot
        # be called outside the replicas, so it skips this first call.
        if not t.expert_parallel:
            model((np.full((1, 2), 2, np.int32), np.full((1, 2), 2, np.int32)))
        return model

    def hold_steps(self, train_config):
        return train_config.hold_steps

    def training_dataset(self, config, vocab, data_config):
        return translate_input.training_dataset(
            translate_input.pairs_factory(data_config, "train"), vocab, data_config,
            seed=config.train.seed,
        )

    def validation(self, config, vocab):
        # Overlong sentences cut once, here: `ValidationScores` decodes them
        # at every evaluation.
        pairs, _ = limit_pairs(vocab, _valid_pairs(config), config.data.max_eval_pieces,
                               "validation")
        validation = ValidationScores(
            pairs, vocab, config.decode, config.data.eval_batch_size,
            config.data.valid_bleu_sentences, config.decode.valid_beam_width,
            config.data.target_language,
        )
        return validation, "val_bleu", "max"

    def extra_callbacks(self, config, run):
        t = config.train
        extra = [KeepLastCheckpoints(run.checkpoints_dir, t.keep_checkpoints)]
        if t.early_stopping_patience:
            extra.append(keras.callbacks.EarlyStopping(
                monitor="val_bleu", mode="max", patience=t.early_stopping_patience))
        return extra

    def extra_results(self, counts):
        return {"cleaning": vars(counts)}

    def costs(self, model):
        return translation_presets.costs(model.get_config())

    def evaluate_run(self, config, run, model, vocab, results):
        """Final scores of `model` (or its checkpoint average), hypotheses in `translations/`."""
        evaluated = averaged_model(model, run, config.decode.average_checkpoints)
        # How many step checkpoints the evaluated weights average (0: the final weights).
        results["averaged_checkpoints"] = getattr(evaluated, "averaged_checkpoints", 0)
        # The preset and what this run changed in it, explicitly.
        results["model"] = {"preset": config.model.preset,
                            "preset_overrides": config.model.overrides()}
        out_dir = run.translations_dir
        valid = score_split(evaluated, vocab, config, _valid_pairs(config), "valid", out_dir,
                            routing=True)
        results["routing_valid"] = valid.pop("routing")
        results["valid"] = valid
        if config.data.test:
            test_pairs = list(translate_input.pairs_factory(config.data, "test")())
            results["test"] = score_split(evaluated, vocab, config, test_pairs, "test", out_dir)


TASK = TranslationTask()


def train(config, run_dir, strategy=None):
    """Train the translation model that `config` (a `TranslateConfig`) describes into `run_dir`.

    `trainer.train` with `TASK` (see it for `strategy`, the results and the errors).
    """
    return trainer.train(TASK, config, run_dir, strategy)


def load_run(run_dir, average=None):
    """The configuration, vocabulary and model of a run directory.

    Args:
        run_dir: a directory written by `train`.
        average: None (the run's `decode.average_checkpoints`), 0 or an int:
            evaluate the mean of the last N step checkpoints.
    """
    config, vocab, model, model_path = trainer.load_run(TASK, run_dir)
    average = config.decode.average_checkpoints if average is None else average
    return config, vocab, averaged_model(model, run_dir, average), model_path


def evaluate(run_dir, source, references, beam_width=None, average=None, out=None, k=None):
    """Translate `source` with a run's model and score it against `references`.

    Args:
        run_dir: a directory written by `train`.
        source: the source file (text, `.gz` or `.sgm`).
        references: list of reference files, each with one line per source line.
        beam_width: None (the run's `decode.beam_width`) or an int (1: greedy).
        average: checkpoint averaging (see `load_run`).
        out: hypotheses file (default `run_dir/eval/<source name>.hyp`); the
            scores are written next to it as `.json`.
        k: None (the trained k), or an int: decode and score with the MoE
            layers at `k` experts per position (`keras_moe.set_inference_k`).

    Returns:
        dict with `bleu`, `bleu_signature`, `bleu_tokenized`,
        `bleu_tokenized_convention`, `chrf`, `chrf_signature`, `perplexity`
        (against the first reference), `hypotheses_file`, `k`,
        `sentences_per_second` (decoding) and `tokens_per_second` (the scoring
        pass over the reference tokens) and more; for a MoE model `routing`
        and `routing_check` (the collapse alarm on the clean routing of every
        MoE layer, `routing_checks.evaluation_check`).
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
    if k is not None:
        set_inference_k(model, k)
    d = config.decode
    beam = d.beam_width if beam_width is None else beam_width
    limited, truncated = limit_pairs(vocab, zip(sources, streams[0], strict=True),
                                     config.data.max_eval_pieces, source)
    start = time.perf_counter()
    hypotheses = translate_lines(model, vocab, [s for s, _ in limited], d,
                                 config.data.eval_batch_size, beam)
    decoding_seconds = time.perf_counter() - start
    out = out or RunDir.wrap(run_dir).eval_hypotheses(source)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hypotheses))
    scores = scoring.score(hypotheses, streams, target_language=config.data.target_language)
    start = time.perf_counter()
    result = evaluate_pairs(model, vocab, limited, config.data.eval_batch_size, routing=True)
    result["tokens_per_second"] = result["tokens"] / (time.perf_counter() - start)
    result["sentences_per_second"] = len(limited) / decoding_seconds
    if not result["routing"]:
        del result["routing"]
    else:  # the collapse alarm on this clean routing, beside the training values
        result["routing_check"] = routing_checks.evaluation_check(result["routing"], run_dir,
                                                                  source)
    result = {**scores, **result, "truncated": truncated, "k": k, "beam_width": beam,
              "source": source,
              "references": list(references), "hypotheses_file": out, "model": model_path}
    with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def run(run_dir, lines, beam_width=None, chunk=64):
    """Translate an iterable of lines chunk by chunk; yields one translation per line.

    Lines of more than `data.max_eval_pieces` pieces are cut to them (a note
    on stderr counts them).
    """
    config, vocab, model, _ = load_run(run_dir)
    lines = iter(lines)
    while batch := [line.rstrip("\n") for _, line in zip(range(chunk), lines, strict=False)]:
        batch, cut = limit_lines(vocab, batch, config.data.max_eval_pieces)
        if cut:
            print(f"{len(cut)} input lines longer than {config.data.max_eval_pieces} pieces "
                  "were cut to them (data.max_eval_pieces)", file=sys.stderr, flush=True)
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
