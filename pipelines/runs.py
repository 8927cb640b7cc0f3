"""What every training pipeline does with its run directory and its routing.

Shared by `lm_train` and `translate_train`:

- `prepare_run_dir`: write the resolved `config.yaml` first, or check that a
  resumed run has the same configuration (nothing is deleted or overwritten
  by a refused run); a finished run asked for more `train.steps` goes on
  from its last step (`extend_finished_run`);
- `run_callbacks`: the callbacks of every run (backup, NaN guard, the
  pipeline's validation, history, checkpoints, TensorBoard, routing, time
  limit), in the order they must run;
- `fit_and_save`: `model.fit` in evaluation-long epochs, then `model.keras`;
- `WallClockLimit`: stop `fit` after a wall-time budget;
- `RoutingStatistics`: the paper's balance statistics (Table 6: CV of
  Importance and Load, max / mean Load) of every MoE block over a whole
  evaluation set, accumulated batch by batch from `keras_moe.Routing`.
"""

import json
import os
import time

import keras
import numpy as np

from keras_moe import RoutingMonitor
from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines import config as config_lib

# Keys that only steer how a run is executed: a resumed run may change them.
RUN_CONTROL_KEYS = ("time_limit_minutes", "verbose")


def _comparable(config):
    data = config_lib.to_dict(config)
    for key in RUN_CONTROL_KEYS:
        data["train"].pop(key, None)
    return data


def prepare_run_dir(config, run_dir):
    """Create `run_dir` and write `config.yaml`, or check it for a resumed run.

    Args:
        config: a run configuration (a dataclass tree with a `train`
            section); a saved one is read back as the same class.
        run_dir: the run directory.

    Returns:
        True when the directory already held this run (it resumes), or a
        finished run that `config` extends (see `extend_finished_run`).

    Raises:
        ValueError: the directory holds a finished run that `config` does not
            extend, or a different configuration (`train.time_limit_minutes`
            and `train.verbose` may change between a run and its resumption).
    """
    path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(os.path.join(run_dir, "model.keras")):
        extend_finished_run(config, run_dir)
        return True
    resumed = os.path.exists(path)
    if resumed:
        saved = config_lib.load_config(type(config), path)
        if _comparable(saved) != _comparable(config):
            raise ValueError(
                f"{path}: the run directory holds a different configuration; resume with the "
                "same configuration (only train.time_limit_minutes and train.verbose may "
                "change) or choose a new --run-dir"
            )
    os.makedirs(run_dir, exist_ok=True)
    config_lib.save_config(config, path)
    return resumed


def backup_and_restore(run_dir):
    """The run's `BackupAndRestore` callback: a killed run resumes from `run_dir/backup`."""
    return keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup"))


def run_callbacks(run_dir, model, train, validation, monitor, mode, extra=()):
    """The callbacks of a training run, in the order they must run.

    Args:
        run_dir: the run directory; `backup/`, `checkpoints/`, `tensorboard/`
            and `history.csv` go into it.
        model: the model being trained; a `RoutingMonitor` is added when it
            has MoE layers.
        train: the config's `train` section (`monitor_every_n_steps`,
            `time_limit_minutes`).
        validation: the pipeline's validation callback; it adds the `val_*`
            values that the logger, checkpoints and `extra` read.
        monitor, mode: the validation value `checkpoints/best.keras` keeps
            the best of (`"val_perplexity"`, `"min"`; `"val_bleu"`, `"max"`).
        extra: further callbacks, run after the checkpoints.

    Returns:
        A list of callbacks for `model.fit`.
    """
    log_dir = os.path.join(run_dir, "tensorboard")
    checkpoints = os.path.join(run_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    callbacks = [
        # First, so that a resumed run has its weights back before anything else runs.
        backup_and_restore(run_dir),
        keras.callbacks.TerminateOnNaN(),
        # Before the logger and checkpoints, which read the values it adds.
        validation,
        keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=True),
        keras.callbacks.ModelCheckpoint(os.path.join(checkpoints, "last.keras")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(checkpoints, "best.keras"), monitor=monitor, mode=mode,
            save_best_only=True,
        ),
        *extra,
        keras.callbacks.TensorBoard(log_dir, update_freq=train.monitor_every_n_steps),
    ]
    if find_moe_layers(model):
        callbacks.append(RoutingMonitor(log_dir, every_n_steps=train.monitor_every_n_steps))
    if train.time_limit_minutes:
        callbacks.append(WallClockLimit(train.time_limit_minutes))
    return callbacks


