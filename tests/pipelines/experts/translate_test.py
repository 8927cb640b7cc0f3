"""`keras-moe experts select` and the heat map on a tiny translation run; the subset exports."""

import json

import keras
import numpy as np
import pytest

from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines.cli import main
from keras_moe.pipelines.config import save_config
from keras_moe.pipelines.training.rundir import RunDir
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import train as translate_train
from keras_moe.pipelines.translate.export import load_translator
from tests.pipelines.translate.train_test import lines, tiny_config, write_corpus


@pytest.fixture(scope="module", autouse=True)
def in_process():
    """`cli.main` runs here instead of re-executing itself with its environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_MOE_NO_REEXEC", "1")
        yield


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory):
    """A translation run directory written without training (config, vocabulary, model).

    The routing of an untrained model would tie (its gates start at zero),
    so the gates get random weights: each expert then has its own traffic.
    """
    base = tmp_path_factory.mktemp("experts_translate")
    corpus = write_corpus(base)
    config = tiny_config(corpus)
    vocab = translate_train.build_vocabulary(config, None)
    run = RunDir(base / "run")
    run.makedirs()
    save_config(config, run.config_file)
    run.save_vocabulary(vocab)
    keras.utils.set_random_seed(0)
    model = translate_train.TASK.build_model(config, len(vocab))
    rng = np.random.default_rng(0)
    for layer in find_moe_layers(model):
        layer.gating.w_gate.assign(rng.normal(size=layer.gating.w_gate.shape))
    model.save(run.model_file)
    return base, str(base / "run"), corpus


@pytest.fixture(scope="module")
def selected(translation_run):
    base, run_dir, corpus = translation_run
    out = base / "select"
    valid = corpus["valid"]
    assert main(["experts", "select", "--run-dir", run_dir, "--data", valid["en"],
                 "--target", valid["de"], "--keep", "0.5", "--out", str(out)]) == 0
    return out, json.loads((out / "experts.json").read_text())


def test_select_on_a_translation_run_keeps_the_most_used_experts(translation_run, selected):
    _, run_dir, corpus = translation_run
    out, report = selected
    valid = corpus["valid"]
    assert report["kind"] == "translate"
    assert set(report["kept"]) == {"encoder_moe", "decoder_moe"}
    # Independently: the full model's routing of the pairs, counted per expert.
    _, vocab, model, _ = translate_train.load_run(run_dir, average=0)
    pairs = list(zip(lines(valid["en"]), lines(valid["de"]), strict=True))
    counts = {}
    for inputs, _, _ in translate_input.evaluation_batches(pairs, vocab, 64):
        _, extras = model(inputs, training=False, return_routing=True)
        for name, routing in extras["routing"].items():
            counts[name] = counts.get(name, 0) + np.asarray(routing.counts, np.float64)
    for name, kept in report["kept"].items():
        assert kept == sorted(np.argsort(-counts[name], kind="stable")[:2].tolist())
    result = translate_train.evaluate_pairs(model, vocab, pairs)
    assert report["before"]["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
    assert report["after"]["experts"] == {"encoder_moe": 2, "decoder_moe": 2}
    assert "bleu" in report["before"] and "bleu" in report["after"]
    assert report["after"]["weight_bytes"] < report["before"]["weight_bytes"]
    _, _, small, _ = translate_train.load_run(str(out))
    assert [layer.num_experts for layer in find_moe_layers(small)] == [2, 2]


@pytest.mark.slow
def test_the_subset_run_evaluates_and_exports(translation_run, selected, capsys):
    base, _, corpus = translation_run
    out, _ = selected
    test = corpus["test"]
    assert main(["translate", "evaluate", "--run-dir", str(out), "--src", test["en"],
                 "--ref", test["de"]]) == 0
    assert "bleu" in json.loads(capsys.readouterr().out)
    config, vocab, small, _ = translate_train.load_run(str(out))
    exported = base / "export"
    translate_train.export(str(out), str(exported))
    source = lines(test["en"])[:4]
    expected = translate_train.translate_lines(small, vocab, source, config.decode)
    assert load_translator(str(exported))(source) == expected


def test_translation_runs_need_the_target_side(translation_run, tmp_path, capsys):
    _, run_dir, corpus = translation_run
    assert main(["experts", "prune", "--run-dir", run_dir, "--data", corpus["valid"]["en"],
                 "--threshold", "0.1", "--out", str(tmp_path / "p")]) == 2
    assert "--target" in capsys.readouterr().err


def test_heatmap_of_a_translation_run_draws_the_encoder_layer(translation_run, tmp_path):
    _, run_dir, corpus = translation_run
    out = tmp_path / "heat"
    assert main(["experts", "heatmap", "--run-dir", run_dir, "--domain",
                 f"valid={corpus['valid']['en']}", "--domain", f"test={corpus['test']['en']}",
                 "--out", str(out)]) == 0
    result = json.loads((out / "heatmap.json").read_text())
    assert list(result["layers"]) == ["encoder_moe"]
    shares = np.asarray(result["layers"]["encoder_moe"]["shares"])
    np.testing.assert_allclose(shares.sum(axis=0), [1.0, 1.0])
    assert (out / "heatmap_encoder_moe.png").read_bytes()[:4] == b"\x89PNG"
