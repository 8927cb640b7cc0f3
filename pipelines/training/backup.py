"""What lets a killed run go on where it stopped, on public Keras APIs only.

A run's backup is two files in `run_dir/backup/`, the layout Keras's
`BackupAndRestore` wrote (so backups of older runs still resume):

- `latest.weights.h5`: `model.save_weights`, which holds the weights and
  the optimizer's variables (its step, the Adam moments);
- `training_metadata.json`: `{"epoch": E, "step": S}`, the epoch `fit`
  goes on from (`fit(initial_epoch=E)`) and the optimizer's step, whose
  batches the resumed run skips. Older backups hold no `step`: it is
  then `E * train.steps_per_eval`.

Pieces:

- `RunBackup`: the callback that writes the backup at every evaluation
  (epoch end) and restores it when training begins; `backup_and_restore`
  makes it for a run directory;
- `resume_point`, `resume_step`: where a run's backup resumes it;
  `write_backup`: make a model the backup (a finished run continued);
  `remove_backup`: once the run is saved whole;
- `recover_backup`: a corrupt backup (truncated weights, garbage
  metadata) is set aside, kept as evidence (`backup.corrupt-N/`), and the
  newest intact checkpoint becomes the backup; `backup_problem`,
  `weights_file_problem` say what is wrong; `load_model_file`: a `.keras`
  file loaded, or an error naming it;
- `BatchSummaries`: the `batch_*` TensorBoard curves, numbered by the
  optimizer's step, so that a resumed run's curves go on from its backup's
  step instead of starting again at 1 (keras-team/keras#9546).
"""

import json
import os
import shutil
import sys
import zipfile

import h5py
import keras
import tensorflow as tf

from keras_moe.pipelines.training.rundir import RunDir, checkpoint_step

WEIGHTS = "latest.weights.h5"
METADATA = "training_metadata.json"
# Written first, then moved over the backup (see `RunBackup.save`).
PARTIAL_WEIGHTS = "latest.partial.weights.h5"
PARTIAL_METADATA = METADATA + ".partial"


def backup_dir(run_dir):
    """`run_dir/backup`, where the run's backup lives."""
    return RunDir.wrap(run_dir).backup_dir


def _paths(run_dir):
    directory = backup_dir(run_dir)
    return {name: os.path.join(directory, name)
            for name in (WEIGHTS, METADATA, PARTIAL_WEIGHTS, PARTIAL_METADATA)}


def _settle(paths):
    # A save writes both partial files, then moves the weights, then the
    # metadata over the backup. Killed before the first move (its partial
    # weights are still there), the last backup is whole: the partial files
    # go. Killed between the moves (only the partial metadata is left), the
    # new weights are in place: their metadata is moved after them.
    if os.path.exists(paths[PARTIAL_WEIGHTS]):
        os.remove(paths[PARTIAL_WEIGHTS])
        if os.path.exists(paths[PARTIAL_METADATA]):
            os.remove(paths[PARTIAL_METADATA])
    elif os.path.exists(paths[PARTIAL_METADATA]):
        try:
            _read_json(paths[PARTIAL_METADATA])
        except ValueError:
            # Cut short (only `BackupAndRestore`'s older subclass wrote it
            # after moving the weights): the restored step will not match.
            os.remove(paths[PARTIAL_METADATA])
        else:
            os.replace(paths[PARTIAL_METADATA], paths[METADATA])


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None


def read_backup(run_dir):
    """The run's backup metadata: `{"epoch": E, "step": S}`, or None without a backup.

    A save that a kill interrupted is settled first (see `RunBackup.save`).
    `step` is None for a backup that Keras's `BackupAndRestore` wrote.

    Raises:
        ValueError: naming the file, when the backup has weights but no
            metadata, or metadata without an epoch.
    """
    paths = _paths(run_dir)
    _settle(paths)
    if not os.path.exists(paths[METADATA]):
        if os.path.exists(paths[WEIGHTS]):
            raise ValueError(
                f"{paths[WEIGHTS]}: a backup without its {METADATA}, so the step it resumes "
                f"at is unknown; remove {backup_dir(run_dir)} to start the run again"
            )
        return None
    metadata = _read_json(paths[METADATA])
    if not isinstance(metadata, dict) or "epoch" not in metadata:
        raise ValueError(
            f"{paths[METADATA]}: expected a JSON object with an `epoch`. Received: {metadata!r}"
        )
    step = metadata.get("step")
    return {"epoch": int(metadata["epoch"]), "step": None if step is None else int(step)}


def resume_point(run_dir, steps_per_eval):
    """`(epoch, step)` the run's backup resumes at; `(0, 0)` without a backup.

    `epoch` is `fit`'s `initial_epoch`; `step` the optimizer's step, which
    for a backup that holds none is `epoch * steps_per_eval`.
    """
    metadata = read_backup(run_dir)
    if metadata is None:
        return 0, 0
    step = metadata["step"]
    return metadata["epoch"], metadata["epoch"] * steps_per_eval if step is None else step


