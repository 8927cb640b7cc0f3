"""benchmarks/modularity.py: the cluster metrics by hand, and the runner end to end on tiny runs."""

import importlib.util
import json

import numpy as np
import pytest

from keras_moe.pipelines.config import load_config
from keras_moe.pipelines.experts import commands
from keras_moe.pipelines.inspection.domains import read_documents
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig
from tests.conftest import REPO_ROOT
from tests.pipelines.lm.train_test import TINY


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("modularity")
analysis = bench.report  # benchmarks/modularity_report.py, as the runner loads it

# 4 experts x 2 domains. Column sums 8 and 4, so the shares are
# S = [[.75, 0], [.25, .25], [0, .75], [0, 0]].
COUNTS = [[6, 0], [2, 1], [0, 3], [0, 0]]


def test_concentration_purity_and_overlap_by_hand():
    # 25% of 4 experts = 1: each domain's best expert holds 0.75 of it.
    assert analysis.concentration(COUNTS, 0.25) == pytest.approx([0.75, 0.75])
    assert analysis.concentration(COUNTS, 0.5) == pytest.approx([1.0, 1.0])
    # Used experts 0, 1, 2: 0.75 / 0.75, 0.25 / 0.5, 0.75 / 0.75; expert 3 has no pair.
    assert analysis.purity(COUNTS) == pytest.approx((1 + 0.5 + 1) / 3)
    # Top sets {0} and {2}: disjoint; at 50%, {0, 1} and {2, 1}: 1 of 3.
    assert analysis.overlap(COUNTS, 0.25) == 0.0
    assert analysis.overlap(COUNTS, 0.5) == pytest.approx(1 / 3)
    metrics = analysis.cluster_metrics(COUNTS, ["a", "b"])
    assert metrics["concentration"] == pytest.approx({"a": 0.75, "b": 0.75})
    assert metrics["experts_counted"] == 1 and metrics["uniform_concentration"] == 0.25
    assert metrics["uniform_purity"] == 0.5


def test_docstring_examples():
    import doctest

    results = doctest.testmod(analysis)
    assert results.failed == 0 and results.attempted >= 2


def test_uniform_usage_gives_the_uniform_values():
    counts = np.full((8, 3), 5)
    assert analysis.concentration(counts, 0.25) == pytest.approx([0.25] * 3)
    assert analysis.purity(counts) == pytest.approx(1 / 3)
    assert analysis.overlap(counts, 0.25) == 1.0  # every domain's top 2 are the same (ties)


def _model(full, changes, concentration, purity):
    domains = {d: {"full": {"perplexity": full}, "keep": {"0.25": {
        "perplexity": full * (1 + c), "change": c}}} for d, c in changes.items()}
    return {"domains": domains, "inference_k": {"perplexity": full},
            "heatmap": {"layers": {"moe": {"mean_concentration": concentration,
                                           "purity": purity}}}}


def test_targets_met_and_missed():
    std = _model(100.0, {"a": 0.12, "b": 0.10}, 0.4, 0.3)
    pool = _model(101.5, {"a": 0.01, "b": 0.03}, 0.8, 0.6)
    rows = analysis.targets({"models": {"standard": std, "pooled": pool}})
    assert [r["met"] for r in rows] == [True, True, True, True]
    std = _model(100.0, {"a": 0.12, "b": 0.09}, 0.4, 0.3)  # b loses under 10%
    pool = _model(102.5, {"a": 0.01, "b": 0.031}, 0.8, 0.45)  # 2.5% worse; b over 3%; purity
    rows = analysis.targets({"models": {"standard": std, "pooled": pool}})
    assert [r["met"] for r in rows] == [False, False, False, False]
    assert "+2.5%" in rows[0]["detail"] and "b +3.1%" in rows[1]["detail"]


DOMAIN_WORDS = {
    "farm": "the cat sat on a mat while dogs ran to the big red barn and slept".split(),
    "sea": "ships sail over grey waves as gulls cry near old stone harbour walls".split(),
}


