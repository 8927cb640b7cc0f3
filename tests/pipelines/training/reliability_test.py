"""Training that fails must say so: divergence, data running out, bad model
arguments, corrupt backups and models, unusable run directories.

Each test states the command or call that once exited 0 (or with a raw
traceback) and what it must do now; see docs/reliability.md. The exit
codes are `guards.EXIT_DIVERGED` (3), `guards.EXIT_INCOMPLETE` (4) and 2
for bad input.
"""

import json
import math
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.pipelines import cli
from keras_moe.pipelines.config import load_config, save_config
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig
from keras_moe.pipelines.lm.inputs import perplexity_result
from keras_moe.pipelines.training import guards
from keras_moe.pipelines.training.backup import (
    METADATA,
    WEIGHTS,
    backup_and_restore,
    load_model_file,
    resume_point,
)
from keras_moe.pipelines.training.budget import StepLimit
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.training.runs import TrainingClock, fit_and_save, run_callbacks
from keras_moe.pipelines.translate import train as translate_train
from keras_moe.pipelines.translate.config import TranslateConfig
from tests.pipelines.lm.train_test import TINY, write_corpus

# ---------------------------------------------------------------- helpers


@pytest.fixture
def main(monkeypatch):
    """`keras-moe` in this process (no re-execution), returning the exit code."""
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")
    return cli.main


@pytest.fixture
def corpus(tmp_path):
    return {
        "train": write_corpus(tmp_path / "train.txt", 200, 0),
        "valid": write_corpus(tmp_path / "valid.txt", 30, 1),
    }


def lm_args(corpus, run_dir, *extra):
    sets = [f"data.train={corpus['train']}", f"data.valid={corpus['valid']}", *TINY, *extra]
    return ["lm", "train", *[a for s in sets for a in ("--set", s)], "--run-dir", str(run_dir)]


def error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("keras-moe")]
    assert len(err) == 1, err
    return err[0]


def saved_models(run_dir):
    """Every model, checkpoint, backup and results file a run left."""
    found = []
    for root, _, files in os.walk(run_dir):
        found += [os.path.relpath(os.path.join(root, f), run_dir) for f in files
                  if f.endswith((".keras", ".h5", ".json")) and f != "elapsed.json"]
    return sorted(found)


def dense_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def dataset(bad_step=None):
    """Batch i (step i + 1) is ([i, 1], 0); the batch of `bad_step` holds an inf."""
    x = np.stack([np.arange(40, dtype="float32") / 40, np.ones(40, "float32")], axis=1)
    if bad_step is not None:
        x[bad_step - 1, 0] = np.inf
    return tf.data.Dataset.from_tensor_slices((x, np.zeros((40, 1), "float32"))).batch(1)


def train_section(steps=6, steps_per_eval=2):
    return types.SimpleNamespace(steps=steps, steps_per_eval=steps_per_eval, verbose=0,
                                 time_limit_minutes=None, monitor_every_n_steps=1)


class Validation(keras.callbacks.Callback):
    """Adds `val_loss`: 1.0, then `values` in turn (NaN to diverge)."""

    def __init__(self, *values):
        super().__init__()
        self.values = list(values)

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self.values.pop(0) if self.values else 1.0


