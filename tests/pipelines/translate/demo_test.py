"""`keras-moe demo` (the README's `make demo`): the translation demo end to end.

The demo reads gettext catalogues; the test writes its own `.mo` files (the
word-substitution corpus of translate_train_test) into a locale root, so the
result does not depend on what the machine has installed. A separate test
reads this machine's own catalogues when it has them.
"""

import json
import os

import numpy as np
import pytest
import sacrebleu

from keras_moe.pipelines.data import corpora
from keras_moe.pipelines.translate.demo import TranslateDemoConfig, _gettext_parts
from tests.pipelines.data.corpora_test import write_mo
from tests.pipelines.translate.train_test import ENGLISH, LEXICON, lines, run_cli


def substitution_messages(count, seed):
    rng = np.random.default_rng(seed)
    messages = {}
    while len(messages) < count:
        words = list(rng.choice(ENGLISH, int(rng.integers(2, 7))))
        messages[" ".join(words)] = " ".join(LEXICON[w] for w in words)
    return messages


@pytest.fixture(scope="module")
def locale_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("locale")
    write_mo(root, "de", "demo", substitution_messages(500, 0))
    return root


TINY = ["--minutes", "0.05", "--model-dim", "16", "--expert-hidden-dim", "8",
        "--vocab-size", "120", "--batch-tokens", "256", "--steps-per-eval", "4",
        "--eval-sentences", "12", "--beam-width", "2"]


@pytest.fixture(scope="module")
def demo_run(locale_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    done = run_cli("demo", "--gettext-root", str(locale_root), "--run-dir", str(run_dir), *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


def test_demo_splits_the_catalogues_into_parallel_files(demo_run, locale_root):
    run_dir, _ = demo_run
    pairs, _ = corpora.gettext_pairs("de", str(locale_root))
    train, valid, test = corpora.split_deterministic(pairs)
    assert lines(run_dir / "data" / "train.en") == [s for s, _ in train]
    assert lines(run_dir / "data" / "train.de") == [t for _, t in train]
    assert lines(run_dir / "data" / "test.de") == [t for _, t in test][:12]
    assert len(train) + len(valid) + len(test) == 500


def test_demo_reports_bleu_with_signature_perplexity_and_expert_load(demo_run):
    run_dir, stdout = demo_run
    results = json.loads((run_dir / "results.json").read_text())
    test = results["test"]
    hyps = lines(test["hypotheses_file"])
    refs = lines(run_dir / "data" / "test.de")
    expected = sacrebleu.corpus_bleu(hyps, [refs])
    assert test["bleu"] == pytest.approx(expected.score, abs=1e-9)
    assert f"test BLEU {test['bleu']:.2f}" in stdout
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in stdout
    assert f"perplexity {test['perplexity']:.2f}" in stdout
    for layer in ("encoder_moe", "decoder_moe"):
        stats = results["routing_valid"][layer]
        assert f"expert load, {layer}" in stdout
        assert sum(stats["set_load_share"]) == pytest.approx(1.0)
    assert "tensorboard --logdir" in stdout
    assert os.path.isdir(run_dir / "tensorboard")


def test_demo_run_directory_config_repeats_the_run(demo_run):
    from keras_moe.pipelines.config import load_config
    from keras_moe.pipelines.translate.config import TranslateConfig

    run_dir, _ = demo_run
    config = load_config(TranslateConfig, run_dir / "config.yaml")
    assert config.data.train[0].source == str(run_dir / "data" / "train.en")
    assert config.model.preset == "cpu-gnmt-moe-16" and config.model.model_dim == 16


def test_demo_without_catalogues_says_so_and_how_to_use_other_data(tmp_path):
    done = run_cli("demo", "--gettext-root", str(tmp_path / "none"), "--run-dir",
                   str(tmp_path / "run"))
    assert done.returncode == 2
    assert "no gettext message catalogues" in done.stderr
    assert str(tmp_path / "none") in done.stderr
    assert "--data DIR" in done.stderr and "--tfds" in done.stderr


def test_demo_data_directory_missing_split_names_it(tmp_path):
    (tmp_path / "train.en").write_text("a\n")
    (tmp_path / "train.de").write_text("b\n")
    done = run_cli("demo", "--data", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "no valid files" in done.stderr and "val.en" in done.stderr


def test_this_machines_catalogues_give_tens_of_thousands_of_pairs(tmp_path):
    if not os.path.isdir(os.path.join(corpora.GETTEXT_ROOT, "de", "LC_MESSAGES")):
        pytest.skip(f"this machine has no German catalogues in {corpora.GETTEXT_ROOT}")
    config = TranslateDemoConfig(run_dir=str(tmp_path), eval_sentences=50)
    train, valid, test, source = _gettext_parts(config, str(tmp_path / "data"))
    assert "train/valid/test pairs" in source
    assert len(lines(train.source)) > 1000
    assert len(lines(valid.source)) == len(lines(valid.target)) == 50