def fit_and_save(model, dataset, train, callbacks, run_dir):
    """Train `model` to `train.steps`, then save it as `run_dir/model.keras`.

    One Keras epoch is `train.steps_per_eval` steps, so validation,
    checkpoints and the backup happen at every epoch's end; a resumed run
    starts again at the epoch its backup recorded.

    Returns:
        The `steps`, `train_seconds` and `history` entries of the run's
        results (`steps`: the optimizer's step count, resumed steps included).
    """
    start = time.time()
    history = model.fit(
        dataset, epochs=-(-train.steps // train.steps_per_eval),
        steps_per_epoch=train.steps_per_eval, callbacks=callbacks, verbose=train.verbose,
        shuffle=False,  # the dataset shuffles itself
    )
    train_seconds = time.time() - start
    model.save(os.path.join(run_dir, "model.keras"))
    return {
        "steps": int(model.optimizer.iterations.numpy()),
        "train_seconds": round(train_seconds, 1),
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
    }


def extend_finished_run(config, run_dir):
    """Make a finished run resumable, so that training goes on to `config.train.steps`.

    Allowed when `config` equals the run's `config.yaml` except for a larger
    `train.steps` (and the keys a resumption may change). The finished
    `model.keras` (weights and optimizer state) becomes the backup that
    `BackupAndRestore` resumes from, at the evaluation round its step count
    reached; the learning-rate schedule goes on from the optimizer's step, so
    the continued run is the longer run. Nothing is lost: the finished run's
    `model.keras` and `results.json` are kept as `model-step-N.keras` and
    `results-step-N.json` (N its steps), and `history.csv` and TensorBoard
    go on appending. Interrupted after this, the run resumes as any other.

    Raises:
        ValueError: naming the run directory, when `config` does not extend
            the finished run; nothing is changed then.
    """
    path = os.path.join(run_dir, "config.yaml")
    finished = os.path.join(run_dir, "model.keras")
    saved = config_lib.load_config(type(config), path)
    old, new = _comparable(saved), _comparable(config)
    old_steps, new_steps = old["train"].pop("steps"), new["train"].pop("steps")
    if old != new or new_steps <= old_steps:
        raise ValueError(
            f"{run_dir}: holds a finished run (model.keras, train.steps={old_steps}); choose a "
            "new --run-dir, or continue it with the same configuration and a larger train.steps"
        )
    model = keras.saving.load_model(finished)
    steps = int(model.optimizer.iterations.numpy())
    backup = backup_and_restore(run_dir).backup_dir
    os.makedirs(backup, exist_ok=True)
    model.save_weights(os.path.join(backup, "latest.weights.h5"), overwrite=True)
    with open(os.path.join(backup, "training_metadata.json"), "w", encoding="utf-8") as f:
        json.dump({"epoch": steps // config.train.steps_per_eval, "batch": 0}, f)
    config_lib.save_config(config, path)
    # Last: until model.keras is renamed, running the command again redoes the above.
    for name in ("results.json", "model.keras"):
        if os.path.exists(os.path.join(run_dir, name)):
            stem, ext = os.path.splitext(name)
            os.replace(os.path.join(run_dir, name), os.path.join(run_dir, f"{stem}-step-{steps}{ext}"))


class WallClockLimit(keras.callbacks.Callback):
    """Stops training once `minutes` of wall time have passed since `fit` began."""

    def __init__(self, minutes):
        super().__init__()
        self.seconds = minutes * 60.0
        self.start = None
        self.stopped_at_step = None

    def on_train_begin(self, logs=None):
        self.start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if time.monotonic() - self.start > self.seconds and not self.model.stop_training:
            self.model.stop_training = True
            self.stopped_at_step = int(self.model.optimizer.iterations.numpy())


def find_model(run_dir):
    """The model file of a run: `model.keras` when it finished, else the last checkpoint.

    Raises:
        FileNotFoundError: naming the run directory when it holds neither.
    """
    for name in ("model.keras", os.path.join("checkpoints", "last.keras")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{run_dir}: no model.keras or checkpoints/last.keras")


def _cv(values):
    mean = float(np.mean(values))
    return float(np.std(values) / mean) if mean > 0 else 0.0


class RoutingStatistics:
    """Expert balance of every MoE block over an evaluation set.

    Feed it each batch's `{block name: keras_moe.Routing}` (taken in
    inference mode, so Load is the number of positions sent to each
    expert); `result()` gives, per block, CV (std / mean) of Importance and
    Load and max / mean Load averaged over the batches (`batch_*`, the
    paper's per-batch statistics) and over the whole set (`set_*`), each
    expert's share of the routed positions (`set_load_share`), and the
    number of experts that received no position.
    """

    def __init__(self):
        self.stats = {}

    def add(self, routings):
        for name, routing in (routings or {}).items():
            s = self.stats.setdefault(name, {"importance": 0.0, "counts": 0.0, "batches": []})
            importance = np.asarray(routing.importance, np.float64)
            counts = np.asarray(routing.counts, np.float64)
            s["importance"] = s["importance"] + importance
            s["counts"] = s["counts"] + counts
            s["batches"].append(
                (_cv(importance), _cv(counts), float(counts.max() / max(counts.mean(), 1e-12)))
            )

    def result(self):
        out = {}
        for name, s in self.stats.items():
            batch = np.mean(s["batches"], axis=0)
            out[name] = {
                "batch_cv_importance": float(batch[0]),
                "batch_cv_load": float(batch[1]),
                "batch_max_mean_load": float(batch[2]),
                "set_cv_importance": _cv(s["importance"]),
                "set_cv_load": _cv(s["counts"]),
                "set_max_mean_load": float(s["counts"].max() / max(s["counts"].mean(), 1e-12)),
                "experts_without_positions": int(np.sum(s["counts"] == 0)),
                "set_load_share": [float(x) for x in s["counts"] / max(s["counts"].sum(), 1.0)],
                "batches": len(s["batches"]),
            }
        return out
