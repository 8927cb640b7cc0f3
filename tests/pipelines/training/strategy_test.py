"""`distribution.make_strategy` (the one place strategies are made), the
pipelines' optimizer opt-in for expert parallelism, and `check_model`'s refusal
of an expert-parallel model whose optimizer is not wrapped."""

import keras
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import expert_parallel as ep
from keras_moe.pipelines.lm.config import STRATEGIES
from keras_moe.pipelines.training import distribution, multi_worker


def test_one_list_of_strategies():
    assert STRATEGIES == ("default", "mirrored", "multi_worker", "tpu")
    # `multi_worker` keeps no list (nor `make_strategy`) of its own.
    assert not hasattr(multi_worker, "STRATEGIES")
    assert not hasattr(multi_worker, "make_strategy")
    assert distribution.make_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="must be one of 'default', 'mirrored', 'multi_worker', 'tpu'"):
        distribution.make_strategy("parameter_server")


def test_pipelines_wrap_the_optimizer_only_for_expert_parallel():
    adam = keras.optimizers.Adam(1e-3)
    assert distribution.expert_parallel_optimizer(adam, False) is adam
    wrapped = distribution.expert_parallel_optimizer(adam, True)
    assert isinstance(wrapped, keras_moe.ExpertParallelOptimizer)
    assert wrapped.get_config()["optimizer"]["class_name"] == "Adam"


def _model(optimizer, shard):
    inputs = keras.Input((4,))
    moe = keras_moe.MoE(4, 8, k=1, name="moe")
    model = keras.Model(inputs, moe(inputs))
    if shard:
        # As an expert-parallel layer built on several replicas marks them.
        for variable in moe.experts.weights:
            ep.mark_sharded(variable)
    model.compile(optimizer, "mse")
    return model


def test_check_model_refuses_an_unwrapped_optimizer_for_expert_shards():
    with pytest.raises(ValueError, match=r"ExpertParallelOptimizer.*Received: optimizer=Adam"):
        distribution.check_model(_model(keras.optimizers.Adam(), shard=True), "mirrored")
    distribution.check_model(
        _model(keras_moe.ExpertParallelOptimizer(keras.optimizers.Adam()), shard=True), "mirrored"
    )
    distribution.check_model(_model(keras.optimizers.Adam(), shard=False), "mirrored")
