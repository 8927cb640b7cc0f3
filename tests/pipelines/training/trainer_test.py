"""Tests of keras_moe.pipelines.training.trainer's parts that need no training run.

(The end-to-end runs are tests/pipelines/lm/train_test.py and
tests/pipelines/translate/train_test.py.)
"""

import types

import keras
import numpy as np
import pytest

from keras_moe.pipelines.lm.config import LMConfig
from keras_moe.pipelines.lm.train import TASK as LM_TASK
from keras_moe.pipelines.training import trainer
from keras_moe.pipelines.translate.config import TranslateConfig
from keras_moe.pipelines.translate.train import TASK as TRANSLATE_TASK


def learning_rates(optimizer, steps):
    """The optimizer's schedule, rebuilt from its config, at each step."""
    schedule = keras.optimizers.schedules.deserialize(optimizer.get_config()["learning_rate"])
    return [float(schedule(np.int64(s))) for s in steps]


def test_make_optimizer_takes_the_train_section():
    t = LMConfig().train  # 0.002, 1000 warm-up steps, inverse_sqrt
    optimizer = trainer.make_optimizer(t)
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon, optimizer.clipnorm) == (
        0.9, 0.999, 1e-7, 1.0)
    # Keras counts steps from 0: step s has s + 1 = 500 (half the warm-up),
    # 1000 (the peak), 4000 (decayed by sqrt(1000 / 4000)).
    assert learning_rates(optimizer, [499, 999, 3999]) == pytest.approx(
        [0.001, 0.002, 0.001], rel=1e-5)


def test_make_optimizer_hold_steps_keep_the_peak():
    t = TranslateConfig().train  # 0.001, 2000 warm-up, 8000 held
    held = trainer.make_optimizer(t, hold_steps=t.hold_steps)
    # Peak from step 2000 to 10000, then 1 / sqrt: at 40000, half the peak.
    assert learning_rates(held, [999, 1999, 9999, 39999]) == pytest.approx(
        [0.0005, 0.001, 0.001, 0.0005], rel=1e-5)
    plain = trainer.make_optimizer(t)
    assert learning_rates(plain, [7999]) == pytest.approx([0.0005], rel=1e-5)


def test_each_task_gives_its_schedule():
    assert LM_TASK.hold_steps(LMConfig().train) == 0
    assert TRANSLATE_TASK.hold_steps(TranslateConfig().train) == 8000


@pytest.mark.parametrize("task, config, message", [
    (LM_TASK, TranslateConfig(), "`config` must be an LMConfig. Received: TranslateConfig"),
    (TRANSLATE_TASK, LMConfig(), "`config` must be a TranslateConfig. Received: LMConfig"),
])
def test_train_refuses_another_tasks_config_before_anything_else(task, config, message,
                                                                 tmp_path):
    with pytest.raises(TypeError, match=message):
        trainer.train(task, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


class Fixed(trainer.Validation):
    def validate(self, model):
        return {"val_score": float(model.value)}


def test_validation_adds_its_values_to_the_logs():
    callback = Fixed()
    callback.set_model(types.SimpleNamespace(value=7.0))
    logs = {"loss": 1.0}
    callback.on_epoch_end(0, logs)
    assert logs == {"loss": 1.0, "val_score": 7.0}
    callback.on_epoch_end(1, None)  # nothing to add to


def test_load_run_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        trainer.load_run(LM_TASK, tmp_path)
