"""Tests of the run-directory callbacks in keras_moe.pipelines.training.runs.

`TrainingClock` runs under a fake clock that advances 10 s per training
batch, so every expected time below is a count of batches times 10 s,
worked out by hand.
"""

import csv
import json
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.pipelines.training.budget import StepLimit
from keras_moe.pipelines.training.runs import (
    HistoryLogger,
    TrainingClock,
    backup_and_restore,
    fit_and_save,
    resume_step,
    write_backup,
)

SECONDS_PER_BATCH = 10.0


class FakeTime(keras.callbacks.Callback):
    """A clock that moves on `SECONDS_PER_BATCH` at the end of every batch."""

    def __init__(self):
        super().__init__()
        self.now = 1000.0

    def __call__(self):
        return self.now

    def on_train_batch_end(self, batch, logs=None):
        self.now += SECONDS_PER_BATCH


def tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 3)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")


def fit(model, clock, fake, epochs, initial_epoch=0):
    x, y = data()
    # FakeTime first: the clock reads the time after this batch's 10 s.
    return model.fit(x, y, batch_size=2, steps_per_epoch=2, epochs=epochs,
                     initial_epoch=initial_epoch, callbacks=[fake, clock], verbose=0)


def noted(run_dir):
    return json.loads((run_dir / "elapsed.json").read_text())


def test_clock_notes_the_time_of_every_evaluation(tmp_path):
    fake = FakeTime()
    clock = TrainingClock(str(tmp_path), clock=fake)
    history = fit(tiny_model(), clock, fake, epochs=3)
    # 2 batches per epoch, 10 s each: 20, 40, 60 s at steps 2, 4, 6.
    assert history.history["elapsed_minutes"] == [20 / 60, 40 / 60, 60 / 60]
    assert noted(tmp_path) == {"2": 20.0, "4": 40.0, "6": 60.0}
    assert clock.elapsed_seconds() == 60.0
    assert clock.stopped_at_step is None


def test_a_resumed_run_counts_on_from_the_step_it_resumes_at(tmp_path):
    model = tiny_model()
    fake = FakeTime()
    fit(model, TrainingClock(str(tmp_path), clock=fake), fake, epochs=2)  # steps 1-4, 40 s
    # A later sitting reached step 6 after 999 s, then was killed before its
    # backup: the run resumes at step 4, and those 999 s are not its time.
    (tmp_path / "elapsed.json").write_text(json.dumps({**noted(tmp_path), "6": 999.0}))
    assert int(model.optimizer.iterations.numpy()) == 4
    clock = TrainingClock(str(tmp_path), clock=fake)
    history = fit(model, clock, fake, epochs=3, initial_epoch=2)
    assert clock.base == 40.0
    assert history.history["elapsed_minutes"] == [60 / 60]
    assert noted(tmp_path) == {"2": 20.0, "4": 40.0, "6": 60.0}


def test_the_limit_counts_the_whole_run(tmp_path):
    fake = FakeTime()
    model = tiny_model()
    clock = TrainingClock(str(tmp_path), limit_minutes=0.5, clock=fake)
    fit(model, clock, fake, epochs=3)
    # 30 s allowed: after batch 3 the run has had exactly 30 s, after batch 4
    # 40 s > 30 s, so it stops there, in the second epoch.
    assert clock.stopped_at_step == 4
    assert int(model.optimizer.iterations.numpy()) == 4
    assert noted(tmp_path) == {"2": 20.0, "4": 40.0}
    # Resumed at step 4 with 45 s allowed: 40 s are spent, one batch more.
    clock = TrainingClock(str(tmp_path), limit_minutes=0.75, clock=fake)
    fit(model, clock, fake, epochs=3, initial_epoch=2)
    assert clock.stopped_at_step == 5
    assert noted(tmp_path)["5"] == 50.0


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_history_adds_columns_without_shifting_old_rows(tmp_path):
    path = tmp_path / "history.csv"
    # As keras.callbacks.CSVLogger writes it, by an older run.
    path.write_text("epoch,loss,val_loss\n0,2.5,2.75\n")
    logger = HistoryLogger(str(path))
    logger.on_epoch_end(1, {"loss": np.float32(1.5), "elapsed_minutes": 3.0, "val_loss": 2.25})
    logger.on_epoch_end(2, {"loss": 1.25, "elapsed_minutes": 4.5, "val_loss": 2.0})
    header, rows = read_csv(path)
    assert header == ["epoch", "loss", "val_loss", "elapsed_minutes"]
    assert rows == [
        {"epoch": "0", "loss": "2.5", "val_loss": "2.75", "elapsed_minutes": ""},
        {"epoch": "1", "loss": "1.5", "val_loss": "2.25", "elapsed_minutes": "3.0"},
        {"epoch": "2", "loss": "1.25", "val_loss": "2.0", "elapsed_minutes": "4.5"},
    ]
    # A row with fewer values leaves its missing columns empty.
    logger.on_epoch_end(3, {"loss": 1.0})
    assert read_csv(path)[1][-1] == {"epoch": "3", "loss": "1.0", "val_loss": "",
                                     "elapsed_minutes": ""}