def resume_step(run_dir, steps_per_eval):
    """The optimizer step the run's backup holds (0 without a backup).

    Backups written before the step was noted give it from their epoch.
    """
    return resume_point(run_dir, steps_per_eval)[1]


def write_backup(model, run_dir, steps_per_eval):
    """Make `model` (weights and optimizer) the backup the run resumes from.

    It resumes in the evaluation round of the model's optimizer step, at
    that step (`resume_step`).
    """
    backup = RunBackup(run_dir)
    backup.set_model(model)
    backup.save(int(model.optimizer.iterations.numpy()) // steps_per_eval)


def remove_backup(run_dir):
    """Remove the run's backup (once the finished run is saved)."""
    shutil.rmtree(backup_dir(run_dir), ignore_errors=True)


def load_model_file(path, compile=True):
    """`keras.saving.load_model(path)`, with an error naming the file when it is corrupt.

    Raises:
        FileNotFoundError: naming `path` when it does not exist.
        ValueError: naming `path` and what is wrong, when it is not a whole
            `.keras` archive or cannot be loaded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: corrupt or truncated ({os.path.getsize(path)} bytes, not a .keras zip "
            "archive)"
        )
    try:
        return keras.saving.load_model(path, compile=compile)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: the model cannot be loaded (corrupt?): {error}") from None


def weights_file_problem(path):
    """What is wrong with the `.weights.h5` file `path` (naming it), or None when every array reads."""
    if not os.path.isfile(path):
        return f"{path}: missing"

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            item[()]  # a truncated or damaged array fails here
        return None  # anything else would end `visititems`

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        return f"{path}: not a readable weights file ({error})"
    return None


def backup_problem(run_dir):
    """What is wrong with the run's backup (naming the file), or None when it is whole or absent."""
    try:
        metadata = read_backup(run_dir)
    except ValueError as error:
        return str(error)
    if metadata is None:
        return None
    return weights_file_problem(_paths(run_dir)[WEIGHTS])


def _set_aside(path):
    # The evidence is kept: `path` becomes `path.corrupt-N`, N the first free.
    n = 1
    while os.path.exists(f"{path}.corrupt-{n}"):
        n += 1
    os.replace(path, f"{path}.corrupt-{n}")
    return f"{path}.corrupt-{n}"


def recover_backup(run_dir, steps_per_eval, out=None):
    """Replace a corrupt backup by the newest intact checkpoint; say what was done.

    When `backup_problem` finds the backup whole (or there is none),
    nothing happens. Otherwise the checkpoints are tried, newest first:
    `checkpoints/last.keras` (its weights and optimizer), then the
    `checkpoints/step-N.weights.h5` files, highest N first. The first
    that loads becomes the backup (at its optimizer step; the run resumes
    there). The corrupt `backup/` is kept as `backup.corrupt-N/`, and a
    checkpoint that failed to load as `<its name>.corrupt-N` (never
    overwritten by the resumed run). What was done is printed on `out`
    (stderr by default) and returned.

    Returns:
        The message, or None when the backup was whole or absent.

    Raises:
        ValueError: naming the backup's problem and every checkpoint tried,
            when none is intact (then nothing is moved).
    """
    problem = backup_problem(run_dir)
    if problem is None:
        return None
    run = RunDir.wrap(run_dir)
    failed = []
    found = None
    if os.path.exists(run.last_checkpoint):
        try:
            model = load_model_file(run.last_checkpoint)
            found = (run.last_checkpoint, int(model.optimizer.iterations.numpy()), model)
        except ValueError as error:
            failed.append((run.last_checkpoint, str(error)))
    for path in reversed(run.step_checkpoints()) if found is None else ():
        error = weights_file_problem(path)
        if error is None:
            found = (path, checkpoint_step(path), None)
            break
        failed.append((path, error))
    if found is None:
        tried = "; ".join(error for _, error in failed) or "there is none"
        raise ValueError(
            f"the run's backup is corrupt: {problem}; no intact checkpoint to resume from "
            f"({tried}); nothing was moved: start the run in a new --run-dir"
        )
    path, step, model = found
    aside = _set_aside(backup_dir(run_dir))
    kept = [aside] + [_set_aside(p) for p, _ in failed]
    if model is not None:
        write_backup(model, run_dir, steps_per_eval)
    else:
        paths = _paths(run_dir)
        os.makedirs(backup_dir(run_dir), exist_ok=True)
        shutil.copyfile(path, paths[PARTIAL_WEIGHTS])
        with open(paths[PARTIAL_METADATA], "w", encoding="utf-8") as f:
            json.dump({"epoch": step // steps_per_eval, "step": step}, f)
        os.replace(paths[PARTIAL_WEIGHTS], paths[WEIGHTS])
        os.replace(paths[PARTIAL_METADATA], paths[METADATA])
    message = (
        f"the run's backup is corrupt ({problem}); resuming from the newest intact "
        f"checkpoint, {path} (step {step}); the corrupt files are kept: {', '.join(kept)}"
    )
    print(f"keras-moe: {message}", file=out or sys.stderr, flush=True)
    return message


def backup_and_restore(run_dir):
    """The run's backup callback: a killed run resumes from `run_dir/backup`."""
    return RunBackup(run_dir)


class RunBackup(keras.callbacks.Callback):
    """Backs the run up at every evaluation; restores it when training begins.

    At each epoch's end (an evaluation: `fit` runs `train.steps_per_eval`
    steps per epoch) `save` writes the model's weights and optimizer
    variables and the epoch to go on from. When training begins, the
    backup, if there is one, is loaded into the model (its optimizer built
    first, else `load_weights` skips the optimizer's variables) and its
    step checked against the restored optimizer's.

    The callback cannot move `fit` to the backup's epoch: pass
    `initial_epoch` from `resume_point` (as `fit_and_save` does); a `fit`
    that starts at another epoch is stopped with an error. The backup is
    kept at the end of `fit`: `remove_backup` once the model is saved.

    Args:
        run_dir: the run directory; the backup goes into `run_dir/backup`.
    """

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir
        self.paths = _paths(run_dir)
        self.weights_path = self.paths[WEIGHTS]
        self.metadata_path = self.paths[METADATA]
        self.resumed_epoch = None  # the epoch `fit` must start at, until it does

    def save(self, epoch):
        """Make the model's state the backup, to go on at `epoch`.

        Both files are written beside the backup, then moved over it with
        `os.replace`, weights first: a kill while writing leaves the last
        backup whole, and one between the two moves is finished by the next
        `read_backup`. A backup file is never rewritten in place, so never
        left truncated.
        """
        _settle(self.paths)
        os.makedirs(os.path.dirname(self.weights_path), exist_ok=True)
        step = int(self.model.optimizer.iterations.numpy())
        self.model.save_weights(filepath=self.paths[PARTIAL_WEIGHTS], overwrite=True)
        with open(self.paths[PARTIAL_METADATA], "w", encoding="utf-8") as f:
            json.dump({"epoch": int(epoch), "step": step}, f)
        os.replace(self.paths[PARTIAL_WEIGHTS], self.weights_path)
        os.replace(self.paths[PARTIAL_METADATA], self.metadata_path)

    def restore(self):
        """Load the backup into the model; its metadata (see `read_backup`), or None.

        Raises:
            ValueError: the model is not built, or the restored optimizer's
                step is not the backup's (its optimizer differs from the
                one that wrote the backup).
        """
        metadata = read_backup(self.run_dir)
        if metadata is None:
            return None
        if not self.model.built:
            raise ValueError(
                f"{self.weights_path}: the model must be built before `fit` to restore its "
                f"backup. Received the unbuilt model {self.model.name!r}"
            )
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.weights_path)
        if optimizer is not None and metadata["step"] is not None:
            step = int(optimizer.iterations.numpy())
            if step != metadata["step"]:
                raise ValueError(
                    f"{self.weights_path}: restored the optimizer at step {step}, but "
                    f"{self.metadata_path} notes step {metadata['step']}; the backup was "
                    "written by a model with another optimizer"
                )
        return metadata

    def on_train_begin(self, logs=None):
        metadata = self.restore()
        self.resumed_epoch = None if metadata is None else metadata["epoch"]

    def on_epoch_begin(self, epoch, logs=None):
        if self.resumed_epoch is not None:
            expected, self.resumed_epoch = self.resumed_epoch, None
            if epoch != expected:
                raise ValueError(
                    f"{self.metadata_path}: the backup goes on at epoch {expected}, but `fit` "
                    f"started at epoch {epoch}; pass `initial_epoch={expected}` "
                    "(`resume_point`, as `fit_and_save` does)"
                )

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)


class BatchSummaries(keras.callbacks.Callback):
    """Every logged training value as a `batch_<name>` TensorBoard scalar, at the optimizer's step.

    Keras's `TensorBoard` numbers its batch summaries from 1 in every `fit`
    call, so a run resumed at step 1,000 would draw its next `batch_loss`
    values over the first sitting's curve. Here the step is the optimizer's
    (restored with the backup), as `RoutingMonitor` counts it: the curves
    go on. Use it beside `keras.callbacks.TensorBoard(update_freq="epoch")`,
    which writes the `epoch_*` curves.

    Args:
        log_dir: the TensorBoard directory; the scalars go into
            `log_dir/train`, beside Keras's.
        every_n_steps: positive int; write at the steps it divides.
    """

    def __init__(self, log_dir, every_n_steps=1):
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"`every_n_steps` must be a positive int. Received: every_n_steps={every_n_steps!r}"
            )
        self.log_dir = os.path.join(log_dir, "train")
        self.every_n_steps = every_n_steps
        self.writer = None
        self.step = None

    def on_train_begin(self, logs=None):
        self.step = None
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is None:
            # Read once, at the first batch (after the backup is restored);
            # then counted, so that no batch waits on a read of the step.
            self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every_n_steps or not isinstance(logs, dict):
            return
        with self.writer.as_default(step=self.step):
            for name, value in logs.items():
                tf.summary.scalar(f"batch_{name}", value)

    def on_epoch_end(self, epoch, logs=None):
        # A later kill then loses no more than the current round's points.
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.flush()
