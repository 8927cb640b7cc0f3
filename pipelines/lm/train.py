"""Train and evaluate language models: the library behind `keras-moe lm`.

`train(config, run_dir)` trains with the shared trainer
(`keras_moe.pipelines.training.trainer`: `model.fit` with the paper's
optimiser and schedule) and writes everything into `run_dir`:

```
run_dir/config.yaml          the resolved configuration (written first)
run_dir/vocab.json           the vocabulary (or wordpiece.txt)
run_dir/tensorboard/         loss, perplexity, learning rate, routing metrics
                             per MoE layer, routing histograms and bar charts
run_dir/checkpoints/         last.keras (every evaluation) and best.keras
run_dir/backup/              the backup (training/backup.py): a killed run resumes here
run_dir/history.csv          one row per evaluation
run_dir/model.keras          the final model
run_dir/results.json         final validation (and test) perplexity, wall time,
                             strategy and replicas
```

Running `train` again on the same directory with the same configuration
resumes from the backup; a different configuration is refused, and nothing
already in the directory is deleted or overwritten by a refused run.

`train.strategy` picks the `tf.distribute` strategy (see
`keras_moe.pipelines.training.distribution`): `default`; `mirrored` (the model and its
optimizer are built and compiled in the strategy's scope, `fit` splits each
configured batch, the global batch, over the replicas; with
`train.expert_parallel` each replica holds `num_experts / replicas`
experts); `tpu`; or `multi_worker`, which trains with
`keras_moe.pipelines.training.multi_worker.train` instead of `fit` (see
`trainer.train_multi_worker`).

What is particular to language models is `LanguageModelTask`: corpora read
line by line, a word or WordPiece vocabulary, the `presets` models, and
per-word perplexity over whole files.
"""

import itertools
import sys
import time

import numpy as np

from keras_moe.inference_k import set_inference_k
from keras_moe.models import presets
from keras_moe.pipelines import config as config_lib
from keras_moe.pipelines import progress
from keras_moe.pipelines.data import lm_corpora, shards
from keras_moe.pipelines.data.vocabulary import WordVocabulary
from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary
from keras_moe.pipelines.lm import inputs as lm_input
from keras_moe.pipelines.lm.config import LMConfig, tokens_per_step
from keras_moe.pipelines.training import guards, routing_checks, trainer
from keras_moe.pipelines.training.budget import TokenBudget
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.statistics import RoutingStatistics

CONVENTION = (
    "perplexity per word: exp(total negative log-likelihood / words), every word of the file "
    "and one end-of-sentence per line counted, summed over the whole file"
)


def lines_factory(data_config, split, seed=0):
    """A callable returning a fresh iterator over the lines of `split`.

    With `data.interleave_block_lines > 0` the training files (a glob or a
    directory of shards, text format) are read all at once, interleaved in
    blocks and mixed in a shuffle buffer (`data.shards.interleaved_lines`),
    so one pass over books stored whole does not train on one book at a
    time; each call (each pass) draws its own order from `seed`.
    """
    spec = getattr(data_config, split)
    if not spec:
        raise ValueError(f"`data.{split}` is empty: name a file, glob, directory or dataset")
    fmt = data_config.format
    kwargs = {"data_dir": data_config.tfds_data_dir} if fmt == "tfds" else {}
    if data_config.document_rows and fmt != "tfds":
        kwargs["blank_lines"] = True  # the document boundaries (lm_input.document_windows)
    if split == "train" and data_config.interleave_block_lines:
        files = lm_corpora.resolve_files(spec)
        passes = itertools.count()

        def interleaved():
            return shards.interleaved_lines(
                files, seed=[seed, next(passes)], block_lines=data_config.interleave_block_lines,
                buffer_lines=data_config.interleave_buffer_lines,
            )

        return interleaved

    def factory():
        return lm_corpora.iter_lines(spec, format=fmt, split=split, **kwargs)

    return factory


def first_words(factory, max_words):
    """A lines factory of the first lines of `factory`'s that hold `max_words` words.

    The slice is the shortest run of whole lines from the start whose
    whitespace words add up to at least `max_words` (the last line is kept
    whole); `max_words=0` keeps every line. The same lines every call, so
    every evaluation during training reads the same fixed slice.

    Example:

    >>> list(first_words(lambda: iter(["a b", "c d e", "f"]), 4)())
    ['a b', 'c d e']
    """
    if not max_words:
        return factory

    def limited():
        words = 0
        for line in factory():
            if words >= max_words:
                return
            yield line
            words += len(line.split())

    return limited