def _write_documents(path, words, documents, seed, blank=True):
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(documents):
            for _ in range(int(rng.integers(1, 4))):
                f.write(" ".join(rng.choice(words, int(rng.integers(3, 10)))) + "\n")
            if blank:
                f.write("\n")
    return str(path)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    base = tmp_path_factory.mktemp("modularity")
    data = base / "domains"
    (data / "valid").mkdir(parents=True)
    every = [w for words in DOMAIN_WORDS.values() for w in words]
    train = _write_documents(base / "train.txt", every, 150, 0, blank=False)
    _write_documents(data / "valid.txt", every, 40, 1)
    for i, (name, words) in enumerate(DOMAIN_WORDS.items()):
        _write_documents(data / "valid" / f"{name}.select.txt", words, 8, 10 + i)
        _write_documents(data / "valid" / f"{name}.eval.txt", words, 12, 20 + i)
    runs = {}
    for seed, name in ((1, "standard"), (2, "pooled")):  # two standard runs: no pool keys here
        config = load_config(LMConfig, None, [
            f"data.train={train}", f"data.valid={data / 'valid.txt'}", *TINY,
            "model.num_experts=8", "data.vocab_size=60", f"train.seed={seed}"])
        lm_train.train(config, base / name)
        runs[name] = str(base / name)
    out = base / "result.json"
    result = bench.main([
        "--standard", runs["standard"], "--pooled", runs["pooled"], "--domains", str(data),
        "--domain-names", *DOMAIN_WORDS, "--keep", "0.5", "0.25", "--k", "1", "2",
        "--max-documents", "5", "--prune-threshold", "0.05", "--merge-similarity", "0.99",
        "--mixed-max-words", "150", "--work", str(base / "work"), "--json", str(out),
        "--images", str(base / "images"), "--rss-domain", "",
    ])
    return base, data, runs, result, json.loads(out.read_text())


