"""`keras-moe experts select|prune|merge|heatmap` and `inspect --domain` on a tiny LM run."""

import json
import shutil

import keras
import numpy as np
import pytest

from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines.cli import main
from keras_moe.pipelines.config import load_config
from keras_moe.pipelines.experts import commands
from keras_moe.pipelines.inspection.domains import expert_order, read_documents
from keras_moe.pipelines.inspection.report import inspect_run
from keras_moe.pipelines.lm import inputs as lm_input
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig
from tests.pipelines.lm.train_test import TINY, write_corpus

E, DIM = 8, 16


@pytest.fixture(scope="module", autouse=True)
def in_process():
    """`cli.main` runs here instead of re-executing itself with its environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_MOE_NO_REEXEC", "1")
        yield


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("experts_lm")
    train, valid = write_corpus(base / "train.txt", 200, 0), write_corpus(base / "valid.txt", 30, 1)
    config = load_config(LMConfig, None, [f"data.train={train}", f"data.valid={valid}", *TINY,
                                          f"model.num_experts={E}"])
    lm_train.train(config, base / "run")
    return base, str(base / "run"), valid


def usage_by_hand(run_dir, data, max_documents=100):
    """Each expert's share of routed pairs: the model called on the batches, counts summed."""
    config, vocab, model, _ = lm_train.load_run(run_dir)
    lines = [line for doc in read_documents(data, max_documents) for line in doc]
    counts = 0
    for inputs, _, _ in lm_input.evaluation_batches(iter(lines), vocab, config.data):
        _, routing = model(inputs, training=False, return_routing=True)
        counts = counts + np.asarray(routing["moe"].counts, np.float64)
    return counts / counts.sum()


