"""TensorBoard of `lm train` / `translate train` runs, read back with TensorBoard's own reader.

Every evaluation writes `validation/epoch_<name>` (loss, perplexity, BLEU,
chrF, the clean routing of every MoE layer) and `train/epoch_<name>` (the
epoch's training values and the learning rate) at the optimizer's step,
equal to the row `history.csv` holds for that step; a resumed run goes on
from its last evaluation without writing a step twice.
"""

import csv
import glob
import math
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from keras_moe.pipelines.config import load_config
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.training.summaries import learning_rate, split_logs
from keras_moe.pipelines.translate import train as translate_train
from keras_moe.pipelines.translate.config import TranslateConfig
from tests.pipelines.lm.train_test import tiny_config as lm_config
from tests.pipelines.lm.train_test import write_corpus as write_lm_corpus
from tests.pipelines.translate.train_test import TINY as TRANSLATE_TINY
from tests.pipelines.translate.train_test import corpus_sets, write_pairs


def read_scalars(directory):
    """`{tag: [(step, value), ...]}` of a TensorBoard run directory."""
    acc = event_accumulator.EventAccumulator(
        str(directory), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        if all(v.shape == () for _, v in values):
            out[tag] = [(step, float(v)) for step, v in values]
    return out


def read_history(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_matches_history(run_dir, names, validation_names):
    """Every evaluation's `epoch_*` point sits at its step and holds `history.csv`'s value."""
    rows = read_history(run_dir)
    steps = [int(row["step"]) for row in rows]
    train = read_scalars(os.path.join(run_dir, "tensorboard", "train"))
    valid = read_scalars(os.path.join(run_dir, "tensorboard", "validation"))
    for scalars, keys, prefix in ((train, names, ""), (valid, validation_names, "val_")):
        for name in keys:
            points = scalars.get(f"epoch_{name}")
            assert points is not None, (name, sorted(scalars))
            assert [s for s, _ in points] == steps, (name, points, steps)
            expected = [float(row[prefix + name]) for row in rows]
            assert [v for _, v in points] == pytest.approx(expected, rel=1e-6), name
    return train, valid, steps


def expected_learning_rate(t, step):
    """`WarmupInverseSqrt` at the optimizer's step, worked out here."""
    s = step + 1.0
    rise = min(s / max(t.warmup_steps, 1), 1.0)
    if t.decay == "constant":
        return t.learning_rate * rise
    return t.learning_rate * min(rise, math.sqrt(max(t.warmup_steps, 1) / s))


@pytest.fixture
def lm_corpus(tmp_path):
    return {"train": write_lm_corpus(tmp_path / "train.txt", 200, 0),
            "valid": write_lm_corpus(tmp_path / "valid.txt", 30, 1)}


def test_lm_run_has_every_evaluation_on_the_step_axis(tmp_path, lm_corpus):
    run_dir = str(tmp_path / "run")
    config = lm_config(lm_corpus, "train.steps=4", "train.steps_per_eval=2")
    lm_train.train(config, run_dir)
    train, valid, steps = assert_matches_history(
        run_dir, ["loss", "perplexity", "moe_cv_load", "moe_max_mean_load"],
        ["loss", "perplexity", "moe_cv_load", "moe_max_mean_load",
         "moe_zero_expert_fraction", "moe_top_share", "moe_cv_importance"],
    )
    assert steps == [2, 4]
    rates = train["epoch_learning_rate"]
    assert [s for s, _ in rates] == steps
    assert [v for _, v in rates] == pytest.approx(
        [expected_learning_rate(config.train, s) for s in steps], rel=1e-5)
    # One writer (one event file) per directory: TensorBoard follows only the
    # newest file of a run directory while it is written.
    for name in ("train", "validation"):
        assert len(glob.glob(os.path.join(run_dir, "tensorboard", name, "events.*"))) == 1
    # The batch curves are still there, at their steps.
    assert [s for s, _ in train["batch_loss"]] == [1, 2, 3, 4]
    # `lm evaluate` on the validation file with the final weights (those of
    # the last evaluation) reports the same clean routing, its alarm, and
    # the training values beside it; the statistics worked out from the
    # load shares with NumPy.
    evaluated = lm_train.evaluate(run_dir, lm_corpus["valid"])
    check = evaluated["routing_check"]["layers"]["moe"]
    last = read_history(run_dir)[-1]
    shares = np.asarray(evaluated["routing"]["moe"]["set_load_share"])
    numpy = {"cv_load": shares.std() / shares.mean(), "max_mean_load": shares.max() / shares.mean(),
             "zero_expert_fraction": np.mean(shares == 0)}
    for key, value in numpy.items():
        assert check[key] == pytest.approx(value, abs=1e-9)
        assert float(last[f"val_moe_{key}"]) == pytest.approx(value, rel=1e-6)
    assert check["collapsed"] == bool(check["reasons"]) == (last["val_moe_collapsed"] == "1.0")
    assert check["training"]["step"] == 4
    assert check["training"]["cv_load"] == pytest.approx(float(last["moe_cv_load"]))


def test_resumed_lm_run_continues_the_curves_without_repeating_a_step(tmp_path, lm_corpus):
    run_dir = tmp_path / "run"
    # A first sitting stopped by its time limit after one step, then "killed"
    # (no model.keras); the second resumes from its backup.
    lm_train.train(lm_config(lm_corpus, "train.steps=4", "train.steps_per_eval=2",
                             "train.time_limit_minutes=0.0001"), str(run_dir))
    first = [int(row["step"]) for row in read_history(run_dir)]
    assert first == [1]
    os.remove(run_dir / "model.keras")
    lm_train.train(lm_config(lm_corpus, "train.steps=4", "train.steps_per_eval=2"),
                   str(run_dir))
    # Then a finished run continued to more steps.
    lm_train.train(lm_config(lm_corpus, "train.steps=6", "train.steps_per_eval=2"),
                   str(run_dir))
    _, valid, steps = assert_matches_history(
        str(run_dir), ["loss", "learning_rate"][:1], ["loss", "perplexity", "moe_cv_load"])
    assert steps[0] == 1 and steps[-1] == 6
    assert steps == sorted(set(steps)), steps
    assert len(glob.glob(str(run_dir / "tensorboard" / "validation" / "events.*"))) == 3


# Slow (about 30 s: a translation run with greedy BLEU at every evaluation);
# the LM runs above check the same writer in `make test`.
@pytest.mark.slow
def test_translation_run_has_bleu_chrf_and_both_layers_clean_routing(tmp_path):
    corpus = {"train": write_pairs(tmp_path, "train", 200, 0),
              "valid": write_pairs(tmp_path, "valid", 12, 1)}
    # Greedy decoding and no test split: the cheapest run that has every value.
    config = load_config(TranslateConfig, None, [*corpus_sets(corpus, ("train", "valid")),
                                                 *TRANSLATE_TINY, "decode.beam_width=1"])
    run_dir = str(tmp_path / "run")
    translate_train.train(config, run_dir)
    layers = ("encoder_moe", "decoder_moe")
    _, valid, steps = assert_matches_history(
        run_dir, ["loss", "encoder_moe_cv_load", "decoder_moe_cv_load"],
        ["loss", "perplexity", "bleu", "chrf",
         *(f"{layer}_{s}" for layer in layers for s in ("cv_load", "max_mean_load",
                                                        "zero_expert_fraction", "collapsed"))],
    )
    assert steps == [1, 2]
    evaluated = translate_train.evaluate(run_dir, corpus["valid"]["en"], [corpus["valid"]["de"]],
                                         beam_width=1, out=str(tmp_path / "valid.hyp"))
    last = read_history(run_dir)[-1]
    for layer in layers:
        check = evaluated["routing_check"]["layers"][layer]
        assert check["max_mean_load"] == pytest.approx(
            float(last[f"val_{layer}_max_mean_load"]), rel=1e-6)


def test_split_logs_and_learning_rate():
    import keras

    assert split_logs({"loss": 1, "val_bleu": 2.5, "val_x": "text", "flag": True}) == (
        {"loss": 1.0}, {"bleu": 2.5})
    optimizer = keras.optimizers.Adam(0.25)
    assert learning_rate(optimizer) == 0.25
    assert learning_rate(object()) is None