def check_inputs(config):
    """Fail before anything is written: the preset exists, the model's arguments
    are valid, every corpus can be read.

    The model is constructed without its weights
    (`guards.check_model_arguments`), so an argument it refuses (`k` above
    `num_experts`, a bad gating) fails before any file is written.

    The evaluation files are read through (they are small next to the
    training text, and a bad byte at their end would otherwise stop the run
    at its first evaluation); the training text is read while the
    vocabulary is built, also before the run directory is touched.
    """
    guards.check_model_arguments(
        presets.REGISTRY, config.model.preset, config.data.vocab_size, seed=config.train.seed,
        expert_parallel=config.train.expert_parallel, **config.model.overrides()
    )
    next(iter(lines_factory(config.data, "train")()))
    for split in ("valid", "test"):
        if split == "valid" or config.data.test:
            for _ in lines_factory(config.data, split)():
                pass


def build_vocabulary(config, run_dir):
    """The run's saved vocabulary, or a new one learned from the training text.

    A new vocabulary is returned unsaved (the trainer saves it once the run
    directory is prepared), so bad training text fails first.
    `run_dir=None` always learns it (the vocabulary is a deterministic
    function of the training text).
    """
    if run_dir is not None:
        try:
            return RunDir.wrap(run_dir).load_vocabulary()
        except FileNotFoundError:
            pass
    c = config.data
    lines = lines_factory(c, "train")()
    limited = (line for _, line in zip(range(c.vocab_max_lines), lines, strict=False))
    if c.vocabulary == "wordpiece":
        vocab = WordPieceVocabulary.learn(limited, c.vocab_size, learner=c.vocab_learner)
        if c.vocab_order == "frequency":
            sample = lines_factory(c, "train")()
            count = min(c.vocab_max_lines, FREQUENCY_ORDER_LINES)
            vocab = frequency_ordered(
                vocab, (line for _, line in zip(range(count), sample, strict=False))
            )
        return vocab
    # Counting the words of millions of lines takes minutes: progress lines.
    counted = progress.iterate(limited, "vocabulary: count words", "lines",
                               count=lambda line: {"words": len(line.split())})
    return WordVocabulary.build((line.split() for line in counted), c.vocab_size, c.min_count)


# Lines of the training text whose pieces are counted for `data.vocab_order: frequency`.
FREQUENCY_ORDER_LINES = 100_000


def frequency_ordered(vocab, lines):
    """`vocab` with its ids in order of frequency on `lines` (`data.vocab_order: frequency`).

    The sampled softmax draws candidates log-uniformly by id (`num_sampled`,
    as the paper's importance sampling assumes: id rank = frequency rank).
    WordPiece learners number pieces by other orders (alphabetically, by
    merge), which puts "the" near id 30,000 of 32,000 and gives the proposal
    almost nothing to do with the text. The reserved `<pad>`, `<unk>`,
    `<eos>` keep ids 0-2; the other pieces follow by count on `lines`, most
    frequent first, ties (unseen pieces included) in their old order. The
    pieces themselves, and so how text is split, do not change.

    Example:

    >>> vocab = WordPieceVocabulary(["<pad>", "<unk>", "<eos>", "a", "b", "##b"])
    >>> frequency_ordered(vocab, ["b b", "bb bb a"]).tokens
    ['<pad>', '<unk>', '<eos>', 'b', '##b', 'a']
    """
    counts = np.zeros(len(vocab), np.int64)
    for ids in lm_input.encoded_lines(lines, vocab):
        counts += np.bincount(np.asarray(ids, np.int64), minlength=len(vocab))
    reserved = 3
    rest = reserved + np.argsort(-counts[reserved:], kind="stable")
    tokens = vocab.tokens[:reserved] + [vocab.tokens[i] for i in rest]
    return WordPieceVocabulary(tokens)


def build_model(config, vocab_size, compile=True):
    """The configured model, built (and compiled unless `compile=False`).

    Call it inside the strategy's scope: the weights and the optimizer's
    variables then belong to the strategy.
    """
    return trainer.build_model(TASK, config, vocab_size, compile)