class KilledAfter(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise KeyboardInterrupt  # the process dies: no clean end of `fit`


def killed_run(run_dir, step=3, steps_per_eval=2):
    """A run killed at `step`: its backup and last.keras are those of the round before."""
    model = dense_model()
    callbacks = run_callbacks(run_dir, model, train_section(6, steps_per_eval), Validation(),
                              "val_loss", "min", [KilledAfter(step)])
    with pytest.raises(KeyboardInterrupt):
        fit_and_save(model, dataset(), train_section(6, steps_per_eval), callbacks, run_dir)
    return model


def resume(run_dir):
    model = dense_model()
    callbacks = run_callbacks(run_dir, model, train_section(), Validation(), "val_loss", "min")
    return model, fit_and_save(model, dataset(), train_section(), callbacks, run_dir)


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("learning_rate", ["1e30", "1e6"])
def test_a_diverged_lm_run_exits_3_and_saves_nothing(tmp_path, corpus, main, capsys,
                                                     learning_rate):
    # Before: exit 0 with NaN in model.keras, best.keras and last.keras and
    # `"perplexity": NaN` in results.json (1e30), or a raw OverflowError from
    # math.exp after the backup held the diverged weights (1e6).
    run_dir = tmp_path / "run"
    code = main(lm_args(corpus, run_dir, f"train.learning_rate={learning_rate}"))
    assert code == guards.EXIT_DIVERGED == 3
    line = error_line(capsys)
    assert "training diverged at step 1" in line and "nothing was saved" in line, line
    assert saved_models(run_dir) == ["vocab.json"]


def test_perplexity_of_an_overflowing_loss_is_infinite():
    # exp(800) overflows a float: before, OverflowError: math range error.
    result = perplexity_result(800.0, 1.0)
    assert result["perplexity"] == math.inf and result["loss"] == 800.0
    assert perplexity_result(math.log(20.0) * 4, 4)["perplexity"] == pytest.approx(20.0)


@pytest.mark.parametrize("bad", ["loss", "validation"])
def test_a_step_that_diverges_keeps_the_last_good_backup(tmp_path, bad):
    # Steps 1-2 are fine (backup and last.keras of step 2); then either the
    # training loss of step 3 is inf, or the validation of step 4 is NaN.
    # Before, the backup was written before the validation ran: it held step 4.
    run_dir = str(tmp_path)
    model = dense_model()
    validation = Validation(1.0, math.nan) if bad == "validation" else Validation()
    callbacks = run_callbacks(run_dir, model, train_section(), validation, "val_loss", "min")
    with pytest.raises(guards.TrainingDiverged) as raised:
        fit_and_save(model, dataset(3 if bad == "loss" else None), train_section(), callbacks,
                     run_dir)
    message = str(raised.value)
    if bad == "loss":
        assert "at step 3: the training loss is inf" in message
    else:
        assert "at step 4: val_loss is nan" in message
    assert "the backup of step 2 is kept" in message
    run = RunDir(run_dir)
    assert resume_point(run_dir, 2) == (1, 2)
    last = load_model_file(run.last_checkpoint)
    assert int(last.optimizer.iterations.numpy()) == 2
    assert all(np.isfinite(w).all() for w in last.get_weights())
    assert not os.path.exists(run.model_file) and not os.path.exists(run.results_file)


def test_non_finite_weights_are_named():
    model = dense_model()
    assert guards.non_finite_weight(model) is None
    model.layers[0].bias.assign([np.nan])
    assert guards.non_finite_weight(model) == model.layers[0].bias.path
    with pytest.raises(guards.TrainingDiverged, match=r"step 7: the weight .*bias"):
        guards.check_weights(model, 7)


def test_results_json_is_strict(tmp_path):
    run = RunDir(tmp_path)
    written = run.write_results({"valid": {"perplexity": math.inf, "loss": 1.5},
                                 "history": {"loss": [2.0, math.nan]}})
    text = (tmp_path / "results.json").read_text()

    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")

    data = json.loads(text, parse_constant=refuse)
    assert data == written
    assert data["valid"] == {"perplexity": None, "loss": 1.5}
    assert data["history"]["loss"] == [2.0, None]
    assert data["non_finite"]["valid.perplexity"] == "inf"
    assert data["non_finite"]["history.loss.1"] == "nan"
    with pytest.raises(ValueError):
        run.write_json(str(tmp_path / "other.json"), {"x": math.nan})
    assert not (tmp_path / "other.json").exists()


# ---------------------------------------------------------------- stopped short


def test_data_running_out_exits_4(tmp_path, corpus, main, capsys):
    # Before: "Your input ran out of data", steps: 1 of 8, model.keras, exit 0.
    one_word = tmp_path / "one.txt"
    one_word.write_text("word\n")
    run_dir = tmp_path / "run"
    code = main(lm_args(corpus, run_dir, f"data.train={one_word}", "train.steps=8",
                        "train.steps_per_eval=4"))
    assert code == guards.EXIT_INCOMPLETE == 4
    line = error_line(capsys)
    # No batch was trained: the one word fills no window (Keras counts a
    # step for the batch that found no data; the token budget puts it back).
    assert "training stopped at step 0 of train.steps=8" in line, line
    assert "ran out" in line and "got 0 of its 4 batches" in line, line
    assert not (run_dir / "model.keras").exists() and not (run_dir / "results.json").exists()


class Budget(keras.callbacks.Callback):
    """Stops training after `steps` steps, saying so (`budget_reached`) when `says`."""

    def __init__(self, steps, says):
        super().__init__()
        self.steps, self.says = steps, says
        self.budget_reached = False

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.steps:
            self.model.stop_training = True
            self.budget_reached = self.says


@pytest.mark.parametrize("says", [True, False])
def test_an_early_stop_is_a_finish_only_when_a_budget_says_so(tmp_path, says):
    model = dense_model()
    callbacks = [guards.DivergenceGuard(), Budget(3, says)]
    if says:
        result = fit_and_save(model, dataset(), train_section(), callbacks, str(tmp_path))
        assert result["steps"] == 3 and (tmp_path / "model.keras").exists()
    else:
        with pytest.raises(guards.TrainingIncomplete, match="step 3 of train.steps=6"):
            fit_and_save(model, dataset(), train_section(), callbacks, str(tmp_path))
        assert not (tmp_path / "model.keras").exists()


def test_the_time_limit_is_a_budget(tmp_path):
    times = iter(range(0, 1000, 10))
    clock = TrainingClock(str(tmp_path), limit_minutes=0.5, clock=lambda: float(next(times)))
    model = dense_model()
    result = fit_and_save(model, dataset(), train_section(),
                          [clock, StepLimit(6), guards.DivergenceGuard()], str(tmp_path))
    assert clock.budget_reached and result["steps"] < 6
    assert (tmp_path / "model.keras").exists()


# ---------------------------------------------------------------- validate before writing


@pytest.mark.parametrize("override, message", [
    ("model.k=8", "`k` must be <= num_experts=4. Received: k=8"),
    ("model.num_experts=0", "`num_experts` must be an integer >= 1"),
    ("model.gating=bogus", "`gating` must be one of"),
])
def test_model_arguments_are_refused_before_anything_is_written(tmp_path, override, message):
    # Before: config.yaml, the vocabulary and cleaning.json were written first.
    lm = load_config(LMConfig, None, [f"data.train={tmp_path}/none.txt", *TINY, override])
    with pytest.raises(ValueError, match=message):
        lm_train.train(lm, str(tmp_path / "lm"))
    translation = load_config(TranslateConfig, None, [
        "model.preset=cpu-gnmt-moe-16", "model.num_experts=4", override])
    with pytest.raises(ValueError, match=message):
        translate_train.train(translation, str(tmp_path / "translate"))
    assert sorted(os.listdir(tmp_path)) == []


def test_a_refused_run_then_the_corrected_one_and_a_corrupt_model(tmp_path, corpus, main,
                                                                  capsys):
    run_dir = tmp_path / "run"
    assert main(lm_args(corpus, run_dir, "model.k=8")) == 2
    assert "Received: k=8" in error_line(capsys)
    assert not run_dir.exists()
    # Before: "the run directory holds a different configuration".
    assert main(lm_args(corpus, run_dir)) == 0
    capsys.readouterr()
    # A corrupt model.keras: before, "File not found" for a file that exists.
    model_file = run_dir / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    assert main(["lm", "evaluate", "--run-dir", str(run_dir), "--data", corpus["valid"]]) == 2
    line = error_line(capsys)
    assert f"{model_file}: corrupt or truncated (1000 bytes" in line, line


def test_a_model_file_that_is_not_a_model_is_named(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("garbage")
    with pytest.raises(ValueError, match=f"{path}: corrupt or truncated"):
        load_model_file(path)
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model_file(tmp_path / "absent.keras")


# ---------------------------------------------------------------- corrupt state


def test_a_truncated_backup_falls_back_to_the_last_checkpoint(tmp_path, capsys):
    # Before: OSError: Unable to synchronously open file (truncated file),
    # naming no file, with an intact checkpoints/last.keras of the same step.
    run_dir = str(tmp_path)
    killed_run(run_dir)
    run = RunDir(run_dir)
    weights = os.path.join(run.backup_dir, WEIGHTS)
    with open(weights, "rb") as f:
        truncated = f.read()[:500]
    with open(weights, "wb") as f:
        f.write(truncated)
    model, result = resume(run_dir)
    assert result["steps"] == 6
    err = capsys.readouterr().err
    assert f"{weights}: not a readable weights file" in err
    assert f"resuming from the newest intact checkpoint, {run.last_checkpoint} (step 2)" in err
    kept = os.path.join(tmp_path, "backup.corrupt-1")
    assert kept in err and result["recovered"] in err
    # The evidence is kept byte for byte; the finished run removed only its own backup.
    with open(os.path.join(kept, WEIGHTS), "rb") as f:
        assert f.read() == truncated
    assert not os.path.exists(run.backup_dir)


def test_garbage_metadata_and_a_corrupt_last_checkpoint_fall_back_to_a_step_checkpoint(
        tmp_path, capsys):
    run_dir = str(tmp_path)
    model = killed_run(run_dir, step=5)  # backup and last.keras of step 4
    run = RunDir(run_dir)
    # A step checkpoint as translation runs keep them (weights and optimizer).
    stepped = dense_model()
    backup = backup_and_restore(run_dir)
    backup.set_model(stepped)
    backup.restore()
    stepped.save_weights(run.step_checkpoint(4))
    del model
    metadata = os.path.join(run.backup_dir, METADATA)
    with open(metadata, "w") as f:
        f.write("{garbage")
    with open(run.last_checkpoint, "wb") as f:
        f.write(b"PK\x03\x04 cut")
    _, result = resume(run_dir)
    assert result["steps"] == 6
    err = capsys.readouterr().err
    assert f"{metadata}: not JSON" in err
    assert f"{run.step_checkpoint(4)} (step 4)" in err
    assert f"{run.last_checkpoint}.corrupt-1" in err
    assert os.path.exists(f"{run.last_checkpoint}.corrupt-1")
    with open(os.path.join(tmp_path, "backup.corrupt-1", METADATA)) as f:
        assert f.read() == "{garbage"


def test_a_corrupt_backup_without_an_intact_checkpoint_is_refused_naming_it(tmp_path):
    run_dir = str(tmp_path)
    killed_run(run_dir)
    run = RunDir(run_dir)
    metadata = os.path.join(run.backup_dir, METADATA)
    with open(metadata, "w") as f:
        f.write("not json")
    os.remove(run.last_checkpoint)
    before = sorted(os.listdir(run.backup_dir))
    with pytest.raises(ValueError, match=f"{metadata}: not JSON.*no intact checkpoint"):
        resume(run_dir)
    assert sorted(os.listdir(run.backup_dir)) == before  # nothing moved


# ---------------------------------------------------------------- run directories


def test_a_run_dir_under_a_file_is_one_line_exit_2(tmp_path, corpus, main, capsys):
    # Before: a raw NotADirectoryError traceback.
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(lm_args(corpus, afile / "sub")) == 2
    assert f"{afile} is a file, not a directory" in error_line(capsys)
    assert main(lm_args(corpus, afile)) == 2
    assert "is a file, not a run directory" in error_line(capsys)


def test_a_run_of_the_other_kind_is_named(tmp_path, corpus, main, capsys):
    # Before: "unknown key `data.batch_size`".
    lm_dir, translate_dir = tmp_path / "lm", tmp_path / "translate"
    lm_dir.mkdir()
    translate_dir.mkdir()
    save_config(LMConfig(), lm_dir / "config.yaml")
    save_config(TranslateConfig(), translate_dir / "config.yaml")
    assert main(["translate", "train", "--run-dir", str(lm_dir)]) == 2
    assert "this directory holds a language-model run" in error_line(capsys)
    assert main(["lm", "train", *lm_args(corpus, translate_dir)[2:]]) == 2
    assert "this directory holds a translation run" in error_line(capsys)
    assert sorted(os.listdir(lm_dir)) == ["config.yaml"]
