"""Tests of keras_moe.pipelines.training.backup: a run's backup and its TensorBoard batch curves."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.pipelines.training.backup import (
    BatchSummaries,
    RunBackup,
    backup_dir,
    read_backup,
    resume_point,
    write_backup,
)
from keras_moe.pipelines.training.runs import fit_and_save
from tests.pipelines.training.runs_test import KilledAfter, counting_dataset, seen_model


def adam_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    return model


def train(model, steps):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * steps, 3)).astype("float32")
    y = rng.normal(size=(2 * steps, 2)).astype("float32")
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)


def assert_same_state(a, b):
    for va, vb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert len(a.optimizer.variables) == len(b.optimizer.variables) > 2
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)


def test_the_backup_holds_the_weights_and_the_optimizer_state(tmp_path):
    trained = adam_model()
    train(trained, 3)
    write_backup(trained, str(tmp_path), steps_per_eval=2)
    # Step 3 lies in the second round of 2 steps: epoch 1, at step 3.
    assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text()) == {
        "epoch": 1, "step": 3,
    }
    assert resume_point(str(tmp_path), 2) == (1, 3)
    fresh = adam_model()  # its optimizer not built yet: no moments to load into
    backup = RunBackup(str(tmp_path))
    backup.set_model(fresh)
    assert backup.restore() == {"epoch": 1, "step": 3}
    # Adam's step, moments and learning rate, not only the weights.
    assert int(fresh.optimizer.iterations.numpy()) == 3
    assert_same_state(trained, fresh)
    assert sorted(os.listdir(backup_dir(str(tmp_path)))) == [
        "latest.weights.h5", "training_metadata.json",
    ]


def test_a_kill_between_the_two_moves_is_finished_at_the_next_start(tmp_path, monkeypatch):
    model = adam_model()
    train(model, 2)
    backup = RunBackup(str(tmp_path))
    backup.set_model(model)
    backup.save(epoch=1)
    train(model, 2)
    replace = os.replace

    def dies_before_the_metadata(src, dst):
        if dst == backup.metadata_path:
            raise KeyboardInterrupt  # the weights of step 4 are in place, not yet their epoch
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_before_the_metadata)
    with pytest.raises(KeyboardInterrupt):
        backup.save(epoch=2)
    monkeypatch.setattr(os, "replace", replace)
    # The weights hold step 4: their metadata is moved after them, not that of step 2.
    assert read_backup(str(tmp_path)) == {"epoch": 2, "step": 4}
    fresh = adam_model()
    restore = RunBackup(str(tmp_path))
    restore.set_model(fresh)
    restore.restore()
    assert_same_state(model, fresh)


def test_a_backup_keras_backup_and_restore_wrote_resumes(tmp_path):
    # An older run's backup: Keras's callback, {"epoch": 2, "batch": 0}, no step.
    dataset = counting_dataset()
    first = []
    killed = seen_model(first)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(dataset, epochs=3, steps_per_epoch=2, verbose=0, shuffle=False, callbacks=[
            keras.callbacks.BackupAndRestore(backup_dir(str(tmp_path)), delete_checkpoint=False),
            KilledAfter(5),
        ])
    assert first == [0, 1, 2, 3, 4]
    metadata = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 2 and "step" not in metadata
    assert resume_point(str(tmp_path), 2) == (2, 4)  # step: 2 epochs of 2 steps
    again = []
    resumed = seen_model(again)
    train_config = type("Train", (), {"steps": 6, "steps_per_eval": 2, "verbose": 0})
    fit_and_save(resumed, dataset, train_config, [RunBackup(str(tmp_path))], str(tmp_path))
    assert again == [4, 5]
    assert int(resumed.optimizer.iterations.numpy()) == 6
    assert not (tmp_path / "backup").exists()  # removed once model.keras is written
    assert (tmp_path / "model.keras").exists()


def test_metadata_cut_short_by_the_older_writer_is_refused_at_restore(tmp_path):
    # The older writer moved the weights (step 4) over the backup, then was
    # killed writing their metadata: the metadata of step 2 is what is left.
    model = adam_model()
    train(model, 2)
    write_backup(model, str(tmp_path), 2)
    train(model, 2)
    model.save_weights(str(tmp_path / "backup" / "latest.weights.h5"))
    (tmp_path / "backup" / "training_metadata.json.partial").write_text('{"epo')
    assert read_backup(str(tmp_path)) == {"epoch": 1, "step": 2}
    assert not (tmp_path / "backup" / "training_metadata.json.partial").exists()
    backup = RunBackup(str(tmp_path))
    backup.set_model(adam_model())
    with pytest.raises(ValueError, match=r"latest\.weights\.h5: restored the optimizer at step 4"):
        backup.restore()


def test_weights_without_their_metadata_are_refused_naming_the_file(tmp_path):
    model = adam_model()
    os.makedirs(backup_dir(str(tmp_path)))
    model.save_weights(str(tmp_path / "backup" / "latest.weights.h5"))
    with pytest.raises(ValueError, match=r"latest\.weights\.h5: a backup without its "
                                         r"training_metadata\.json"):
        resume_point(str(tmp_path), 2)


def test_a_backup_of_another_optimizer_is_refused(tmp_path):
    sgd = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    sgd.compile(optimizer="sgd", loss="mse")
    train(sgd, 2)
    write_backup(sgd, str(tmp_path), 2)
    backup = RunBackup(str(tmp_path))
    backup.set_model(adam_model())
    # Keras only warns that it skips the optimizer's variables; the step tells.
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="at step 0.*notes step 2"):
        backup.restore()


def test_fit_started_at_another_epoch_than_the_backup_is_stopped(tmp_path):
    model = adam_model()
    train(model, 2)
    write_backup(model, str(tmp_path), 2)
    x, y = np.zeros((4, 3), "float32"), np.zeros((4, 2), "float32")
    with pytest.raises(ValueError, match=r"training_metadata\.json.*initial_epoch=1"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[RunBackup(str(tmp_path))])
    history = model.fit(x, y, epochs=2, initial_epoch=1, verbose=0,
                        callbacks=[RunBackup(str(tmp_path))])
    assert len(history.history["loss"]) == 1


def batch_scalars(log_dir, tag):
    from tensorboard.backend.event_processing import event_accumulator

    # Each sitting writes its own event file, and their names do not always
    # sort in the order they were written (two writers in one second differ
    # only by a counter: "...9.v2" sorts after "...10.v2"): read every point,
    # in the order it was written.
    acc = event_accumulator.EventAccumulator(str(log_dir / "train"), size_guidance={"tensors": 0},
                                             purge_orphaned_data=False)
    acc.Reload()
    events = sorted(acc.Tensors(tag), key=lambda e: e.wall_time)
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events]


class Losses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        self.values.append(float(logs["loss"]))


@pytest.mark.parametrize("every", [1, 2])
def test_batch_curves_go_on_from_the_optimizer_step(tmp_path, every):
    model = adam_model()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    losses = Losses()
    summaries = BatchSummaries(str(tmp_path), every_n_steps=every)
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[losses, summaries], verbose=0)
    # A second sitting, the optimizer at step 4 (as a restored backup leaves it):
    # its points are drawn at steps 5-7, after the first sitting's 1-4.
    second = BatchSummaries(str(tmp_path), every_n_steps=every)
    model.fit(x[:6], y[:6], batch_size=2, epochs=1, callbacks=[losses, second], verbose=0)
    expected = [(step, pytest.approx(loss, rel=1e-6))
                for step, loss in enumerate(losses.values, start=1) if step % every == 0]
    assert batch_scalars(tmp_path, "batch_loss") == expected
    assert [step for step, _ in expected] == list(range(every, 8, every))


def test_batch_summaries_names_a_bad_every_n_steps():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        BatchSummaries("logs", every_n_steps=0)