def evaluate_lines(model, lines_factory_, vocab, data_config, routing=False):
    """Per-word perplexity of `model` on every line of a corpus.

    With `routing=True` the same forward pass also collects the MoE blocks'
    routing, and the result gets a `routing` entry (see `routing_report`).
    With `data_config.document_rows` blank lines separate documents and
    count no word (they are not tokens).
    """
    words = 0
    blank_words = 0 if data_config.document_rows else 1

    def counted():
        nonlocal words
        for line in lines_factory_():
            words += lm_corpora.count_words(line) if line.strip() else blank_words
            yield line

    with_routing = routing and any(block == "moe" for block in model.blocks)
    segmented = {}
    batches = lm_input.evaluation_batches(counted(), vocab, data_config, segmented)
    total, count, stats = 0.0, 0.0, RoutingStatistics()
    for summed, weight, routings in lm_input.batch_nll(model, batches, with_routing):
        total += summed
        count += weight
        stats.add(routings)
    # The lines are all read now, so `words` is the file's word count.
    result = lm_input.perplexity_result(total, count, words)
    result["convention"] = CONVENTION
    if data_config.mode == "sentences":
        # Lines too long for one row, evaluated in segments (lm_input.sentence_segments).
        result["segmented_lines"] = segmented.get("segmented_lines", 0)
        if result["segmented_lines"]:
            print(f"{result['segmented_lines']} lines longer than "
                  f"{lm_input.MAX_EVAL_SENTENCE_TOKENS} tokens were evaluated in segments of "
                  f"{lm_input.MAX_EVAL_SENTENCE_TOKENS}", file=sys.stderr, flush=True)
    if routing:
        result["routing"] = stats.result()
    return result


def routing_report(model, lines_factory_, vocab, data_config):
    """Expert balance of every MoE block on a corpus, as the paper's Table 6 reports it.

    Routing is taken in inference mode (no noise), so Load is the number of
    positions sent to each expert. For each MoE block: CV (std / mean) of
    Importance and Load and max / mean Load, averaged over the evaluation
    batches (`batch_*`, the paper's per-batch statistics) and over the whole
    corpus (`set_*`), and the number of experts that received no position.
    `evaluate_lines(..., routing=True)` gives the same together with the
    perplexity, from one forward pass.

    Returns:
        dict block name -> statistics; empty for a model without MoE.
    """
    return evaluate_lines(model, lines_factory_, vocab, data_config, routing=True)["routing"]


class ValidationPerplexity(trainer.Validation):
    """Adds `val_loss` and `val_perplexity` (whole file, per word) to the epoch logs.

    And, from the same pass, the clean routing of every MoE block
    (`routing_checks.validation_logs`: `val_<block>_cv_load`, ...; a warning
    when it collapsed).
    """

    def __init__(self, lines_factory_, vocab, data_config):
        super().__init__()
        self.lines_factory = lines_factory_
        self.vocab = vocab
        self.data_config = data_config

    def validate(self, model):
        # The same pass gives the clean routing of every MoE block and its collapse check.
        result = evaluate_lines(model, self.lines_factory, self.vocab, self.data_config,
                                routing=True)
        return {"val_loss": result["loss"], "val_perplexity": result["perplexity"],
                **routing_checks.validation_logs(result["routing"],
                                                 routing_checks.training_step(self.model))}