def test_history_starts_a_new_file(tmp_path):
    path = tmp_path / "history.csv"
    HistoryLogger(str(path)).on_epoch_end(0, {"val_bleu": 1.5, "loss": 3.0, "note": "x"})
    assert read_csv(path) == (["epoch", "loss", "note", "val_bleu"],
                              [{"epoch": "0", "loss": "3.0", "note": "x", "val_bleu": "1.5"}])


def test_a_backup_interrupted_while_written_leaves_the_previous_one_whole(tmp_path):
    # A kill during the write (here: a truncated file, then an exception)
    # must leave the last complete backup loadable.
    def model():
        built = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        built.compile(optimizer="sgd", loss="mse")
        return built

    first = model()
    callback = backup_and_restore(str(tmp_path))
    callback.set_model(first)
    callback.save(epoch=1)

    def dies(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF")
        raise KeyboardInterrupt

    first.save_weights = dies
    with pytest.raises(KeyboardInterrupt):
        callback.save(epoch=2)
    second = model()
    restore = backup_and_restore(str(tmp_path))
    restore.set_model(second)
    restore.on_train_begin()
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_step_limit_ends_a_run_inside_an_epoch(tmp_path):
    model = tiny_model()
    fake = FakeTime()
    clock = TrainingClock(str(tmp_path), clock=fake)
    x, y = data()
    history = model.fit(x, y, batch_size=2, steps_per_epoch=2, epochs=3,
                        callbacks=[fake, clock, StepLimit(5)], verbose=0)
    # Steps 1-2, 3-4, then step 5 ends the third epoch early; that epoch is
    # still evaluated (its end is noted at step 5).
    assert int(model.optimizer.iterations.numpy()) == 5
    assert len(history.history["loss"]) == 3
    assert noted(tmp_path) == {"2": 20.0, "4": 40.0, "5": 50.0}


def test_history_notes_the_optimizer_step_of_each_row(tmp_path):
    model = tiny_model()
    x, y = data()
    path = tmp_path / "history.csv"
    model.fit(x, y, batch_size=2, steps_per_epoch=3, epochs=2,
              callbacks=[HistoryLogger(str(path))], verbose=0)
    header, rows = read_csv(path)
    assert header[:2] == ["epoch", "step"]
    assert [(row["epoch"], row["step"]) for row in rows] == [("0", "3"), ("1", "6")]


class Seen(keras.layers.Layer):
    """Notes the first input value of every training batch (run eagerly)."""

    def __init__(self, seen, **kwargs):
        super().__init__(**kwargs)
        self.note = seen.append  # not the list: Keras would track a copy of it

    def call(self, x, training=False):
        if training:
            self.note(int(x[0, 0]))
        return x


def seen_model(seen):
    built = keras.Sequential([keras.Input((1,)), Seen(seen), keras.layers.Dense(1)])
    built.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    return built


def counting_dataset():
    """Batch i holds the value i, in order: a run's `Seen` list names its batches."""
    return tf.data.Dataset.range(100).map(lambda i: ([tf.cast(i, tf.float32)], [0.0])).batch(1)


class KilledAfter(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise KeyboardInterrupt  # the process dies: no clean end of `fit`


def test_a_resumed_run_goes_on_with_the_batch_after_its_backup(tmp_path):
    dataset, train = counting_dataset(), types.SimpleNamespace(steps=6, steps_per_eval=2, verbose=0)
    first = []
    with pytest.raises(KeyboardInterrupt):
        fit_and_save(seen_model(first), dataset, train,
                     [backup_and_restore(str(tmp_path)), KilledAfter(5)], str(tmp_path))
    # Killed at step 5, after the backup of step 4 (the end of the second round).
    assert first == [0, 1, 2, 3, 4]
    assert resume_step(str(tmp_path), 2) == 4
    again = []
    resumed = seen_model(again)
    fit_and_save(resumed, dataset, train, [backup_and_restore(str(tmp_path))], str(tmp_path))
    # On from the batch after the backup's 4 steps, as an uninterrupted run,
    # not from batch 0 again; step 5 is redone since its update was lost.
    assert again == [4, 5]
    assert int(resumed.optimizer.iterations.numpy()) == 6


def test_a_run_continued_inside_a_round_resumes_at_its_own_steps(tmp_path):
    dataset, train = counting_dataset(), types.SimpleNamespace(steps=6, steps_per_eval=2, verbose=0)
    # A time limit stopped the first sitting at step 3, inside the second round.
    first = []
    stopped = seen_model(first)
    fit_and_save(stopped, dataset, train, [backup_and_restore(str(tmp_path)), StepLimit(3)],
                 str(tmp_path))
    assert first == [0, 1, 2]
    write_backup(stopped, str(tmp_path), 2)  # as `extend_finished_run` does
    assert resume_step(str(tmp_path), 2) == 3
    # The continuation trains steps 4-5 (its round, evaluated and backed up
    # at step 5), then is killed during step 6.
    second = []
    with pytest.raises(KeyboardInterrupt):
        fit_and_save(seen_model(second), dataset, train,
                     [backup_and_restore(str(tmp_path)), KilledAfter(6)], str(tmp_path))
    assert second == [3, 4, 5]
    # Its backup is at step 5, which the epoch (2, i.e. 4 steps) does not give.
    third = []
    resumed = seen_model(third)
    fit_and_save(resumed, dataset, train, [backup_and_restore(str(tmp_path)), StepLimit(6)],
                 str(tmp_path))
    assert third == [5]
    assert int(resumed.optimizer.iterations.numpy()) == 6


def test_the_limit_at_evaluation_stops_at_a_round_boundary(tmp_path):
    fake = FakeTime()
    model = tiny_model()
    # 2 batches of 10 s per round; 55 s allowed. After round 2 (40 s) the next
    # round would end at 60 s > 55 s, so the run stops at step 4, a round
    # boundary, not at step 6 inside round 3 as the batch-level limit would.
    clock = TrainingClock(str(tmp_path), limit_minutes=55 / 60, clock=fake, at_evaluation=True)
    fit(model, clock, fake, epochs=5)
    assert clock.stopped_at_step == 4 and clock.budget_reached
    assert int(model.optimizer.iterations.numpy()) == 4
    assert noted(tmp_path) == {"2": 20.0, "4": 40.0}
    # Read back from elapsed.json alone (what `extend_finished_run` has):
    # 40 s + the last round's 20 s = 60 s > 55 s, so this limit stopped it;
    # the batch-level limit alone (40 s < 55 s) had not, nor had 85 s.
    assert TrainingClock.limit_stopped(str(tmp_path), 55 / 60, at_evaluation=True)
    assert not TrainingClock.limit_stopped(str(tmp_path), 55 / 60, at_evaluation=False)
    assert not TrainingClock.limit_stopped(str(tmp_path), 85 / 60, at_evaluation=True)
    assert TrainingClock.limit_stopped(str(tmp_path), 40 / 60)  # 40 s >= 40 s
    assert not TrainingClock.limit_stopped(str(tmp_path), None, at_evaluation=True)
    # Resumed with 85 s: 40 s spent; rounds end at 60 s and 80 s; a third
    # would end at 100 s, so it stops at step 8, again a round boundary.
    clock = TrainingClock(str(tmp_path), limit_minutes=85 / 60, clock=fake, at_evaluation=True)
    fit(model, clock, fake, epochs=5, initial_epoch=2)
    assert clock.stopped_at_step == 8
    assert noted(tmp_path) == {"2": 20.0, "4": 40.0, "6": 60.0, "8": 80.0}


def test_without_at_evaluation_the_same_limit_stops_inside_a_round(tmp_path):
    fake = FakeTime()
    clock = TrainingClock(str(tmp_path), limit_minutes=55 / 60, clock=fake)
    fit(tiny_model(), clock, fake, epochs=5)
    assert clock.stopped_at_step == 6  # 60 s > 55 s after batch 6
