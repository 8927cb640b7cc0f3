"""End-to-end tests of `keras-moe translate` (train, evaluate, run, score) on files written here.

The corpus is a word-for-word English -> German substitution of random
sentences over a small lexicon: a mapping a small model learns within a
few hundred steps, so that learning can be checked by BLEU, and whose
every sentence pair is known exactly.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import yaml

from keras_moe.pipelines.config import ConfigError, load_config
from keras_moe.pipelines.translate import inputs as translate_input
from keras_moe.pipelines.translate import train as translate_train
from keras_moe.pipelines.translate.config import TranslateConfig

LEXICON = {
    "the": "die", "cat": "Katze", "sees": "sieht", "a": "eine", "mouse": "Maus",
    "big": "große", "small": "kleine", "red": "rote", "eats": "frisst", "bird": "Vogel",
    "green": "grüne", "house": "Haus", "and": "und", "dog": "Hund", "likes": "mag",
}
ENGLISH = sorted(LEXICON)


def write_pairs(directory, name, count, seed, min_words=2, max_words=7):
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for _ in range(count):
        words = list(rng.choice(ENGLISH, int(rng.integers(min_words, max_words + 1))))
        src.append(" ".join(words) + ".")
        tgt.append(" ".join(LEXICON[w] for w in words) + ".")
    paths = {}
    for lang, lines in (("en", src), ("de", tgt)):
        paths[lang] = str(directory / f"{name}.{lang}")
        with open(paths[lang], "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    return paths


def write_corpus(base):
    """Train, valid and test pairs in `base` (sizes and seeds fixed)."""
    return {
        "train": write_pairs(base, "train", 400, 0),
        "valid": write_pairs(base, "valid", 24, 1),
        "test": write_pairs(base, "test", 16, 2),
        "dir": base,
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


TINY = [
    "model.preset=cpu-gnmt-moe-16", "model.model_dim=16", "model.num_experts=4",
    "model.expert_hidden_dim=8", "model.k=2", "model.dropout=0.0", "data.vocab_size=120",
    "data.batch_tokens=256", "data.max_pieces=32", "train.steps=2", "train.steps_per_eval=1",
    "train.warmup_steps=1", "train.hold_steps=0", "train.monitor_every_n_steps=1",
    "train.keep_checkpoints=1", "train.verbose=0", "decode.beam_width=2",
]


def corpus_sets(corpus, splits=("train", "valid", "test")):
    return [f"data.{split}=[{{source: {corpus[split]['en']}, target: {corpus[split]['de']}}}]"
            for split in splits]


def tiny_config(corpus, *extra):
    return load_config(TranslateConfig, None, [*corpus_sets(corpus), *TINY, *extra])


def run_cli(*args, stdin=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "keras_moe.pipelines.cli", *args], capture_output=True,
        text=True, env=env, timeout=400, input=stdin,
    )


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


@pytest.fixture(scope="module")
def cli_run(corpus, tmp_path_factory):
    """A 2-step `keras-moe translate train` run through the command line."""
    base = tmp_path_factory.mktemp("cli")
    config_file = base / "run.yaml"
    config_file.write_text(yaml.safe_dump({"decode": {"alpha": 0.6}}))
    run_dir = base / "run"
    sets = [a for item in [*corpus_sets(corpus), *TINY] for a in ("--set", item)]
    done = run_cli("translate", "train", "--config", str(config_file), *sets,
                   "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, json.loads(done.stdout)


def test_cli_two_step_run_writes_the_run_directory(cli_run, corpus):
    run_dir, printed = cli_run
    for name in ("config.yaml", "wordpiece.txt", "cleaning.json", "model.keras", "results.json",
                 "history.csv", "checkpoints/last.keras", "checkpoints/best.keras",
                 "translations/valid.hyp", "translations/test.hyp"):
        assert (run_dir / name).exists(), name
    # keep_checkpoints=1: of the two evaluation checkpoints only the last is kept.
    assert sorted(os.listdir(run_dir / "checkpoints")) == [
        "best.keras", "last.keras", "step-00000002.weights.h5"]
    saved = load_config(TranslateConfig, run_dir / "config.yaml")
    assert saved.train.steps == 2 and saved.model.num_experts == 4
    assert saved.data.train[0].source == corpus["train"]["en"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2
    assert results["cleaning"] == {"read": 400, "kept": 400, "empty": 0, "too_long": 0,
                                   "bad_ratio": 0}
    assert printed["test"]["bleu"] == results["test"]["bleu"]
    assert set(results["routing_valid"]) == {"encoder_moe", "decoder_moe"}


def test_reported_bleu_is_sacrebleu_on_the_hypotheses_file(cli_run, corpus):
    run_dir, _ = cli_run
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("valid", "test"):
        hyps = lines(results[split]["hypotheses_file"])
        refs = lines(corpus[split]["de"])
        assert len(hyps) == len(refs)
        expected = sacrebleu.corpus_bleu(hyps, [refs])
        assert results[split]["bleu"] == pytest.approx(expected.score, abs=1e-9)
        assert results[split]["chrf"] == pytest.approx(
            sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
        assert results[split]["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
        assert results[split]["sentences"] == len(refs)


def test_tensorboard_has_bleu_loss_perplexity_learning_rate_and_routing(cli_run):
    from tensorboard.backend.event_processing import event_accumulator

    run_dir, _ = cli_run
    tags = set()
    for root, _, files in os.walk(run_dir / "tensorboard"):
        if any(f.startswith("events.out") for f in files):
            acc = event_accumulator.EventAccumulator(root, size_guidance={"tensors": 0})
            acc.Reload()
            tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    for tag in ("epoch_loss", "epoch_perplexity", "epoch_learning_rate", "epoch_bleu",
                "epoch_chrf"):
        assert tag in tags, sorted(tags)
    # RoutingMonitor's per-expert views of both MoE layers.
    for layer in ("encoder_moe", "decoder_moe"):
        assert any(t.startswith(layer + "/") and t.endswith("_per_expert") for t in tags), tags


def test_cli_evaluate_scores_files_and_writes_hypotheses(cli_run, corpus, tmp_path):
    run_dir, _ = cli_run
    out = tmp_path / "hyp.txt"
    done = run_cli("translate", "evaluate", "--run-dir", str(run_dir),
                   "--src", corpus["test"]["en"], "--ref", corpus["test"]["de"],
                   "--ref", corpus["test"]["de"], "--beam-width", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    hyps = lines(out)
    refs = lines(corpus["test"]["de"])
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs, refs]).score)
    assert result["bleu_signature"].startswith("nrefs:2|")
    assert result["beam_width"] == 1 and result["hypotheses_file"] == str(out)
    assert json.loads((tmp_path / "hyp.json").read_text())["bleu"] == result["bleu"]
    assert result["perplexity"] > 1 and result["tokens"] > len(refs)
    # The same file scored by `translate score` gives the same numbers.
    scored = run_cli("translate", "score", "--hyp", str(out), "--ref", corpus["test"]["de"],
                     "--ref", corpus["test"]["de"])
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["bleu"] == pytest.approx(result["bleu"])


# Slow: a `translate run` process reading stdin (34-77 s of `make test`);
# the other CLI tests here keep `translate train/evaluate` in `make test`.
@pytest.mark.slow
def test_cli_run_translates_stdin_line_by_line(cli_run, corpus):
    run_dir, _ = cli_run
    source = lines(corpus["test"]["en"])[:5]
    done = run_cli("translate", "run", "--run-dir", str(run_dir), "--beam-width", "1",
                   stdin="".join(s + "\n" for s in source))
    assert done.returncode == 0, done.stderr[-3000:]
    config, vocab, model, _ = translate_train.load_run(str(run_dir))
    expected = translate_train.translate_lines(model, vocab, source, config.decode,
                                               beam_width=1)
    assert done.stdout.split("\n")[:-1] == expected


def test_cli_errors_exit_2_naming_the_culprit(tmp_path, corpus):
    bad = tmp_path / "short.de"
    bad.write_text("eins\nzwei\n")
    sets = [a for item in [*corpus_sets(corpus, ("valid",)), *TINY] for a in ("--set", item)]
    done = run_cli("translate", "train", *sets, "--set",
                   f"data.train=[{{source: {corpus['train']['en']}, target: {bad}}}]",
                   "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "400 lines" in done.stderr and "2 lines" in done.stderr and str(bad) in done.stderr
    assert not (tmp_path / "run").exists()
    done = run_cli("translate", "train", "--set", "decode.beam=3", "--run-dir",
                   str(tmp_path / "r2"))
    assert done.returncode == 2 and "decode.beam" in done.stderr


def test_unknown_or_incomplete_corpus_parts_are_refused():
    with pytest.raises(ConfigError, match="data.train\\[0\\].sorce"):
        load_config(TranslateConfig, None, ["data.train=[{sorce: a.en, target: a.de}]"])
    with pytest.raises(ConfigError, match="`target` is missing"):
        load_config(TranslateConfig, None, ["data.train=[{source: a.en}]"])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(TranslateConfig, None, ["data.train=[{tsv: a.tsv, tfds: wmt14}]"])


@pytest.mark.slow  # 66 s; resuming is also tested in make test by lm_train_test
def test_rerun_resumes_and_different_config_is_refused(tmp_path, corpus):
    run_dir = tmp_path / "run"
    first = translate_train.train(tiny_config(corpus, "train.time_limit_minutes=0.0001"),
                                  str(run_dir))
    assert first["steps"] == 1  # the wall-clock limit stopped it after one step
    os.remove(run_dir / "model.keras")  # as if the process had been killed before the end
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "wordpiece.txt")}
    with pytest.raises(ValueError, match="different configuration"):
        translate_train.train(tiny_config(corpus, "model.dropout=0.5"), str(run_dir))
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    resumed = translate_train.train(tiny_config(corpus), str(run_dir))
    assert resumed["resumed"] is True and resumed["steps"] == 2
    # The finished run goes on when asked for more steps (lm_train_test
    # checks the refusals); the optimizer's step count carries over.
    finished = (run_dir / "model.keras").read_bytes()
    more = translate_train.train(tiny_config(corpus, "train.steps=3"), str(run_dir))
    assert more["resumed"] is True and more["steps"] == 3
    assert (run_dir / "model-step-2.keras").read_bytes() == finished
    assert (run_dir / "results-step-2.json").exists()


def test_training_batches_are_shifted_bucketed_and_cover_every_pair_once(corpus):
    config = tiny_config(corpus, "data.batch_tokens=64")
    vocab = translate_train.build_vocabulary(config, "/nonexistent")
    factory = translate_input.pairs_factory(config.data, "train")
    dataset = translate_input.training_dataset(factory, vocab, config.data, repeat=False)
    seen = []
    for inputs, target_out, weights in dataset.as_numpy_iterator():
        source, target_in = inputs["source"], inputs["target_in"]
        rows, width = target_out.shape
        longest = max(source.shape[1], width)
        bound = next(b - 1 for b in translate_input.bucket_boundaries(32) if longest < b)
        # A batch of bucket bound L holds at most batch_tokens // L pairs.
        assert rows <= 64 // bound
        # Teacher forcing: <eos> (id 2) first, then the target shifted right.
        np.testing.assert_array_equal(target_in[:, 0], 2)
        np.testing.assert_array_equal(target_in[:, 1:][weights[:, 1:] > 0],
                                      target_out[:, :-1][weights[:, 1:] > 0])
        np.testing.assert_array_equal(weights, target_out != 0)
        for s, t in zip(source, target_out, strict=True):
            seen.append((tuple(s[s != 0]), tuple(t[t != 0])))
    expected = [(tuple(s), tuple(t))
                for s, t in translate_input.encoded_pairs(factory(), vocab)]
    assert sorted(seen) == sorted(expected)


def test_translations_come_back_in_input_order(cli_run, corpus):
    run_dir, _ = cli_run
    config, vocab, model, _ = translate_train.load_run(str(run_dir))
    source = lines(corpus["valid"]["en"])[:9]
    together = translate_train.translate_lines(model, vocab, source, config.decode,
                                               batch_size=4)
    one_by_one = [translate_train.translate_lines(model, vocab, [s], config.decode)[0]
                  for s in source]
    assert together == one_by_one


def test_checkpoint_average_is_the_mean_of_the_weights(cli_run, tmp_path):
    run_dir, _ = cli_run
    _, _, model, _ = translate_train.load_run(str(run_dir), average=0)
    first = [np.array(v.numpy()) for v in model.weights]
    a = str(tmp_path / "a.weights.h5")
    model.save_weights(a)
    rng = np.random.default_rng(0)
    shifted = []
    for v in model.weights:
        if np.issubdtype(np.dtype(v.dtype), np.floating):
            v.assign(v.numpy() + rng.normal(size=v.shape).astype(v.dtype))
        shifted.append(np.array(v.numpy()))
    b = str(tmp_path / "b.weights.h5")
    model.save_weights(b)
    translate_train.average_checkpoints(model, [a, b])
    for v, x, y in zip(model.weights, first, shifted, strict=True):
        if np.issubdtype(np.dtype(v.dtype), np.floating):
            np.testing.assert_allclose(v.numpy(), (x + y) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no checkpoint"):
        translate_train.average_checkpoints(model, [])


def test_inspect_reports_every_moe_layer_of_a_translation_run(cli_run, corpus, tmp_path):
    from keras_moe.pipelines.inspection.report import inspect_run

    run_dir, _ = cli_run
    source = lines(corpus["valid"]["en"])
    report = inspect_run(str(run_dir), corpus["valid"]["en"], out=str(tmp_path / "r.html"),
                         quiet=True)
    assert set(report["layers"]) == {"encoder_moe", "decoder_moe"}
    assert (tmp_path / "r.html").exists()
    assert "== decoder_moe:" in report["tables"] and "== encoder_moe:" in report["tables"]
    # Independently: the full model's own routing of the same sources (the
    # encoder does not see the target), counted per expert.
    _, vocab, model, _ = translate_train.load_run(str(run_dir), average=0)
    counts = 0
    pairs = list(zip(source, source, strict=True))
    for inputs, _, _ in translate_input.evaluation_batches(pairs, vocab, 64):
        _, extras = model(inputs, training=False, return_routing=True)
        counts = counts + np.asarray(extras["routing"]["encoder_moe"].counts)
    reported = [e["count"] for e in report["layers"]["encoder_moe"]["experts"]]
    np.testing.assert_array_equal(reported, counts)
    tokens = sum(len(ids) for ids in vocab.encode_lines(source))
    assert sum(reported) == 2 * tokens  # k = 2 experts per source token, <eos> included
    # The decoder's: the model teacher-forced on its own greedy translations
    # (decoder input `<eos> y1 ... yn`), all sentences in one padded batch.
    config = translate_train.load_run(str(run_dir), average=0)[0]
    sources = vocab.encode_lines(source)
    hypotheses = translate_train.translate_ids(model, sources, config.decode, 64, beam_width=1)
    decoder_in = [[2, *h] for h in hypotheses]
    src, tgt = (np.zeros((len(rows), max(map(len, rows))), np.int32)
                for rows in (sources, decoder_in))
    for i, (a, b) in enumerate(zip(sources, decoder_in, strict=True)):
        src[i, : len(a)], tgt[i, : len(b)] = a, b
    _, extras = model((src, tgt), training=False, return_routing=True)
    reported = [e["count"] for e in report["layers"]["decoder_moe"]["experts"]]
    np.testing.assert_array_equal(reported, np.asarray(extras["routing"]["decoder_moe"].counts))
    assert sum(reported) == 2 * sum(len(row) for row in decoder_in)
    with pytest.raises(ValueError, match="decoder_moe.*layer='nope'"):
        inspect_run(str(run_dir), corpus["valid"]["en"], layer="nope", quiet=True)
    only = inspect_run(str(run_dir), corpus["valid"]["en"], layer="decoder_moe", quiet=True,
                       out=str(tmp_path / "d.html"))
    assert set(only["layers"]) == {"decoder_moe"}


# Slow (about 15 s): export_test.py checks served translations in `make test`.
@pytest.mark.slow
def test_cli_export_translates_like_the_run(cli_run, corpus, tmp_path):
    from keras_moe.pipelines.translate.export import load_translator

    run_dir, _ = cli_run
    out = tmp_path / "export"
    done = run_cli("translate", "export", "--run-dir", str(run_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"export_dir": str(out)}
    source = lines(corpus["test"]["en"])[:4]
    config, vocab, model, _ = translate_train.load_run(str(run_dir))
    expected = translate_train.translate_lines(model, vocab, source, config.decode)
    assert load_translator(str(out))(source) == expected
    again = run_cli("translate", "export", "--run-dir", str(run_dir), "--out", str(out))
    assert again.returncode == 2 and str(out) in again.stderr


def test_evaluate_cuts_a_100k_character_source_line_and_reports_it(cli_run, corpus, tmp_path,
                                                                    capsys):
    """Issue 28, point 7: one overlong test line is cut to data.max_eval_pieces, counted."""
    run_dir, _ = cli_run
    src, ref = tmp_path / "long.en", tmp_path / "long.de"
    words = [ENGLISH[i % len(ENGLISH)] for i in range(22_000)]
    long_source = " ".join(words)
    assert len(long_source) > 100_000
    src.write_text(f"the cat .\n{long_source}\n", encoding="utf-8")
    ref.write_text("die Katze .\n" + " ".join(LEXICON[w] for w in words) + "\n",
                   encoding="utf-8")
    result = translate_train.evaluate(str(run_dir), str(src), [str(ref)], beam_width=1,
                                      out=str(tmp_path / "long.hyp"))
    assert result["truncated"] == {"max_pieces": 256, "sources": 1, "references": 1}
    assert result["sentences"] == 2
    assert "1 source and 1 reference sentences longer than 256 pieces" in capsys.readouterr().err
    saved = json.loads((tmp_path / "long.json").read_text())
    assert saved["truncated"]["sources"] == 1
    # results.json names the preset and, explicitly, what the run overrode in it.
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"]["preset"] == "cpu-gnmt-moe-16"
    assert results["model"]["preset_overrides"]["model_dim"] == 16
    assert results["model"]["preset_overrides"]["num_experts"] == 4