class LanguageModelTask(trainer.Task):
    """The language-model pipeline's part of training (see `trainer.Task`)."""

    config_noun = "an LMConfig"
    config_class = LMConfig
    batch_keys = ("batch_size", "batch_tokens")

    def check_inputs(self, config):
        check_inputs(config)

    def build_vocabulary(self, config, run_dir):
        return build_vocabulary(config, run_dir)

    def build_model(self, config, vocab_size):
        model = presets.build_language_model(
            config.model.preset, vocab_size, seed=config.train.seed,
            expert_parallel=config.train.expert_parallel, **config.model.overrides()
        )
        model.build((None, None))
        return model

    def weighted_metrics(self, model):
        # Sampled-softmax training never builds the full logits a metric needs.
        return None if model.num_sampled else super().weighted_metrics(model)

    def training_dataset(self, config, vocab, data_config):
        # A one-pass budget (`train.max_tokens`) reads the data once: no repeat.
        return lm_input.training_dataset(
            lines_factory(data_config, "train", seed=config.train.seed), vocab, data_config,
            seed=config.train.seed, repeat=config.train.max_tokens is None,
        )

    def validation(self, config, vocab):
        # During training: the fixed slice `data.valid_max_words` (the final
        # evaluation, `evaluate_run`, reads the whole file).
        factory = first_words(lines_factory(config.data, "valid"), config.data.valid_max_words)
        validation = ValidationPerplexity(factory, vocab, config.data)
        return validation, "val_perplexity", "min"

    def extra_callbacks(self, config, run):
        """`TokenBudget` (stream mode): tokens seen in the logs and TensorBoard; `max_tokens`."""
        if config.data.mode != "stream":
            return []
        return [TokenBudget(tokens_per_step(config.data), config.train.max_tokens,
                            config.train.steps_per_eval, run.tensorboard_dir)]

    def costs(self, model):
        return presets.costs(model.get_config())

    def evaluate_run(self, config, run, model, vocab, results):
        """Final validation (and test) perplexity, and the validation routing."""
        valid = evaluate_lines(
            model, lines_factory(config.data, "valid"), vocab, config.data, routing=True
        )
        results["routing_valid"] = valid.pop("routing")
        results["valid"] = valid
        if config.data.test:
            results["test"] = evaluate_lines(
                model, lines_factory(config.data, "test"), vocab, config.data
            )


TASK = LanguageModelTask()


def train(config, run_dir, strategy=None):
    """Train the language model that `config` (an `LMConfig`) describes into `run_dir`.

    `trainer.train` with `TASK` (see it for `strategy`, the results and the errors).
    """
    return trainer.train(TASK, config, run_dir, strategy)


def load_run(run_dir):
    """The configuration, vocabulary and model of a run directory."""
    return trainer.load_run(TASK, run_dir)


def evaluate(run_dir, data, format=None, k=None):
    """Per-word perplexity of a run's model on the corpus `data`.

    Args:
        run_dir: a directory written by `train`.
        data: file, glob or directory (or what `format` expects).
        format: corpus format; default the run's `data.format`.
        k: None (the trained k), or an int: evaluate the MoE layers at `k`
            experts per position (`keras_moe.set_inference_k`).

    Returns:
        dict with `perplexity`, `loss`, `tokens`, `words`, `convention`,
        `tokens_per_second` (of the evaluation pass), `k`, `unk_tokens`, `unk_rate`,
        `unk_convention`, `data` and `model`; for a MoE model also `routing`
        (clean routing statistics per block) and `routing_check` (the collapse
        alarm on it, `routing_checks.evaluation_check`; a warning per
        collapsed block).
    """
    config, vocab, model, model_path = load_run(run_dir)
    if k is not None:
        set_inference_k(model, k)
    data_config = config_lib.from_dict(
        type(config.data), {**config_lib.to_dict(config.data), "test": data,
                            "format": format or config.data.format}
    )
    factory = lines_factory(data_config, "test")
    next(iter(factory()))  # a missing or empty corpus fails here, naming the file
    start = time.perf_counter()
    result = evaluate_lines(model, factory, vocab, data_config, routing=True)
    result["tokens_per_second"] = result["tokens"] / (time.perf_counter() - start)
    if not result["routing"]:
        del result["routing"]  # a model without MoE blocks
    else:  # the collapse alarm on this clean routing, beside the training values
        result["routing_check"] = routing_checks.evaluation_check(result["routing"], run_dir, data)
    return {**result, **unk_counts(factory, vocab), "k": k, "data": data, "model": model_path}


UNK_CONVENTION = (
    "tokens of the text outside the vocabulary are all the one <unk> token, which the model "
    "predicts like any other (the PTB convention): a text of many unseen words gets a low "
    "perplexity that says nothing about them; unk_rate is <unk> tokens / tokens, <eos> excluded"
)


def unk_counts(factory, vocab):
    """How many tokens of the text `factory()` yields are `<unk>` (`<eos>` excluded)."""
    unk_id = vocab.encode_line("\x00<not-a-word>\x00")[0]
    tokens = unk = 0
    for ids in lm_input.encoded_lines(factory(), vocab):
        tokens += len(ids) - 1
        unk += sum(1 for i in ids[:-1] if i == unk_id)
    return {"unk_tokens": unk, "unk_rate": round(unk / tokens, 6) if tokens else 0.0,
            "unk_convention": UNK_CONVENTION}
