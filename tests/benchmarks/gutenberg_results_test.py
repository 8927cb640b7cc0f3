"""benchmarks/gutenberg_results.py on run directories written here (issue 26's tables and figures).

The runs are synthetic but laid out as `keras-moe lm train` writes them:
`config.yaml`, `history.csv` (with `step`, `tokens` and the routing
columns `routing_checks` logs), `results.json` (or, for a run continued past
a time limit, only `results-step-N.json`), `elapsed.json`, and
`wikipedia.json` as `lm evaluate --out` writes it. Every expected number
below is worked out by hand from the values written.
"""

import importlib.util
import json
import math

import pytest
import yaml

from keras_moe.pipelines import cli
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.training import routing_checks
from tests.conftest import REPO_ROOT

PER_STEP = 5000  # batch 100 x window 50


def _load():
    path = REPO_ROOT / "benchmarks" / "gutenberg_results.py"
    spec = importlib.util.spec_from_file_location("gutenberg_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root, name, preset, curve, *, results=None, results_step=None, elapsed=None,
              routing=None, seed=1, model=None, wikipedia=None):
    """A run directory; `curve` is `{step: val_perplexity}`; `routing` `{step: (ci, cl, mm)}`."""
    run = root / name
    run.mkdir(parents=True)
    config = {"data": {"batch_size": 100, "seq_len": 50},
              "model": {"preset": preset, **(model or {})},
              "train": {"steps": 12000, "steps_per_eval": 1000, "max_tokens": 60_000_000,
                        "seed": seed}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    val_routing = [f"val_moe_{s}" for s in routing_checks.LOGGED] + ["val_moe_collapsed"]
    training = [f"moe_{s}" for s in routing_checks.TRAINING]
    header = ["epoch", "step", "elapsed_minutes", "loss", "tokens", "val_loss", "val_perplexity"]
    if routing:
        header += val_routing + training
    lines = [",".join(header)]
    for epoch, (step, ppl) in enumerate(sorted(curve.items())):
        row = [epoch, step, step / 200.0, 4.0, float(step * PER_STEP), math.log(ppl), ppl]
        if routing:
            ci, cl, mm = routing.get(step, (9.0, 9.0, 9.0))
            # Training routing (noisy) differs on purpose: the table must not take it.
            row += [ci, cl, mm, 0.0, 0.2, 0.0]
            row += [0.11, 0.12, 1.13, 0.0]
        lines.append(",".join(map(str, row)))
    (run / "history.csv").write_text("\n".join(lines) + "\n")
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))
    if results_step is not None:
        step, body = results_step
        (run / f"results-step-{step}.json").write_text(json.dumps(body))
    if elapsed is not None:
        (run / "elapsed.json").write_text(json.dumps({str(k): v for k, v in elapsed.items()}))
    if wikipedia is not None:
        (run / "wikipedia.json").write_text(json.dumps(wikipedia))
    return run


def every_5m(values):
    """`{step: ppl}` for evaluations every 1,000 steps (5M tokens) from a list."""
    return {1000 * (i + 1): v for i, v in enumerate(values)}


# Dense at 5M, 10M, ..., 60M; MoE-16 chosen so that its gaps are round numbers.
DENSE = [2000.0, 1500.0, 1000.0, 900.0, 850.0, 800.0, 760.0, 720.0, 690.0, 660.0, 630.0, 600.0]
MOE16 = [2100.0, 1500.0, 950.0, 880.0, 820.0, 736.0, 700.0, 660.0, 630.0, 600.0, 570.0, 540.0]


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    done = {"steps": 12000, "valid": {"perplexity": 500.0, "words": 1999670},
            "costs": {"ops_per_timestep": 524288}}
    write_run(root, "gutenberg-dense", "gutenberg-dense", every_5m(DENSE), results=done,
              elapsed={6000: 1700.0, 12000: 3600.0},
              wikipedia={"perplexity": 1000.0, "words": 181000})
    write_run(root, "gutenberg-moe-16", "gutenberg-moe-16", every_5m(MOE16),
              results={**done, "valid": {"perplexity": 450.0}}, elapsed={12000: 4320.0},
              wikipedia={"perplexity": 1100.0, "words": 181000})
    # Stopped by its time limit at step 4,573 and continued: evaluations every
    # 1,000 steps from there (27.865M, 32.865M tokens), none at 30M.
    partial = {1000: 2500.0, 2000: 1600.0, 3000: 1100.0, 4000: 1000.0, 4573: 950.0,
               5573: 900.0, 6573: 800.0}
    write_run(root, "gutenberg-moe-256", "gutenberg-moe-256", partial,
              results_step=(4573, {"steps": 4573, "valid": {"perplexity": 870.0}}),
              elapsed={4573: 1500.0, 6573: 2200.0}, routing={6573: (0.05, 0.07, 1.21)})
    write_run(root, "gutenberg-moe-256-no-balance", "gutenberg-moe-256", every_5m(DENSE[:3]),
              model={"importance_weight": 0.0, "load_weight": 0.0},
              routing={2000: (3.3, 2.2, 1.5), 3000: (4.5, 3.25, 17.5)})
    write_run(root, "gutenberg-dense-seed-2", "gutenberg-dense", every_5m(DENSE), seed=2,
              results={**done, "valid": {"perplexity": 510.0}})
    bench = tmp_path / "throughput.json"
    bench.write_text(json.dumps({"rows": [
        {"preset": "gutenberg-dense", "tokens_per_second": 27000.0, "step_ratio_to_dense": 1.0},
        {"preset": "gutenberg-moe-16", "tokens_per_second": 21000.0,
         "step_ratio_to_dense": 1.29}]}))
    return root, bench


