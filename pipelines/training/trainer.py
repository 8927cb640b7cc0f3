"""The one trainer behind `keras-moe lm train` and `keras-moe translate train`.

A pipeline says what is particular to its task in a `Task`: how its inputs
are checked, how its vocabulary is learned, which model its presets build,
its training batches, its validation callback, its final evaluation and
what it adds to the results. `train(task, config, run_dir)` does the rest,
the same way for every task:

1. makes the `tf.distribute` strategy of `train.strategy` (first: the
   `multi_worker` and `tpu` strategies must start before any TensorFlow op);
2. checks the run directory (`runs.check_run_dir`: not under a file, not
   a run of the other kind), the inputs and the model's arguments (the
   task's `check_inputs` constructs the model without its weights), and
   builds the vocabulary, before the run directory is touched, so that
   bad data or a bad model argument fails without writing anything;
3. prepares the run directory (`runs.prepare_run_dir`: `config.yaml` for a
   new run, the same configuration for a resumed one) and saves the
   vocabulary;
4. builds and compiles the model inside the strategy's scope (Adam with
   the paper's `WarmupInverseSqrt` schedule: `make_optimizer`);
5. trains it with `model.fit` and the run's callbacks (`runs.run_callbacks`,
   `runs.fit_and_save`: backup and resume, validation, checkpoints,
   TensorBoard, routing), or, for `train.strategy: multi_worker`, with
   `distribution.train_multi_worker`;
6. evaluates the final model on a one-device copy and writes
   `results.json` (strict JSON).

A run that diverges (a NaN or infinite loss, weight or validation value)
raises `guards.TrainingDiverged`, and one that stops short of
`train.steps` without a budget that stopped it (its data ran out)
`guards.TrainingIncomplete`; neither writes `model.keras` or
`results.json`, and the last good backup stays (see `guards`).

`load_run(task, run_dir)` reads a run back: its configuration, vocabulary
and model.
"""

import keras

from keras_moe.models.training import TokenPerplexity, WarmupInverseSqrt
from keras_moe.pipelines import config as config_lib
from keras_moe.pipelines.data.vocabulary import check_vocabulary_matches
from keras_moe.pipelines.training import distribution, precision
from keras_moe.pipelines.training.backup import load_model_file
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.training.runs import (
    check_run_dir,
    fit_and_save,
    prepare_run_dir,
    run_callbacks,
)


class Task:
    """What a training pipeline defines; `train` does the rest.

    Subclasses set `config_class` (the run configuration's dataclass,
    with `data`, `model` and `train` sections), `config_noun` (how an
    error names it: "an LMConfig") and `batch_keys` (the
    `data` keys that size a batch: `multi_worker` divides them by the
    replicas), and implement the methods that raise `NotImplementedError`.
    """

    config_class = None
    config_noun = None
    batch_keys = ("batch_tokens",)

    def check_inputs(self, config):
        """Fail before anything is written (a bad preset or model argument, an unreadable corpus).

        Returns:
            Anything the task wants back in `prepare` and `extra_results`
            (e.g. the training data's cleaning counts); None by default.
        """
        raise NotImplementedError

    def build_vocabulary(self, config, run_dir):
        """The run's saved vocabulary, or a new one learned from the training data.

        A new vocabulary is returned unsaved (`prepare` writes it), so bad
        training text fails first. `run_dir=None` always learns it.
        """
        raise NotImplementedError

    def prepare(self, config, run, vocab, checked):
        """Prepare the run directory, then save the vocabulary; True when resuming.

        Called on the `multi_worker` chief only. `checked` is what
        `check_inputs` returned.
        """
        resumed = prepare_run_dir(config, run)
        if not resumed:
            run.save_vocabulary(vocab)
        return resumed

    def build_model(self, config, vocab_size):
        """The configured model, built (its weights created) but not compiled.

        Built at once because `backup.RunBackup` restores weights into a
        built model only. Called inside the strategy's scope.
        """
        raise NotImplementedError

    def weighted_metrics(self, model):
        """The compiled model's weighted metrics (`TokenPerplexity` by default)."""
        return [TokenPerplexity()]

    def hold_steps(self, train_config):
        """Steps the learning rate stays at its peak after warm-up (App. E; 0 by default)."""
        return 0

    def training_dataset(self, config, vocab, data_config):
        """The seeded, repeating training `tf.data.Dataset`, batched by `data_config`.

        `data_config` is `config.data`, or for `multi_worker` a copy with
        the per-replica batch size.
        """
        raise NotImplementedError

    def validation(self, config, vocab):
        """The validation callback (a `Validation`), and the log value and mode
        that `checkpoints/best.keras` keeps the best of (e.g. `("val_bleu", "max")`)."""
        raise NotImplementedError

    def extra_callbacks(self, config, run):
        """Callbacks run after the checkpoints (none by default)."""
        return []

    def extra_results(self, checked):
        """Entries the task adds to `results.json` from what `check_inputs` returned."""
        return {}

    def costs(self, model):
        """The model's parameter and operation counts for `results.json`."""
        raise NotImplementedError

    def evaluate_run(self, config, run, model, vocab, results):
        """Add the final evaluation of `model` (a one-device model) to `results`."""
        raise NotImplementedError


