"""What every training pipeline does with its run directory and its routing.

Used by the one trainer (`keras_moe.pipelines.training.trainer`) that both
pipelines train with; every path comes from `rundir.RunDir`:

- `prepare_run_dir`: write the resolved `config.yaml` first, or check that a
  resumed run has the same configuration (nothing is deleted or overwritten
  by a refused run); a finished run asked for more `train.steps`, or
  stopped by its time limit and given a larger one, goes on from its last
  step (`extend_finished_run`);
- `check_run_dir`: refuse a directory the run cannot use (under a file,
  or holding a run of the other kind) before anything is read or written;
- `run_callbacks`: the callbacks of every run (time limit, the pipeline's
  validation, the divergence guard, backup, history, checkpoints,
  TensorBoard, routing), in the order they must run;
- `fit_and_save`: `model.fit` in evaluation-long epochs, resumed from the
  run's backup (`backup.py`; a corrupt one is set aside for the newest
  intact checkpoint), then `model.keras`, only for a run that made its
  steps (`guards.check_finished`);
- `TrainingClock`: the run's training time, counted across resumes and
  continuations, logged as `elapsed_minutes`, and its limit (the end at
  `train.steps` exactly is `budget.StepLimit`);
- `HistoryLogger`: `history.csv`, one row per evaluation, columns kept
  aligned when a resumed run logs other values.

The balance statistics of an evaluation set are
`keras_moe.statistics.RoutingStatistics`.
"""

import csv
import dataclasses
import io
import json
import os
import time

import keras
import yaml

from keras_moe import RoutingMonitor
from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines import config as config_lib
from keras_moe.pipelines.training import guards
from keras_moe.pipelines.training.backup import (  # noqa: F401 (write_backup, resume_step: API)
    BatchSummaries,
    backup_and_restore,
    load_model_file,
    recover_backup,
    remove_backup,
    resume_point,
    resume_step,
    write_backup,
)
from keras_moe.pipelines.training.budget import StepLimit, TokenBudget
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.training.step_progress import StepProgress
from keras_moe.pipelines.training.summaries import RunSummaries

# Keys that only steer how a run is executed: a resumed run may change them.
RUN_CONTROL_KEYS = ("time_limit_minutes", "time_limit_at_evaluation", "verbose")


def _comparable(config):
    data = config_lib.to_dict(config)
    for key in RUN_CONTROL_KEYS:
        data["train"].pop(key, None)
    return data


def _run_kind(sections):
    # A translation configuration alone has a `decode` section.
    return "translation" if "decode" in sections else "language-model"


