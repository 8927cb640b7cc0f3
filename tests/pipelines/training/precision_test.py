"""`train.optimizer` and `train.mixed_precision` in the pipelines."""

import dataclasses

import keras
import numpy as np
import pytest

from keras_moe.optimizers import FactoredAdam
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig
from keras_moe.pipelines.training import trainer
from keras_moe.pipelines.training.config import TrainConfig


def _tiny_lm_config(**train):
    config = LMConfig()
    config.model = dataclasses.replace(config.model, model_dim=8, num_experts=4,
                                       expert_hidden_dim=8, k=2)
    config.train = dataclasses.replace(config.train, **train)
    return config


def test_defaults_keep_adam_and_float32():
    t = TrainConfig()
    assert (t.optimizer, t.mixed_precision) == ("adam", "none")
    assert type(trainer.make_optimizer(t)) is keras.optimizers.Adam


def test_factored_adam_takes_the_train_section():
    t = TrainConfig(optimizer="factored_adam", beta_2=0.99, epsilon=1e-6, clipnorm=0.5)
    optimizer = trainer.make_optimizer(t)
    assert isinstance(optimizer, FactoredAdam)
    assert (optimizer.beta_2, optimizer.epsilon, optimizer.clipnorm) == (0.99, 1e-6, 0.5)
    # The same schedule as Adam's: half the peak rate half-way through the warm-up.
    schedule = keras.optimizers.schedules.deserialize(optimizer.get_config()["learning_rate"])
    assert float(schedule(np.int64(499))) == pytest.approx(t.learning_rate / 2, rel=1e-5)


@pytest.mark.parametrize("key, value", [("optimizer", "sgd"), ("mixed_precision", "fp16")])
def test_bad_choices_are_named(key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        TrainConfig(**{key: value})


@pytest.mark.parametrize("policy, wrapped", [("mixed_bfloat16", False), ("mixed_float16", True)])
def test_mixed_precision_applies_while_the_model_is_built(policy, wrapped):
    before = keras.config.dtype_policy().name
    config = _tiny_lm_config(mixed_precision=policy, optimizer="factored_adam")
    model = lm_train.build_model(config, vocab_size=20)
    assert keras.config.dtype_policy().name == before  # restored for what comes next
    moe = model.get_layer("moe")
    assert moe.experts.dtype_policy.name == policy
    assert moe.gating.compute_dtype == "float32"
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == wrapped
    inner = optimizer.inner_optimizer if wrapped else optimizer
    assert isinstance(inner, FactoredAdam)
    x = np.random.default_rng(0).integers(1, 20, size=(4, 5)).astype("int32")
    history = model.fit(x, np.roll(x, -1, axis=1), epochs=2, batch_size=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
