"""Progress lines (pipelines/progress.py) and training steps (training/step_progress.py)."""

import io
import os
import sys

import keras
import numpy as np
import pytest

from keras_moe.pipelines import progress
from keras_moe.pipelines.training.step_progress import StepProgress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def enabled(monkeypatch):
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    previous = progress.set_enabled(True)
    yield
    progress.set_enabled(previous)


def test_lines_are_throttled_and_carry_counts_rates_and_a_final_total():
    clock, out = FakeClock(), io.StringIO()
    meter = progress.Progress("read", "lines", every=5.0, stream=out, clock=clock)
    # 96 updates of 10 lines and 50 words, 0.125 s apart: 12 s in all.
    for _ in range(96):
        clock.now += 0.125
        meter.update(10, words=50)
    meter.done()
    lines = out.getvalue().splitlines()
    # A line at 5.0 s and at 10.0 s (never closer than 5 s), then the total.
    assert len(lines) == 3
    assert lines[0] == "[read] 400 lines, 2,000 words (80 lines/s, 400 words/s) 5.0 s"
    assert lines[1] == "[read] 800 lines, 4,000 words (80 lines/s, 400 words/s) 10.0 s"
    assert lines[2] == "[read] done: 960 lines, 4,800 words in 12.0 s (80 lines/s, 400 words/s)"


def test_a_known_total_gives_a_percentage():
    clock, out = FakeClock(), io.StringIO()
    meter = progress.Progress("decode", "sentences", total=400, every=1.0, stream=out,
                              clock=clock)
    clock.now += 2.0
    meter.update(100)
    assert out.getvalue() == "[decode] 100/400 sentences (25%) (50 sentences/s) 2.0 s\n"


def test_short_phases_stay_silent_and_quiet_silences_everything(monkeypatch):
    clock, out = FakeClock(), io.StringIO()
    meter = progress.Progress("fast", stream=out, clock=clock, min_seconds=2.0)
    clock.now += 1.0
    meter.update(5)
    meter.done()
    assert out.getvalue() == ""
    progress.set_enabled(False)
    with progress.Progress("slow", stream=out, clock=clock, every=0.0) as meter:
        clock.now += 10.0
        meter.update(5)
    assert out.getvalue() == ""
    progress.set_enabled(True)
    monkeypatch.setenv(progress.QUIET_ENV, "1")
    progress.emit("hidden", out)
    assert out.getvalue() == ""


def test_iterate_yields_the_items_unchanged_and_counts_them():
    clock, out = FakeClock(), io.StringIO()

    def items():
        for i in range(4):
            clock.now += 1.0
            yield f"w{i} x"

    got = list(progress.iterate(items(), "scan", "lines", stream=out, clock=clock, every=100.0,
                                count=lambda line: {"words": len(line.split())}))
    assert got == ["w0 x", "w1 x", "w2 x", "w3 x"]
    assert out.getvalue() == "[scan] done: 4 lines, 8 words in 4.0 s (1 lines/s, 2 words/s)\n"


def test_tensorboard_command_works_as_typed_outside_an_activated_virtualenv(monkeypatch, tmp_path):
    beside = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if not os.path.exists(beside):
        pytest.skip(f"no tensorboard script beside {sys.executable}")
    monkeypatch.setenv("PATH", str(tmp_path))  # no tensorboard on the PATH
    command = progress.tensorboard_command("runs/demo/tensorboard")
    assert command == f"{beside} --logdir runs/demo/tensorboard"


def test_step_progress_reports_steps_not_epochs(capsys):
    clock = FakeClock()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            clock.now += 2.0  # two seconds a step

    steps = StepProgress(12, verbose=1, every=5.0, tokens_per_step=100, clock=clock)
    x, y = np.zeros((8, 2), np.float32), np.zeros((8, 1), np.float32)
    model.fit(x, y, batch_size=2, epochs=3, steps_per_epoch=4, verbose=0,
              validation_data=(x, y), callbacks=[Tick(), steps])
    lines = steps.lines
    assert lines[0].startswith("step 1/12: first step (tracing and compiling) took 2.0 s")
    # Then at most one line every 5 s: steps 4, 7, 10 (6 s apart), and one per evaluation.
    step_lines = [line for line in lines[1:] if "evaluation" not in line]
    assert [line.split()[1] for line in step_lines] == ["4/12", "7/12", "10/12"]
    assert "0.50 steps/s, 50 tokens/s" in step_lines[0]
    evaluations = [line for line in lines if "evaluation" in line]
    assert [line.split()[1] for line in evaluations] == ["4/12", "8/12", "12/12"]
    assert "val_loss" in evaluations[0]
    assert not any("Epoch" in line for line in lines)
    assert "[train] step 4/12 evaluation" in capsys.readouterr().err
    quiet = StepProgress(12, verbose=0, clock=clock)
    model.fit(x, y, batch_size=2, epochs=1, steps_per_epoch=4, verbose=0, callbacks=[quiet])
    assert quiet.lines == []


def test_a_time_limited_run_shows_its_whole_time_against_the_limit():
    clock = FakeClock()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            clock.now += 30.0  # half a minute a step

    # A resumed run: 4 minutes spent in earlier sittings, which the limit counts.
    start = clock.now
    resumed = StepProgress(4, verbose=2, time_limit_minutes=10, clock=clock,
                           elapsed=lambda: 240.0 + clock.now - start)
    alone = StepProgress(4, verbose=2, time_limit_minutes=10, clock=clock)
    x, y = np.zeros((8, 2), np.float32), np.zeros((8, 1), np.float32)
    model.fit(x, y, batch_size=2, epochs=2, steps_per_epoch=2, verbose=0,
              callbacks=[Tick(), resumed, alone])
    # The first step took 0.5 min; the evaluations come after 1 and 2 minutes.
    assert [line.rsplit("[", 1)[1] for line in resumed.lines] == [
        "4.5 of 10 min]", "5.0 of 10 min]", "6.0 of 10 min]"]
    assert [line.rsplit("[", 1)[1] for line in alone.lines] == [
        "0.5 of 10 min]", "1.0 of 10 min]", "2.0 of 10 min]"]


def test_wordpiece_learning_says_what_it_learns_from_and_how_long_it_took(capsys):
    from keras_moe.pipelines.data.wordpiece import WordPieceVocabulary

    WordPieceVocabulary.learn(["the cat sat", "the dog sat"] * 20, vocab_size=40, lower_thresh=2)
    err = capsys.readouterr().err
    assert "[vocabulary: learn pieces] 4 distinct words, 40 tokens wanted" in err
    assert "[vocabulary: learn pieces] done in " in err
    progress.set_enabled(False)
    WordPieceVocabulary.learn(["the cat sat"] * 20, vocab_size=40, lower_thresh=2)
    assert capsys.readouterr().err == ""