def test_select_writes_a_smaller_run_that_lm_evaluate_reads(lm_run, capsys):
    base, run_dir, valid = lm_run
    out = base / "select"
    assert main(["experts", "select", "--run-dir", run_dir, "--data", valid, "--keep", "0.25",
                 "--out", str(out), "--max-documents", "20"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "model.keras" in printed
    report = json.loads((out / "experts.json").read_text())
    share = usage_by_hand(run_dir, valid, 20)
    np.testing.assert_allclose(report["usage"]["moe"], share, atol=1e-9)
    expected = sorted(np.argsort(-share, kind="stable")[:2].tolist())
    assert report["kept"] == {"moe": expected}
    assert report["before"]["experts"] == {"moe": E} and report["after"]["experts"] == {"moe": 2}
    assert report["after"]["file_bytes"] < report["before"]["file_bytes_weights_only"]
    assert report["after"]["weight_bytes"] < report["before"]["weight_bytes"]
    # The new directory is a run: the pipeline's own evaluation reads it.
    config, _, small, _ = lm_train.load_run(str(out))
    assert config.model.num_experts == 2
    _, _, full, _ = lm_train.load_run(run_dir)
    np.testing.assert_array_equal(find_moe_layers(small)[0].experts.w_in,
                                  find_moe_layers(full)[0].experts.w_in.numpy()[expected])
    docs = base / "docs20.txt"
    docs.write_text("".join(line + "\n" for line in open(valid).read().split("\n")[:20]))
    evaluated = lm_train.evaluate(str(out), str(docs))
    assert evaluated["perplexity"] == pytest.approx(report["after"]["perplexity"], rel=1e-9)


def test_prune_removes_the_experts_under_the_threshold(lm_run):
    base, run_dir, valid = lm_run
    share = usage_by_hand(run_dir, valid)
    threshold = float(np.sort(share)[3]) + 1e-9  # the 4 least used go, and only they
    report = commands.prune(run_dir, valid, threshold, out=str(base / "prune"), quiet=True)
    assert report["kept"] == {"moe": [int(e) for e in np.flatnonzero(share >= threshold)]}
    assert report["after"]["experts"] == {"moe": 4}
    assert "perplexity" in report["after"]


def test_merge_joins_duplicated_experts(lm_run, tmp_path):
    _, run_dir, valid = lm_run
    copy = tmp_path / "dup"
    shutil.copytree(run_dir, copy)
    model = keras.saving.load_model(copy / "model.keras", compile=False)
    moe = find_moe_layers(model)[0]
    for variable in moe.weights:  # expert 5 := expert 2, weights and gate columns alike
        value = variable.numpy()
        if "experts" in variable.path:
            value[5] = value[2]
        else:
            value[:, 5] = value[:, 2]
        variable.assign(value)
    model.save(copy / "model.keras")
    report = commands.merge(str(copy), valid, similarity=0.9999, mode="average",
                            out=str(tmp_path / "merged"), quiet=True)
    assert [2, 5] in report["clusters"]["moe"]
    assert report["merged"] == {"moe": [[2, 5]]}
    assert report["after"]["experts"] == {"moe": E - 1}


def test_cli_errors_exit_2_with_one_line_naming_the_argument(lm_run, tmp_path, capsys):
    base, run_dir, valid = lm_run
    cases = [
        (["select", "--keep", "2"], "--keep"),
        (["select", "--data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["select", "--keep", "0.1"], "k=2"),  # 1 expert left but k = 2: refused at once
        (["prune", "--threshold", "0.99"], "threshold"),
        (["merge", "--similarity", "3"], "--similarity"),
    ]
    for extra, named in cases:
        args = {"--run-dir": run_dir, "--data": valid, "--out": str(tmp_path / "o")}
        command, rest = extra[0], extra[1:]
        for flag, value in zip(rest[::2], rest[1::2], strict=True):
            args[flag] = value
        if command == "prune":
            args.setdefault("--threshold", "0.01")
        flat = [a for pair in args.items() for a in pair]
        assert main(["experts", command, *flat]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, (extra, err)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["experts", "select", "--run-dir", run_dir, "--data", valid, "--out",
                 str(tmp_path / "full")]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def forced_run(lm_run):
    """The run with routing forced by token id: the MoE sees the embedding of its token.

    The first LSTM's weights are zero, so it outputs 0 and the residual
    passes the embedding on; token `t`'s embedding is the unit vector
    `e_{t mod 16}`, and the gate sends `e_j` to experts `j mod 8` and
    `(j + 1) mod 8`.
    """
    base, run_dir, _ = lm_run
    forced = base / "forced"
    shutil.copytree(run_dir, forced)
    model = keras.saving.load_model(forced / "model.keras", compile=False)
    lstm = model.block_layers[0]
    lstm.set_weights([np.zeros(w.shape, "float32") for w in lstm.get_weights()])
    vocab_size = model.vocab_size
    model.embedding.embeddings.assign(np.eye(DIM, dtype="float32")[np.arange(vocab_size) % DIM])
    gate = np.zeros((DIM, E), "float32")
    for j in range(DIM):
        gate[j, j % E], gate[j, (j + 1) % E] = 5.0, 4.0
    find_moe_layers(model)[0].gating.w_gate.assign(gate)
    model.save(forced / "model.keras")
    return str(forced)


def forced_counts(run_dir, path):
    vocab = lm_train.load_run(run_dir)[1]
    counts = np.zeros(E)
    for doc in read_documents(path):
        for line in doc:
            for t in vocab.encode_line(line):
                counts[[t % DIM % E, (t % DIM + 1) % E]] += 1
    return counts


def test_heatmap_counts_match_the_forced_routing_and_files_are_valid(lm_run, forced_run,
                                                                     tmp_path):
    base, _, valid = lm_run
    news = tmp_path / "news.txt"  # two documents separated by a blank line
    news.write_text("the cat sat on a mat\nthe big red barn\n\ndogs ran to the barn\n")
    out = tmp_path / "heat"
    assert main(["experts", "heatmap", "--run-dir", forced_run, "--domain", f"valid={valid}",
                 "--domain", f"news={news}", "--out", str(out)]) == 0
    result = json.loads((out / "heatmap.json").read_text())
    assert result["domains"] == ["valid", "news"] and result["documents"] == [30, 2]
    counts = np.asarray(result["layers"]["moe"]["counts"])
    for column, path in enumerate((valid, news)):
        expected = forced_counts(forced_run, path)
        np.testing.assert_array_equal(counts[:, column], expected)
        np.testing.assert_allclose(np.asarray(result["layers"]["moe"]["shares"])[:, column],
                                   expected / expected.sum())
    assert result["layers"]["moe"]["order"] == expert_order(result["layers"]["moe"]["shares"])
    png = (out / "heatmap_moe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "heatmap.html").read_text()
    assert "<table" in page and "expert 0" in page and "news" in page
    assert "data:image/png;base64," in page
    # `inspect --domain` lists each expert's top domains from the same counts.
    report = inspect_run(forced_run, valid, out=str(tmp_path / "i.html"), quiet=True, max_lines=4,
                         domains=[f"valid={valid}", f"news={news}"])
    tops = report["domains"]["top_domains"]["moe"]
    shares = np.asarray(result["layers"]["moe"]["shares"])
    for e, ranked in enumerate(tops):
        best = int(np.argmax(shares[e])) if shares[e].max() > 0 else None
        assert (ranked[0]["domain"] if ranked else None) == (
            None if best is None else result["domains"][best])
    assert "top domains" in report["tables"]


def test_heatmap_needs_a_domain_in_name_equals_file_form(lm_run, tmp_path, capsys):
    _, run_dir, valid = lm_run
    assert main(["experts", "heatmap", "--run-dir", run_dir, "--domain", valid,
                 "--out", str(tmp_path / "h")]) == 2
    assert "NAME=FILE" in capsys.readouterr().err


def test_docstring_examples():
    import doctest

    from keras_moe.pipelines.inspection import domains

    runner = doctest.DocTestRunner()
    for module in (domains, commands):
        for test in doctest.DocTestFinder().find(module, module.__name__,
                                                 globs=dict(vars(module))):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 2


def test_a_document_rows_run_reads_its_sample_with_the_document_boundaries(tmp_path):
    import types

    from keras_moe.pipelines.experts import runs

    path = tmp_path / "docs.txt"
    path.write_text("a b\nc\n\nd e f\n\ng\n", encoding="utf-8")

    def run(document_rows):
        data = types.SimpleNamespace(document_rows=document_rows)
        return types.SimpleNamespace(kind="lm", config=types.SimpleNamespace(data=data))

    # Three documents; with `data.document_rows` a blank line between them (and
    # none after the last), so that no evaluation row spans two documents.
    sample = runs.read_sample(run(True), str(path), max_documents=3)
    assert (sample.documents, sample.lines) == (3, ["a b", "c", "", "d e f", "", "g"])
    assert runs.read_sample(run(True), str(path), max_documents=2).lines == [
        "a b", "c", "", "d e f"]
    assert runs.read_sample(run(False), str(path)).lines == ["a b", "c", "d e f", "g"]