class Validation(keras.callbacks.Callback):
    """Base of the pipelines' validation callbacks: adds `validate`'s values to the epoch logs.

    Runs before the history logger and the checkpoints, which read the
    `val_*` values it adds (see `runs.run_callbacks`).
    """

    def validate(self, model):
        """The `val_*` values of `model` as a dict."""
        raise NotImplementedError

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        # An expert-parallel model is evaluated through its one-device copy.
        logs.update(self.validate(distribution.evaluation_model(self.model)))


def make_optimizer(train_config, hold_steps=0):
    """Adam (or `train.optimizer`'s choice) with the paper's schedule, from the `train` section.

    Args:
        train_config: the configuration's `train` section (`learning_rate`,
            `warmup_steps`, `decay`, `beta_1`, `beta_2`, `epsilon`, `clipnorm`).
        hold_steps: steps at the peak rate before the decay (App. E's
            translation schedule; 0 for the language models, App. C.1).

    With `train.expert_parallel` the Adam is wrapped in
    `keras_moe.ExpertParallelOptimizer` (the explicit opt-in that keeps each
    replica's expert shards out of the gradient all-reduce).
    """
    t = train_config
    schedule = WarmupInverseSqrt(t.learning_rate, t.warmup_steps, t.decay, hold_steps=hold_steps)
    # `train.optimizer`: Adam, or App. D's FactoredAdam (precision.make).
    return distribution.expert_parallel_optimizer(precision.make(t, schedule), t.expert_parallel)


def build_model(task, config, vocab_size, compile=True):
    """The task's model, built, and compiled unless `compile=False`.

    Call it inside the strategy's scope: the weights and the optimizer's
    variables then belong to the strategy.
    """
    # `train.mixed_precision`: the policy every layer takes while built.
    with precision.policy_scope(config.train.mixed_precision):
        model = task.build_model(config, vocab_size)
        if not compile:
            return model
        model.compile(
            optimizer=make_optimizer(config.train, task.hold_steps(config.train)),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            ),
            weighted_metrics=task.weighted_metrics(model),
        )
    return model


def check_config(task, config):
    """TypeError unless `config` is the task's configuration class."""
    if not isinstance(config, task.config_class):
        raise TypeError(
            f"`config` must be {task.config_noun}. Received: {type(config).__name__}"
        )


def train(task, config, run_dir, strategy=None):
    """Train the model `config` describes; write the run into `run_dir`.

    Args:
        task: the pipeline's `Task`.
        config: a `task.config_class`.
        run_dir: the run directory, a `RunDir` or a path (created; resumed
            when it holds a backup of the same configuration).
        strategy: optional `tf.distribute.Strategy` of `train.strategy`,
            already made (`distribution.make_strategy`); None makes it.

    Returns:
        The results dict also written to `run_dir/results.json` (on a
        non-chief `multi_worker` task: `chief`, `task` and `steps` only).

    Raises:
        FileNotFoundError, ValueError: naming the file or key at fault;
            raised before the run directory is touched.
        guards.TrainingDiverged, guards.TrainingIncomplete: the run
            diverged, or stopped short of `train.steps` (see `guards`).
    """
    check_config(task, config)
    run = RunDir.wrap(run_dir)
    check_run_dir(config, run)
    t = config.train
    if strategy is None:
        # First: `multi_worker` and `tpu` must start before any TensorFlow op.
        strategy = distribution.make_strategy(t.strategy)
    if t.strategy == "multi_worker":
        return train_multi_worker(task, config, run, strategy)
    checked = task.check_inputs(config)
    vocab = task.build_vocabulary(config, run)
    resumed = task.prepare(config, run, vocab, checked)
    keras.utils.set_random_seed(t.seed)
    with strategy.scope():
        model = build_model(task, config, len(vocab))
    distribution.check_model(model, t.strategy)
    distribution.attach_evaluation_copy(model, t.strategy)
    dataset = task.training_dataset(config, vocab, config.data)
    validation, monitor, mode = task.validation(config, vocab)
    callbacks = run_callbacks(run, model, t, validation, monitor, mode,
                              task.extra_callbacks(config, run))
    fitted = fit_and_save(model, dataset, t, callbacks, run.path)
    results = {
        "preset": config.model.preset,
        "resumed": resumed,
        "steps": fitted["steps"],
        "train_seconds": fitted["train_seconds"],
        "elapsed_minutes": fitted["elapsed_minutes"],
        "strategy": t.strategy,
        "replicas": int(strategy.num_replicas_in_sync),
        **task.extra_results(checked),
        "costs": task.costs(model),
        "history": fitted["history"],
        **({"recovered": fitted["recovered"]} if "recovered" in fitted else {}),
    }
    return finish(task, config, run, distribution.evaluation_model(model), vocab, results)


