"""The collapse alarm on clean (inference) routing at every validation.

A language model whose gate is forced so that one expert wins every clean
decision (`W_g = 0`: all logits tie and top-1 takes expert 0) collapses at
inference, while in training the gate's noise spreads the same tokens
evenly: the validation callback must flag the first and the training
routing's alarm stays silent. The expected statistics are worked out with
NumPy from the forced load.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf

from keras_moe import alarms, statistics
from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.training import routing_checks
from tests.pipelines.lm.train_test import tiny_config, write_corpus


@pytest.fixture
def forced(tmp_path):
    corpus = {"train": write_corpus(tmp_path / "train.txt", 200, 0),
              "valid": write_corpus(tmp_path / "valid.txt", 30, 1)}
    config = tiny_config(corpus, "model.k=1")
    vocab = lm_train.build_vocabulary(config, None)
    model = lm_train.TASK.build_model(config, len(vocab))
    (moe,) = find_moe_layers(model)
    # Every clean logit ties: top-1 takes expert 0 for every position. The
    # noise scale is softplus(0) + epsilon, so training routing is random.
    moe.gating.w_gate.assign(tf.zeros_like(moe.gating.w_gate))
    moe.gating.w_noise.assign(tf.zeros_like(moe.gating.w_noise))
    return config, vocab, model, corpus


def numpy_statistics(counts):
    counts = np.asarray(counts, np.float64)
    mean = counts.mean()
    return {"cv_load": counts.std() / mean, "max_mean_load": counts.max() / mean,
            "zero_expert_fraction": np.mean(counts == 0),
            "top_share": np.sort(counts)[-1] / counts.sum()}


def test_clean_routing_collapse_is_logged_and_warned(forced, caplog):
    config, vocab, model, _ = forced
    validation, _, _ = lm_train.TASK.validation(config, vocab)
    validation.set_model(model)
    with caplog.at_level(logging.WARNING, logger=routing_checks.logger.name):
        logs = validation.validate(model)
    # All the load on expert 0 of 4 (k=1 gates are 1: importance the same).
    expected = numpy_statistics([1.0, 0.0, 0.0, 0.0])
    for key, value in expected.items():
        assert logs[f"val_moe_{key}"] == pytest.approx(value), key
    assert logs["val_moe_cv_importance"] == pytest.approx(np.sqrt(3.0))
    assert logs["val_moe_collapsed"] == 1.0
    assert np.isfinite(logs["val_perplexity"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "'moe'" in warnings[0] and "clean (inference) routing" in warnings[0]
    assert "max/mean load 4.000 > max_mean_threshold=3.0" in warnings[0]
    assert "3 experts got no token (fraction 0.750 > zero_expert_fraction_threshold=0.25)" in (
        warnings[0])


def test_training_routing_of_the_same_model_does_not_raise_the_alarm(forced):
    _, vocab, model, corpus = forced
    with open(corpus["valid"], encoding="utf-8") as f:
        rows = [vocab.encode_line(line) for line in f if line.strip()]
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    clean = model(tokens, training=False, return_routing=True)[1]["moe"]
    noisy = model(tokens, training=True, return_routing=True)[1]["moe"]
    positions = int((tokens != 0).sum())
    # Clean: every position on expert 0. Training: the noise spread them.
    assert np.asarray(clean.counts).tolist() == [positions, 0, 0, 0]
    assert float(np.sum(noisy.counts)) == positions
    clean_reasons = alarms.collapse_reasons(statistics.summary(clean.importance, clean.counts))
    noisy_stats = statistics.summary(noisy.importance, noisy.counts)
    assert len(clean_reasons) == 3
    assert alarms.collapse_reasons(noisy_stats) == [], noisy_stats
    assert noisy_stats["max_mean_load"] == pytest.approx(
        numpy_statistics(np.asarray(noisy.counts))["max_mean_load"])


def test_healthy_routing_logs_values_without_a_warning(caplog):
    routing = {"enc": {"set_load_share": [0.25, 0.25, 0.3, 0.2], "set_cv_importance": 0.1}}
    with caplog.at_level(logging.WARNING, logger=routing_checks.logger.name):
        logs = routing_checks.validation_logs(routing, step=7)
    assert caplog.records == []
    assert logs["val_enc_collapsed"] == 0.0
    assert logs["val_enc_max_mean_load"] == pytest.approx(1.2)
    assert logs["val_enc_cv_importance"] == 0.1
    assert set(logs) == {f"val_enc_{k}" for k in (*routing_checks.LOGGED, "collapsed")}


def test_evaluation_check_puts_the_training_values_beside(tmp_path, caplog):
    (tmp_path / "history.csv").write_text(
        "epoch,step,loss,moe_cv_load,moe_max_mean_load\n0,10,3.0,0.5,1.5\n1,20,2.5,0.07,1.2\n")
    routing = {"moe": {"set_load_share": [0.8, 0.2, 0.0, 0.0], "set_cv_importance": 1.0}}
    with caplog.at_level(logging.WARNING, logger=routing_checks.logger.name):
        check = routing_checks.evaluation_check(routing, str(tmp_path), "test.txt")
    layer = check["layers"]["moe"]
    assert layer["collapsed"] is True and layer["max_mean_load"] == pytest.approx(3.2)
    assert layer["training"] == {"step": 20, "cv_load": 0.07, "max_mean_load": 1.2}
    assert check["thresholds"]["max_mean_threshold"] == 3.0
    (message,) = [r.getMessage() for r in caplog.records]
    assert "'moe'" in message and "on test.txt" in message and "3.200" in message