def check_run_dir(config, run_dir):
    """Refuse a run directory that `config`'s run cannot use, before anything is read or written.

    Raises:
        ValueError: naming the directory, when it cannot be created (a
            regular file on its path), or holds a run of another kind (a
            language-model run where a translation run is started, or the
            other way round).
    """
    run = RunDir.wrap(run_dir)
    run.check_creatable()
    if not run.is_run():
        return
    try:
        with open(run.config_file, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return  # `prepare_run_dir` names what is wrong with it
    if not isinstance(saved, dict):
        return
    wanted = [field.name for field in dataclasses.fields(config)]
    held, kind = _run_kind(saved), _run_kind(wanted)
    if held != kind:
        raise ValueError(
            f"{run.path}: this directory holds a {held} run; a {kind} run needs its own "
            "--run-dir"
        )


def prepare_run_dir(config, run_dir):
    """Create `run_dir` and write `config.yaml`, or check it for a resumed run.

    Args:
        config: a run configuration (a dataclass tree with a `train`
            section); a saved one is read back as the same class.
        run_dir: the run directory (a `RunDir` or a path).

    Returns:
        True when the directory already held this run (it resumes), or a
        finished run that `config` extends (see `extend_finished_run`).

    Raises:
        ValueError: the directory holds a finished run that `config` does not
            extend, or a different configuration (`train.time_limit_minutes`
            and `train.verbose` may change between a run and its resumption).
    """
    run = RunDir.wrap(run_dir)
    path = run.config_file
    if run.is_finished():
        extend_finished_run(config, run.path)
        return True
    resumed = run.is_run()
    if resumed:
        saved = config_lib.load_config(type(config), path)
        if _comparable(saved) != _comparable(config):
            raise ValueError(
                f"{path}: the run directory holds a different configuration; resume with the "
                "same configuration (only train.time_limit_minutes, train.time_limit_at_evaluation "
                "and train.verbose may change) or choose a new --run-dir"
            )
    run.makedirs()
    config_lib.save_config(config, path)
    return resumed


def run_callbacks(run_dir, model, train, validation, monitor, mode, extra=()):
    """The callbacks of a training run, in the order they must run.

    Args:
        run_dir: the run directory (a `RunDir` or a path); `backup/`,
            `checkpoints/`, `tensorboard/` and `history.csv` go into it.
        model: the model being trained; a `RoutingMonitor` is added when it
            has MoE layers.
        train: the config's `train` section (`monitor_every_n_steps`,
            `time_limit_minutes`: a limit on the run's training time, resumes
            and continuations included).
        validation: the pipeline's validation callback; it adds the `val_*`
            values that the logger, checkpoints and `extra` read.
        monitor, mode: the validation value `checkpoints/best.keras` keeps
            the best of (`"val_perplexity"`, `"min"`; `"val_bleu"`, `"max"`).
        extra: further callbacks, run after the checkpoints.

    Returns:
        A list of callbacks for `model.fit`.
    """
    run = RunDir.wrap(run_dir)
    log_dir = run.tensorboard_dir
    os.makedirs(run.checkpoints_dir, exist_ok=True)
    clock = TrainingClock(run, train.time_limit_minutes,
                          # A `train` object of an older shape has no such key: off.
                          at_evaluation=getattr(train, "time_limit_at_evaluation", False))
    callbacks = [
        # First at an epoch's end: the time is noted before the backup of that
        # step is written, so a resumed run always finds its step's time.
        clock,
        StepLimit(train.steps),
        # Before the guard, the logger and checkpoints, which read the values it adds.
        validation,
        # After the validation (it logs val_* by tokens), before the guard,
        # the backup and the logger: it adds `tokens` to the logs, and puts
        # back the optimizer step that a batch finding no data still counts.
        *[c for c in extra if isinstance(c, TokenBudget)],
        # Before the backup and the checkpoints: a step whose loss, weights
        # or validation values are not finite raises here, so nothing is
        # saved from it and a restart resumes the last good backup.
        guards.DivergenceGuard(run.path),
        # The callbacks above do nothing when training begins, so the
        # backup is restored before anything reads the model.
        backup_and_restore(run.path),
        HistoryLogger(run.history_file),
        keras.callbacks.ModelCheckpoint(run.last_checkpoint),
        keras.callbacks.ModelCheckpoint(
            run.best_checkpoint, monitor=monitor, mode=mode,
            save_best_only=True,
        ),
        *[c for c in extra if not isinstance(c, TokenBudget)],
        # `batch_*` and every evaluation's `epoch_*` curves, at the optimizer's step.
        RunSummaries(log_dir, every_n_steps=train.monitor_every_n_steps),
        # Steps, loss, rates and evaluations (fit itself runs with verbose=0).
        StepProgress(train.steps, train.verbose, time_limit_minutes=train.time_limit_minutes,
                     elapsed=clock.elapsed_seconds),
    ]
    if find_moe_layers(model):
        callbacks.append(RoutingMonitor(log_dir, every_n_steps=train.monitor_every_n_steps))
    return callbacks


def fit_and_save(model, dataset, train, callbacks, run_dir):
    """Train `model` to `train.steps`, then save it as `run_dir/model.keras`.

    One Keras epoch is `train.steps_per_eval` steps, so validation,
    checkpoints and the backup happen at every epoch's end; a resumed run
    starts again at the epoch its backup recorded (`fit`'s `initial_epoch`;
    the `RunBackup` among `callbacks` restores the weights and optimizer),
    and at the batch of `dataset` it had reached: the batches its backup's
    steps took are skipped (drawn and dropped: the data order, shuffles
    included, is that of one uninterrupted run, since `dataset` is seeded).
    Once `model.keras` is written the backup is removed.

    A corrupt backup (unreadable weights or metadata) is first set aside,
    kept, and the newest intact checkpoint made the backup
    (`backup.recover_backup`; what it did is printed and returned as
    `recovered`). After `fit`, a run short of `train.steps` that no
    callback stopped on purpose raises `guards.TrainingIncomplete`, and
    weights that are not finite `guards.TrainingDiverged`: then no
    `model.keras` is written, and the backup is kept.

    Returns:
        The `steps`, `train_seconds`, `elapsed_minutes` and `history`
        entries of the run's results (`steps`: the optimizer's step count,
        resumed steps included; `train_seconds`: this call's `fit`;
        `elapsed_minutes`: the run's training time, resumes included; None
        when `callbacks` hold no `TrainingClock`); with `recovered` (the
        message) when a corrupt backup was replaced.

    Raises:
        guards.TrainingDiverged, guards.TrainingIncomplete: see above.
        ValueError: naming the files, when the backup is corrupt and no
            intact checkpoint is left to resume from.
    """
    start = time.time()
    recovered = recover_backup(run_dir, train.steps_per_eval)
    epoch, done = resume_point(run_dir, train.steps_per_eval)
    if done:
        dataset = dataset.skip(done)
    history = model.fit(
        dataset, epochs=-(-train.steps // train.steps_per_eval), initial_epoch=epoch,
        steps_per_epoch=train.steps_per_eval, callbacks=callbacks, verbose=0,
        shuffle=False,  # the dataset shuffles itself
    )
    train_seconds = time.time() - start
    steps = int(model.optimizer.iterations.numpy())
    guards.check_finished(steps, train.steps, callbacks)
    guards.check_weights(model, steps)
    model.save(RunDir.wrap(run_dir).model_file)
    # Only now: a kill before model.keras is whole still finds the backup.
    remove_backup(run_dir)
    clocks = [c for c in callbacks if isinstance(c, TrainingClock)]
    return {
        **({"recovered": recovered} if recovered else {}),
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "elapsed_minutes": round(clocks[0].elapsed_seconds() / 60.0, 2) if clocks else None,
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
    }


def extend_finished_run(config, run_dir):
    """Make a finished run resumable, so that training goes on to `config.train.steps`.

    Allowed when `config` equals the run's `config.yaml` (the keys a
    resumption may change aside) and asks for more steps than the run made:
    either a larger `train.steps`, or the same `train.steps` for a run that
    its `train.time_limit_minutes` stopped short of them (inside a round,
    or at an evaluation with `train.time_limit_at_evaluation`; see
    `TrainingClock.limit_stopped`), with a larger limit. The finished
    `model.keras` (weights and optimizer state) becomes the backup that
    `RunBackup` resumes from, at the evaluation round
    its step count reached; the learning-rate schedule goes on from the
    optimizer's step, so the continued run is the longer run. A run stopped
    inside an evaluation round goes on from its step: its next evaluations
    come every `train.steps_per_eval` steps from there, and the last round
    is cut at `train.steps` (`StepLimit`; `history.csv` has each
    evaluation's `step`). Nothing is lost: the finished run's `model.keras`
    and `results.json` are kept as `model-step-N.keras` and
    `results-step-N.json` (N its steps), and `history.csv` and TensorBoard
    go on appending. Interrupted after this, the run resumes as any other.

    Raises:
        ValueError: naming the run directory, when `config` does not extend
            the finished run or its time limit would stop it at once;
            nothing is changed then.
    """
    run = RunDir.wrap(run_dir)
    path, finished = run.config_file, run.model_file
    saved = config_lib.load_config(type(config), path)
    old, new = _comparable(saved), _comparable(config)
    old_steps, new_steps = old["train"].pop("steps"), new["train"].pop("steps")
    seconds = TrainingClock.noted_seconds(run_dir)
    timed_out = TrainingClock.limit_stopped(run_dir, saved.train.time_limit_minutes,
                                            saved.train.time_limit_at_evaluation)
    steps = None  # the finished run's, read below from its model
    if old == new and (new_steps > old_steps or (new_steps == old_steps and timed_out)):
        model = load_model_file(finished)
        steps = int(model.optimizer.iterations.numpy())
    if steps is None or new_steps <= steps:
        stopped = "" if steps is None else f", stopped at step {steps}"
        raise ValueError(
            f"{run_dir}: holds a finished run (model.keras, train.steps={old_steps}{stopped}); "
            "choose a new --run-dir, or continue it with the same configuration and a larger "
            "train.steps (or, when its time limit stopped it, a larger train.time_limit_minutes)"
        )
    new_limit = config.train.time_limit_minutes
    if new_limit is not None and seconds is not None and seconds >= 60.0 * new_limit:
        raise ValueError(
            f"{run_dir}: train.time_limit_minutes={new_limit:g} is spent already (the run has "
            f"trained {seconds / 60.0:.1f} minutes); raise it to continue the run"
        )
    write_backup(model, run_dir, config.train.steps_per_eval)
    config_lib.save_config(config, path)
    # Last: until model.keras is renamed, running the command again redoes the above.
    for kept in (run.results_file, run.model_file):
        if os.path.exists(kept):
            os.replace(kept, run.finished_copy(kept, steps))


class TrainingClock(keras.callbacks.Callback):
    """The run's training time, across resumes and continuations; its limit.

    Wall time counts from the start of `fit` (validation included, as it
    is part of what a run costs). At every evaluation the run's time so far
    is written to `run_dir/elapsed.json` under the optimizer's step and
    added to the logs as `elapsed_minutes` (so `history.csv` and
    TensorBoard show quality against time). A resumed or continued run
    starts from the time noted at the step it resumes from: the steps lost
    to a kill are not counted, the steps kept are, and a run spread over
    several sittings reports the time of one uninterrupted run.

    Args:
        run_dir: the run directory, a `RunDir` or a path (`elapsed.json`
            goes there).
        limit_minutes: optional; training stops after the batch during which
            the run's time passes it (then the run is evaluated and saved,
            and `budget_reached` is True: a legitimate early stop, see
            `guards.check_finished`).
        at_evaluation: with a limit, also stop at an evaluation when the
            next evaluation round, as long as the last one this sitting,
            would pass the limit. A run stopped there resumes at a round
            boundary, so it evaluates at the same steps as an uninterrupted
            run (a run stopped inside a round evaluates every
            `steps_per_eval` steps from where it resumed). The batch-level
            stop stays as the hard limit.
        clock: a function returning seconds (for tests); `time.monotonic`.
    """

    def __init__(self, run_dir, limit_minutes=None, clock=time.monotonic, at_evaluation=False):
        super().__init__()
        self.run = RunDir.wrap(run_dir)
        self.path = self.run.elapsed_file
        self.limit = None if limit_minutes is None else limit_minutes * 60.0
        self.clock = clock
        self.start = None
        self.base = None  # seconds noted at the step this fit resumed from
        self.noted = {}  # step -> seconds, as in elapsed.json
        self.stopped_at_step = None
        self.budget_reached = False  # set when the limit stops training
        self.at_evaluation = at_evaluation
        self.round_start = None  # this sitting's last evaluation (or its start), in run seconds

    def elapsed_seconds(self):
        """The run's training time so far (0 before `fit` has started)."""
        if self.start is None:
            return 0.0
        return (self.base or 0.0) + self.clock() - self.start

    @staticmethod
    def read_noted(run_dir):
        """`run_dir/elapsed.json` as {step: seconds}; empty when there is none."""
        run = RunDir.wrap(run_dir)
        noted = run.read_json(run.elapsed_file) or {}
        return {int(step): seconds for step, seconds in noted.items()}

    @staticmethod
    def noted_seconds(run_dir):
        """The training time noted at the run's last evaluation, or None."""
        noted = TrainingClock.read_noted(run_dir)
        return noted[max(noted)] if noted else None

    @staticmethod
    def next_round_passes(seconds, round_seconds, limit_seconds):
        """The stop at an evaluation: the round just ended predicts the next one."""
        return seconds + round_seconds > limit_seconds

    @staticmethod
    def limit_stopped(run_dir, limit_minutes, at_evaluation=False):
        """Whether a run's time limit stopped it, read from its `elapsed.json`.

        The time at its last evaluation passed `limit_minutes` (the batch-level
        stop), or, with `at_evaluation`, that time plus its last round's would have.
        """
        noted = TrainingClock.read_noted(run_dir)
        if limit_minutes is None or not noted:
            return False
        steps, limit = sorted(noted), 60.0 * limit_minutes
        seconds = noted[steps[-1]]
        previous = noted[steps[-2]] if len(steps) > 1 else 0.0
        return seconds >= limit or (bool(at_evaluation) and TrainingClock.next_round_passes(
            seconds, seconds - previous, limit))

    def on_train_begin(self, logs=None):
        self.start = self.clock()
        self.base = None
        self.round_start = None
        self.budget_reached = False
        self.noted = self.read_noted(self.run)

    def on_train_batch_begin(self, batch, logs=None):
        if self.base is None:
            # Here, not at train begin: by the first batch the backup (and
            # with it the optimizer's step) has been restored.
            step = int(self.model.optimizer.iterations.numpy())
            earlier = [s for s in self.noted if s <= step]
            self.base = self.noted[max(earlier)] if earlier else 0.0
            self.round_start = self.elapsed_seconds()

    def on_train_batch_end(self, batch, logs=None):
        if (self.limit is not None and self.elapsed_seconds() > self.limit
                and not self.model.stop_training):
            self.model.stop_training = True
            self.stopped_at_step = int(self.model.optimizer.iterations.numpy())
            self.budget_reached = True

    def on_epoch_end(self, epoch, logs=None):
        seconds = self.elapsed_seconds()
        if logs is not None:
            logs["elapsed_minutes"] = seconds / 60.0
        step = int(self.model.optimizer.iterations.numpy())
        self.noted[step] = round(seconds, 3)
        _write_atomically(
            self.path, json.dumps({str(k): v for k, v in sorted(self.noted.items())})
        )
        if self.at_evaluation and self.limit is not None and self.round_start is not None:
            # The round just ended (its first one includes tracing, so the
            # estimate errs on the safe side) predicts the next one.
            round_seconds = seconds - self.round_start
            self.round_start = seconds
            if (self.next_round_passes(seconds, round_seconds, self.limit)
                    and not self.model.stop_training):
                self.model.stop_training = True
                self.stopped_at_step = step
                self.budget_reached = True


class HistoryLogger(keras.callbacks.Callback):
    """`history.csv`: the epoch, the optimizer's step and every logged value, a row per evaluation.

    Appends across resumes like `keras.callbacks.CSVLogger(append=True)`,
    but when a row brings values the file has no column for (a resumed run
    logging more, or other, values), the file is rewritten with the new
    columns added and the old rows left empty there, so columns never
    shift under their header. Nothing already written is dropped.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch}
        if self.model is not None and getattr(self.model, "optimizer", None) is not None:
            # The epoch alone does not give the step once a run has gone on
            # from inside an evaluation round (see `extend_finished_run`).
            row["step"] = int(self.model.optimizer.iterations.numpy())
        row.update({k: _csv_value(v) for k, v in sorted((logs or {}).items())})
        header, rows = [], []
        if os.path.exists(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header, rows = list(reader.fieldnames or []), list(reader)
        new = [key for key in row if key not in header]
        if header and not new:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, header, restval="").writerow(row)
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, header + new, restval="")
        writer.writeheader()
        writer.writerows(rows + [row])
        _write_atomically(self.path, text.getvalue())


def _csv_value(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _write_atomically(path, text):
    # A kill while writing leaves the old file whole, never half of the new.
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