def _row(table, label):
    (line,) = [x for x in table.splitlines() if x.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_tables_gaps_missing_budgets_ablation_seeds_and_wikipedia(runs, tmp_path, capsys):
    bench = _load()
    root, throughput = runs
    out = tmp_path / "out" / "results.json"
    assert bench.main(["--runs", str(root), "--throughput", str(throughput),
                       "--images", str(tmp_path / "images"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    table1 = text.split("### 2.")[0]
    # MoE-16 against dense: 2100/2000, 950/1000, 736/800, 540/600, whole 450/500.
    assert _row(table1, "MoE-16")[4:] == ["2,100.0 (+5.0%)", "950.0 (-5.0%)", "736.0 (-8.0%)",
                                          "540.0 (-10.0%)", "450.0 (-10.0%)"]
    assert _row(table1, "dense")[1:] == ["0", "524,288", "60.0M", "2,000.0", "1,000.0", "800.0",
                                         "600.0", "500.0"]
    # MoE-256 stopped at 32.865M: 30M lies between its evaluations at 27.865M
    # (900) and 32.865M (800), geometric in tokens: w = ln(30/27.865)/ln(32.865/27.865).
    w = math.log(30 / 27.865) / math.log(32.865 / 27.865)
    at_30m = 900.0 ** (1 - w) * 800.0 ** w
    assert 0.4 < w < 0.5 and 840 < at_30m < 860
    moe256 = _row(table1, "MoE-256")
    assert moe256[1] == "256" and moe256[3] == "32.9M of 60.0M (partial)"
    assert moe256[6] == f"~{at_30m:,.1f} ({100 * (at_30m / 800 - 1):+.1f}%)"
    assert moe256[7] == "—"  # 60M not reached
    # Its whole-valid figure is from results-step-4573.json, at 22.865M tokens:
    # not comparable with dense's at 60M, so no gap.
    assert moe256[8] == "870.0 at 22.9M"
    for name in ("gutenberg-moe-64", "gutenberg-moe-1024-h", "gutenberg-2xlstm"):
        assert f"{name}: not run yet" in table1

    data = json.loads(out.read_text())
    moe16 = data["runs"]["gutenberg-moe-16"]
    assert moe16["gaps"]["60000000"] == pytest.approx(-10.0)
    assert data["runs"]["gutenberg-moe-256"]["budgets"]["30000000"] == {
        "perplexity": pytest.approx(at_30m), "how": "interpolated"}
    assert data["missing"] == ["gutenberg-moe-64", "gutenberg-moe-1024-h", "gutenberg-2xlstm"]

    # Wall time: 60M tokens in 3,600 s and 4,320 s; the step 1.2x dense's.
    table2 = text.split("### 2.")[1].split("### 3.")[0]
    assert _row(table2, "dense")[1:] == ["1 h 00 min", "60.0M", "16,667", "27,000", "1.00", "1.00"]
    assert _row(table2, "MoE-16")[1:] == ["1 h 12 min", "60.0M", "13,889", "21,000", "1.20",
                                          "1.29"]
    # MoE-256: 6,573 steps in 2,200 s, 0.3347 s a step against dense's 0.3.
    assert moe16["step_ratio_to_dense"] == pytest.approx(1.2)
    assert data["runs"]["gutenberg-moe-256"]["step_ratio_to_dense"] == pytest.approx(
        (2200 / 6573) / (3600 / 12000))

    # The ablation: the clean validation routing of the last evaluation
    # (val_moe_*), not the training columns (moe_*), at 15M for both.
    table3 = text.split("### 3.")[1].split("### 4.")[0]
    assert _row(table3, "MoE-256")[1:] == ["0.10", "0.10", "1,100.0", "870.0", "moe", "32.9M",
                                           "0.050", "0.070", "1.210"]
    assert _row(table3, "MoE-256, no balancing losses")[1:] == [
        "0.00", "0.00", "1,000.0", "—", "moe", "15.0M", "4.500", "3.250", "17.500"]
    # Seeds of dense: 600 and 600 at 60M; whole valid 500 and 510.
    table4 = text.split("### 4.")[1].split("### 5.")[0]
    whole = [line for line in table4.splitlines() if "whole valid" in line]
    assert whole == ["| dense | 1, 2 | whole valid | 500.0, 510.0 | 505.0 | 10.0 (2.0%) |"]
    assert data["seeds"]["gutenberg-dense"]["budget_tokens"] == 60_000_000
    # Wikipedia: 1,100 against 1,000.
    table5 = text.split("### 5.")[1]
    assert _row(table5, "MoE-16")[1] == "1,100.0 (+10.0%)"


# Slow: a fresh environment's first matplotlib import builds its font cache
# (71 s of `make test` under load); `make test-slow` runs it.
@pytest.mark.slow
def test_figures_are_written(runs, tmp_path):
    pytest.importorskip("matplotlib", reason="the figures need matplotlib (the plots extra)")
    bench = _load()
    root, throughput = runs
    images = tmp_path / "images"
    assert bench.main(["--runs", str(root), "--throughput", str(throughput), "--images",
                       str(images), "--json", str(tmp_path / "r.json")]) == 0
    for name in ("gutenberg-ppl-vs-tokens.png", "gutenberg-ppl-vs-experts.png"):
        data = (images / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    # The experts plot is at the largest budget every present run reached:
    # MoE-256 stopped at 32.9M, so 30M (interpolated).
    assert json.loads((tmp_path / "r.json").read_text())["experts_figure_budget"] == "30000000"


def test_gap_curve_compares_every_evaluation_with_dense_at_equal_tokens(runs, tmp_path):
    bench = _load()
    root, throughput = runs
    out = tmp_path / "r.json"
    assert bench.main(["--runs", str(root), "--images", str(tmp_path / "images"),
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())["runs"]
    assert data["gutenberg-dense"]["gap_curve"] == []
    # MoE-16 evaluated where dense did: 2100/2000, 1500/1500, 950/1000, ..., 540/600.
    moe16 = {p["tokens"]: p["gap_percent"] for p in data["gutenberg-moe-16"]["gap_curve"]}
    assert sorted(moe16) == [5e6 * i for i in range(1, 13)]
    expected = {5e6: 5.0, 10e6: 0.0, 15e6: -5.0, 30e6: -8.0, 60e6: -10.0}
    assert {t: moe16[t] for t in expected} == pytest.approx(expected)
    # MoE-256's evaluation at step 4,573 (22.865M tokens) falls between dense's
    # at 20M (900) and 25M (850): dense there is geometric in tokens.
    w = math.log(22.865 / 20) / math.log(25 / 20)
    dense_there = 900.0 ** (1 - w) * 850.0 ** w
    moe256 = {p["tokens"]: p["gap_percent"] for p in data["gutenberg-moe-256"]["gap_curve"]}
    assert moe256[22.865e6] == pytest.approx(100 * (950.0 / dense_there - 1))
    assert moe256[5e6] == pytest.approx(25.0)  # 2500 / 2000


def test_missing_runs_directory_is_one_line_exit_2(tmp_path, capsys):
    bench = _load()
    assert bench.main(["--runs", str(tmp_path / "nothing"), "--json",
                       str(tmp_path / "r.json")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_lm_evaluate_out_writes_the_printed_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")  # cli.main in this process
    result = {"perplexity": 123.5, "words": 10, "data": "wiki.txt"}
    monkeypatch.setattr(lm_train, "evaluate", lambda *args: dict(result))
    out = tmp_path / "wikipedia.json"
    assert cli.main(["lm", "evaluate", "--run-dir", str(tmp_path), "--data", "wiki.txt",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == result
    assert json.loads(capsys.readouterr().out) == result