def finish(task, config, run, model, vocab, results):
    """The task's final evaluation of `model` into `results`; write `results.json`."""
    task.evaluate_run(config, run, model, vocab, results)
    return run.write_results(results)


def train_multi_worker(task, config, run_dir, strategy):
    """`train` under `MultiWorkerMirroredStrategy`: `distribution.train_multi_worker`, not `fit`.

    Every worker runs the same command with its own `TF_CONFIG`, checks the
    inputs and learns the same vocabulary. Each reads the training data
    through the task's seeded `training_dataset` built with the per-replica
    batch (`task.batch_keys` divided by the replicas) and keeps every n-th
    batch. The model and Adam are created under the strategy's scope; the
    objective is the loop's (weighted token losses summed over the global
    batch, divided by its number of positions, padding included, plus the
    balancing losses).

    Checkpoints go to `run_dir/checkpoints/multi_worker` every
    `train.steps_per_eval` steps (shared by every worker); a killed run
    started again with the same command resumes from the last one. Not in
    this path: validation during training, `backup.RunBackup`, the
    `.keras` checkpoints, `history.csv`, `RoutingMonitor`, the task's extra
    callbacks and `train.time_limit_minutes`.

    Only the chief (task 0) writes the run directory: `config.yaml`, the
    vocabulary (and what `task.prepare` adds), `tensorboard/train` (loss,
    balancing loss and perplexity every `train.monitor_every_n_steps`
    steps), and after training `model.keras` and `results.json` (the
    task's final evaluation, on a one-device copy). The other workers write
    only the loop's temporary checkpoints and wait for the chief's
    evaluation before they exit.
    """
    run = RunDir.wrap(run_dir)
    check_run_dir(config, run)
    t = config.train
    chief = distribution.is_chief(strategy)
    checked = task.check_inputs(config)
    # Every worker learns the same vocabulary; only the chief reads or writes the run.
    vocab = task.build_vocabulary(config, run if chief else None)
    resumed = task.prepare(config, run, vocab, checked) if chief else False

    def build():
        model = build_model(task, config, len(vocab), compile=False)
        return model, make_optimizer(t, task.hold_steps(t))

    def make_dataset(data_config):
        return task.training_dataset(config, vocab, data_config)

    model, results = distribution.train_multi_worker(
        config, run.path, strategy, build, make_dataset, task.batch_keys, resumed
    )
    if chief:
        results.update(task.extra_results(checked))
        results["costs"] = task.costs(model)
        results = finish(task, config, run, distribution.evaluation_model(model), vocab, results)
    distribution.barrier(strategy)
    return results


def load_run(task, run_dir):
    """The configuration, vocabulary and model of a run directory.

    Returns:
        `(config, vocab, model, model_path)`: the model is `model.keras`,
        or the last checkpoint of an unfinished run, loaded uncompiled.

    Raises:
        FileNotFoundError: naming the directory when it is not a run, or
            holds no model or no vocabulary.
        ValueError: when the vocabulary does not fit the model, or the
            model file is corrupt (naming it).
    """
    run = RunDir.wrap(run_dir)
    run.check_is_run()
    config = config_lib.load_config(task.config_class, run.config_file)
    vocab = run.load_vocabulary()
    model_path = run.find_model()
    model = load_model_file(model_path, compile=False)
    check_vocabulary_matches(vocab, model.vocab_size, model_path)
    return config, vocab, model, model_path
