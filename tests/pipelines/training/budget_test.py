"""Tests of `TokenBudget` (keras_moe.pipelines.training.budget) on a one-layer model.

The data are `n` batches from a generator (a dataset of unknown length, as
the pipelines' are); every expected step and token count is worked out by
hand from `n`, the batches per epoch and the tokens per step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.pipelines.training.budget import StepLimit, TokenBudget, budget_steps


def model_and_data(n):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")

    def batches():
        rng = np.random.default_rng(0)
        for _ in range(n):
            yield rng.normal(size=(2, 3)).astype("float32"), np.ones((2, 1), "float32")

    spec = (tf.TensorSpec((2, 3), tf.float32), tf.TensorSpec((2, 1), tf.float32))
    return model, tf.data.Dataset.from_generator(batches, output_signature=spec)


class Steps(keras.callbacks.Callback):
    """Counts the batches trained and records each epoch's logs."""

    def __init__(self):
        super().__init__()
        self.batches, self.logs = 0, []

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


def fit(model, data, callbacks, epochs=10, steps_per_epoch=3):
    steps = Steps()
    model.fit(data, epochs=epochs, steps_per_epoch=steps_per_epoch,
              callbacks=[*callbacks, steps], verbose=0)
    return steps


def test_budget_steps_by_hand():
    assert budget_steps(60_000_000, 5000) == 12_000
    assert budget_steps(60_000_001, 5000) == 12_001
    assert budget_steps(1, 5000) == 1


def test_stops_after_the_step_that_reaches_the_budget():
    # 70 tokens at 10 a step: 7 steps, the last inside the third epoch of 3.
    model, data = model_and_data(100)
    budget = TokenBudget(tokens_per_step=10, max_tokens=70, steps_per_epoch=3)
    steps = fit(model, data, [budget])
    assert steps.batches == 7 == int(model.optimizer.iterations.numpy())
    assert budget.budget_reached and not budget.data_exhausted
    assert budget.stopped_at_step == 7 and budget.tokens == 70
    assert [log["tokens"] for log in steps.logs] == [30, 60, 70]


@pytest.mark.parametrize("n", [7, 9])  # the data ends inside an epoch / at an epoch's end
def test_the_end_of_the_data_ends_a_one_pass_run(n, capsys):
    model, data = model_and_data(n)
    budget = TokenBudget(tokens_per_step=10, max_tokens=1000, steps_per_epoch=3)
    steps = fit(model, data, [budget])
    # Every batch once, none again: Keras would start the data over at the next epoch.
    assert steps.batches == n
    # The optimizer's step is the steps trained (not one more for the step
    # that found no batch).
    assert int(model.optimizer.iterations.numpy()) == n
    assert budget.data_exhausted and budget.budget_reached
    assert budget.tokens == 10 * n and steps.logs[-1]["tokens"] == 10 * n
    assert f"ended after {10 * n:,} training tokens" in capsys.readouterr().out


def test_without_a_budget_it_counts_and_reports_an_early_end_as_no_budget():
    model, data = model_and_data(5)
    budget = TokenBudget(tokens_per_step=4, steps_per_epoch=3)
    steps = fit(model, data, [budget])
    assert steps.batches == 5
    assert budget.data_exhausted and not budget.budget_reached


def test_another_stop_is_not_the_end_of_the_data():
    # StepLimit ends the run inside an epoch: neither budget nor data.
    model, data = model_and_data(100)
    budget = TokenBudget(tokens_per_step=10, max_tokens=1000, steps_per_epoch=3)
    steps = fit(model, data, [StepLimit(4), budget])
    assert steps.batches == 4
    assert not budget.data_exhausted and not budget.budget_reached
    assert budget.stopped_at_step is None


def test_a_resumed_run_counts_from_the_optimizer_step():
    model, data = model_and_data(100)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(5)
    budget = TokenBudget(tokens_per_step=10, max_tokens=80, steps_per_epoch=3)
    steps = fit(model, data, [budget])
    # From 50 tokens on: 3 more steps reach 80.
    assert steps.batches == 3 and budget.tokens == 80
    assert steps.logs[-1]["tokens"] == 80


def test_validation_values_go_to_tensorboard_by_tokens(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    class FakeValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_perplexity"] = 100.0 - epoch

    model, data = model_and_data(100)
    budget = TokenBudget(tokens_per_step=10, max_tokens=60, steps_per_epoch=3,
                         log_dir=str(tmp_path))
    fit(model, data, [FakeValidation(), budget])
    acc = event_accumulator.EventAccumulator(str(tmp_path / "by_tokens"),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("tokens/val_perplexity")
    assert [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events] == [
        (30, 100.0), (60, 99.0)
    ]


@pytest.mark.parametrize("kwargs, name", [
    (dict(tokens_per_step=0), "tokens_per_step"),
    (dict(tokens_per_step=10, max_tokens=0), "max_tokens"),
    (dict(tokens_per_step=10, steps_per_epoch=2.5), "steps_per_epoch"),
    (dict(tokens_per_step=True), "tokens_per_step"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be an integer >= 1"):
        TokenBudget(**kwargs)