@pytest.mark.slow  # ~80 s: two tiny trainings, 8 subsets, prune, merge, and the checks
def test_runner_end_to_end_figures_agree_with_the_pipelines(experiment, tmp_path):
    base, data, runs, result, written = experiment
    assert written["summary"] == result["summary"]
    assert set(written["models"]) == {"standard", "pooled"}
    assert written["domains"] == list(DOMAIN_WORDS)
    for name, model in written["models"].items():
        assert model["experts"] == 8 and model["k"] == 2
        for domain, entry in model["domains"].items():
            eval_file = data / "valid" / f"{domain}.eval.txt"
            stripped = tmp_path / f"{name}-{domain}.txt"  # the non-blank lines, as select reads
            stripped.write_text("".join(
                line + "\n" for doc in read_documents(str(eval_file), 10**9) for line in doc))
            full = lm_train.evaluate(runs[name], str(stripped))["perplexity"]
            assert entry["full"]["perplexity"] == pytest.approx(full, rel=1e-6)
            assert entry["documents"] == 5
            for keep, experts in (("0.5", 4), ("0.25", 2)):
                kept = entry["keep"][keep]
                subset = lm_train.evaluate(kept["out"], str(stripped))["perplexity"]
                assert kept["perplexity"] == pytest.approx(subset, rel=1e-6)
                assert kept["change"] == pytest.approx((subset - full) / full)
                assert kept["experts"] == {"moe": experts}
                assert kept["file_bytes"] < model["sizes"]["file_bytes_weights_only"]
                assert kept["weight_bytes"] < model["sizes"]["weight_bytes"]
        # The heat map's columns are the domains' usage shares.
        layer = model["heatmap"]["layers"]["moe"]
        shares = np.asarray(layer["shares"])
        for column, domain in enumerate(DOMAIN_WORDS):
            np.testing.assert_allclose(shares[:, column], model["domains"][domain]["usage"]["moe"])
        expected = analysis.cluster_metrics(shares, list(DOMAIN_WORDS))
        assert layer["concentration"] == pytest.approx(expected.pop("concentration"))
        assert {key: layer[key] for key in expected} == pytest.approx(expected)
        png = (base / "images" / f"modularity-heatmap-{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        ks = model["inference_k"]
        assert ks["trained_k"] == 2 and [r["k"] for r in ks["rows"]] == [1, 2]
        assert ks["rows"][1]["perplexity"] == ks["perplexity"] and ks["rows"][1]["change"] == 0
        assert all(r["tokens_per_second"] > 0 for r in ks["rows"])
    # The mixed text: an evenly spaced sample of valid.txt's 40 documents, about 150 words.
    mixed = written["mixed"]
    assert mixed["documents"] < mixed["of_documents"] == 40
    assert mixed["words"] == sum(len(line.split()) for line in open(mixed["path"]))
    all_select = written["all_select"]
    assert len(read_documents(all_select["path"], 10**9)) == all_select["documents"] == 10
    # Prune and merge on the standard model only; "before" is the mixed-text
    # perplexity that `lm evaluate` gives on its lines (these runs do not
    # use document rows, so the blank lines are left out).
    surgery = written["models"]["standard"]["surgery"]
    assert "surgery" not in written["models"]["pooled"]
    assert [(r["command"], r["value"]) for r in surgery["rows"]] == [("prune", 0.05),
                                                                      ("merge", 0.99)]
    standard = written["models"]["standard"]
    stripped = tmp_path / "mixed.txt"
    stripped.write_text("".join(line for line in open(mixed["path"]) if line.strip()))
    assert surgery["before"] == pytest.approx(
        lm_train.evaluate(runs["standard"], str(stripped))["perplexity"], rel=1e-6)
    # The same figures as the `experts` commands on the same files.
    entry = standard["domains"]["farm"]
    report = commands.select(runs["standard"], str(data / "valid" / "farm.select.txt"),
                             keep=0.25, out=str(tmp_path / "select"), max_documents=5,
                             eval_data=str(data / "valid" / "farm.eval.txt"), quiet=True)
    assert report["kept"] == entry["keep"]["0.25"]["kept"]
    assert report["usage"] == entry["usage"]
    assert report["before"]["perplexity"] == pytest.approx(entry["full"]["perplexity"], rel=1e-9)
    assert report["after"]["perplexity"] == pytest.approx(entry["keep"]["0.25"]["perplexity"],
                                                          rel=1e-9)
    prune_row, merge_row = surgery["rows"]
    report = commands.prune(runs["standard"], all_select["path"], 0.05, out=str(tmp_path / "p"),
                            max_documents=10, eval_data=mixed["path"], quiet=True)
    assert report["kept"] == prune_row["kept"]
    assert report["after"]["perplexity"] == pytest.approx(prune_row["after"], rel=1e-9)
    assert report["after"]["experts"] == prune_row["experts_after"]
    report = commands.merge(runs["standard"], all_select["path"], 0.99, out=str(tmp_path / "m"),
                            max_documents=10, eval_data=mixed["path"], quiet=True)
    assert report["clusters"] == merge_row["clusters"]
    assert report["after"]["perplexity"] == pytest.approx(merge_row["after"], rel=1e-9)
    assert len(written["targets"]) == 4
    for heading in ("Per-domain perplexity", "Inference-time k'", "Pruning and merging",
                    "File sizes", "Domain clusters", "Targets"):
        assert heading in written["summary"]


def test_document_rows_runs_see_a_blank_line_after_each_document(tmp_path):
    import types

    path = _write_documents(tmp_path / "d.txt", DOMAIN_WORDS["sea"], 3, 0)
    documents = read_documents(path, 2)
    run = types.SimpleNamespace(config=types.SimpleNamespace(
        data=types.SimpleNamespace(document_rows=True)))
    sample = bench.read_sample(run, path, 2)
    assert sample.documents == 2
    assert sample.lines == [*documents[0], "", *documents[1], ""]
    bench.write_documents(tmp_path / "copy.txt", documents)
    assert read_documents(str(tmp_path / "copy.txt")) == documents
