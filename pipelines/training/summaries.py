"""A training run's TensorBoard curves, every one on the optimizer's step axis.

`RunSummaries` is the one callback that writes `run_dir/tensorboard/train`
and `run_dir/tensorboard/validation` (`RoutingMonitor` writes
`tensorboard/routing`):

- `train/batch_<name>`: every logged training value every
  `train.monitor_every_n_steps` steps (`backup.BatchSummaries`);
- at every evaluation (epoch end), at the optimizer's step:
  `train/epoch_<name>` for the epoch's training values (loss, perplexity,
  the MoE layers' training routing `<layer>_cv_load`, ...) and
  `epoch_learning_rate`; `validation/epoch_<name>` for every `val_<name>`
  the pipeline's validation added (`loss`, `perplexity`, for translation
  `bleu` and `chrf`, and the clean routing of the validation set,
  `<layer>_cv_load`, `<layer>_max_mean_load`, ...: see
  `routing_checks`). Train and validation curves of one name overlay.

Why not Keras's `TensorBoard` callback, which the runs used before:

- it numbers its `epoch_*` points by the epoch (0, 1, 2, ...) while the
  `batch_*` points are numbered by the step, so on the step axis every
  evaluation of a run sat within its first few steps (in the demo, all of
  them looked like one point at the first evaluation);
- beside `BatchSummaries` it opened a second event file in `train/`, and
  TensorBoard follows only the newest event file of a run directory while
  a run is written (`--reload_multifile` is off by default), so its
  `epoch_*` file was never shown: `train/` had only `batch_*` tags.

Here each directory has one writer, flushed at every evaluation, and
the step is the optimizer's, restored with the backup: a resumed run's
curves go on from its last evaluation, with no step written twice.
"""

import os

import keras
import tensorflow as tf

from keras_moe.pipelines.training.backup import BatchSummaries

VALIDATION_PREFIX = "val_"


def split_logs(logs):
    """`(train, validation)` scalars of epoch logs: `val_<name>` go to validation as `<name>`.

    Values that are not numbers (or are booleans) are left out.

    Example:

    >>> split_logs({"loss": 2.0, "val_loss": 3.0, "note": "x"})
    ({'loss': 2.0}, {'loss': 3.0})
    """
    train, validation = {}, {}
    for name, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if isinstance(value, bool):
            continue
        if name.startswith(VALIDATION_PREFIX):
            validation[name[len(VALIDATION_PREFIX):]] = number
        else:
            train[name] = number
    return train, validation


def learning_rate(optimizer):
    """The optimizer's current learning rate (its schedule's value at its step), or None."""
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return None


class RunSummaries(BatchSummaries):
    """The `batch_*` curves and, at every evaluation, `epoch_*` curves at the optimizer's step.

    Args:
        log_dir: the run's TensorBoard directory; writes `log_dir/train`
            and `log_dir/validation`.
        every_n_steps: positive int; `batch_*` values are written at the
            steps it divides.

    Place it after the callbacks that add values to the epoch logs (the
    validation, `TrainingClock`): it writes what the logs hold when its
    `on_epoch_end` runs.

    Example:

    ```python
    model.fit(data, epochs=4, steps_per_epoch=100,
              callbacks=[validation, RunSummaries("run/tensorboard", every_n_steps=10)])
    # run/tensorboard/train: batch_loss at 10, 20, ...; epoch_loss and
    # epoch_learning_rate at 100, 200, 300, 400; run/tensorboard/validation:
    # epoch_loss (from val_loss) at 100, 200, 300, 400.
    ```
    """

    def __init__(self, log_dir, every_n_steps=1):
        super().__init__(log_dir, every_n_steps=every_n_steps)
        self.validation_dir = os.path.join(log_dir, "validation")
        self.validation_writer = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.validation_writer is None:
            self.validation_writer = tf.summary.create_file_writer(self.validation_dir)

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        train, validation = split_logs(logs)
        rate = learning_rate(self.model.optimizer)
        if rate is not None:
            train.setdefault("learning_rate", rate)
        for writer, values in ((self.writer, train), (self.validation_writer, validation)):
            if not values:
                continue
            with writer.as_default(step=step):
                for name, value in sorted(values.items()):
                    tf.summary.scalar(f"epoch_{name}", value)
            # At every evaluation: TensorBoard shows it now, and a kill loses nothing.
            writer.flush()
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self.validation_writer is not None:
            self.validation_writer.flush()
