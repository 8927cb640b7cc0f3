"""Tests of `keras-moe reproduce`: the shipped configurations, plan, run, ledger and report."""

import datetime
import doctest
import fnmatch
import glob
import hashlib
import io
import json
import math
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from keras_moe.models import presets, translation_presets
from keras_moe.pipelines import cli
from keras_moe.pipelines.lm.config import LMConfig
from keras_moe.pipelines.reproduce import experiments, ledger
from keras_moe.pipelines.reproduce import plan as reproduce
from keras_moe.pipelines.translate.config import TranslateConfig
from tests.conftest import REPO_ROOT
from tests.pipelines.lm.train_test import run_cli, write_corpus

NAMES = experiments.experiment_names()
TABLE_7 = [e.name for e in experiments.TABLE_7]
TABLE_6 = [e.name for e in experiments.TABLE_6]
WMT = [e.name for e in experiments.TABLES_2_3]
# Table 7 of the paper, transcribed independently of experiments.py (millions):
# (ops/timestep, #params excluding embedding and softmax), the same figures as
# tests/models/presets_test.py.
PAPER_TABLE_7 = {
    "lm1b-4xlstm-512": (8.4, 8.4), "lm1b-lstm-2048-512": (9.4, 9.4),
    "lm1b-moe-1-wide": (8.4, 8.4), "lm1b-moe-1-deep": (8.4, 8.4), "lm1b-moe-4": (8.4, 8.4),
    "lm1b-moe-32": (8.4, 37.8), "lm1b-moe-256": (8.6, 272.9), "lm1b-moe-256-h": (8.4, 272.9),
    "lm1b-moe-1024-h": (8.5, 1079.0), "lm1b-moe-4096-h": (8.9, 4303.4),
}
# Table 6: (w_importance, w_load) -> test perplexity.
PAPER_TABLE_6 = {(0, 0): 39.8, (0.2, 0): 35.6, (0, 0.2): 35.7, (0.1, 0.1): 35.6,
                 (0.01, 0.01): 35.7, (1, 1): 35.7}
REPO = str(REPO_ROOT)


def tiny_overrides(corpus):
    """A few steps of a 16-wide model on a small text file: the shape of a CPU run."""
    return [
        "data.format=text", f"data.train={corpus['train']}", f"data.valid={corpus['valid']}",
        f"data.test={corpus['valid']}", "data.vocab_size=40", "data.min_count=1",
        "data.vocab_max_lines=1000", "data.batch_tokens=64", "data.max_sentence_len=16",
        "data.shuffle_buffer=50", "data.eval_batch_size=8", "model.model_dim=16",
        "model.num_experts=4", "model.expert_hidden_dim=8", "model.k=2", "model.num_sampled=8",
        "train.steps=2", "train.steps_per_eval=2", "train.warmup_steps=1",
        "train.monitor_every_n_steps=1", "train.verbose=0",
    ]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `keras-moe reproduce run` through the command line (a subprocess)."""
    root = tmp_path_factory.mktemp("reproduce")
    corpus = {"train": write_corpus(root / "train.txt", 120, 0),
              "valid": write_corpus(root / "valid.txt", 20, 1)}
    overrides = tiny_overrides(corpus)
    run_dir = root / "runs" / "ablation"
    sets = [arg for item in overrides for arg in ("--set", item)]
    before = datetime.datetime.now(datetime.timezone.utc)
    done = run_cli("reproduce", "run", "lm1b-moe-256-ablation-0.1-0.1", "--run-dir",
                   str(run_dir), *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "run_dir": run_dir, "overrides": overrides, "stdout": done.stdout,
            "before": before}


def test_every_experiment_has_a_shipped_config_that_loads():
    shipped = {os.path.splitext(os.path.basename(p))[0]
               for p in glob.glob(os.path.join(experiments.CONFIG_DIR, "*.yaml"))}
    assert shipped == set(NAMES)
    assert len(TABLE_7) == 10 and len(TABLE_6) == 6 and len(WMT) == 4
    for name in NAMES:
        experiment, config = reproduce.load_experiment(name)
        assert isinstance(config, LMConfig if experiment.task == "lm" else TranslateConfig)
        arguments = reproduce.model_arguments(experiment, config)
        assert arguments["model_dim"] == 512
        # setup.py ships configs/*/*.yaml as package data.
        relative = os.path.relpath(experiment.config_path, os.path.join(REPO, "pipelines"))
        assert fnmatch.fnmatch(relative, "configs/*/*.yaml")


@pytest.mark.parametrize("name", NAMES)
def test_config_header_states_hardware_strategy_and_paper_figures(name):
    experiment = experiments.get_experiment(name)
    with open(experiment.config_path, encoding="utf-8") as f:
        text = f.read()
    header = text[: text.index("\ndata:")]
    assert all(line.startswith("#") for line in header.splitlines())
    flat = " ".join(line.lstrip("# ") for line in header.splitlines())
    hardware = experiment.hardware
    assert f"{hardware['gpus']} GPUs of {hardware['gpu_memory_gb']} GB" in flat
    assert experiment.strategy in flat and experiment.table in flat
    assert experiment.figures[experiment.metric] in flat
    for figure in experiment.checked:
        assert experiment.figures[figure] in flat
    assert f"keras-moe reproduce run {name}" in flat


def test_lm_configs_follow_app_c():
    for name in TABLE_7 + TABLE_6:
        experiment, config = reproduce.load_experiment(name)
        d, m, t = config.data, config.model, config.train
        assert (d.format, d.vocab_size, d.min_count) == ("1b", 793_471, 3)
        assert d.test and d.mode == "sentences" and d.batch_tokens == 300_000
        assert m.num_sampled == 8192
        assert (t.warmup_steps, t.decay) == (1000, "inverse_sqrt")
        # 10 epochs of the benchmark's 829,250,940 tokens at 300k tokens per step.
        assert t.steps % t.steps_per_eval == 0
        epochs = t.steps * d.batch_tokens / experiments.ONE_BILLION_WORD_TOKENS
        assert 10 <= epochs < 10.01
        if experiment.table == "Table 7":
            assert m.dropout == float(experiment.figures["dropout"])
            assert (m.importance_weight, m.load_weight) == (0.1, 0.1)
            assert config.model.preset == name.removeprefix("lm1b-")
        else:
            assert m.preset == "moe-256" and m.dropout == 0.1
    weights = {(experiments.get_experiment(n).figures["w_importance"],
                experiments.get_experiment(n).figures["w_load"]) for n in TABLE_6}
    assert {(float(a), float(b)) for a, b in weights} == set(PAPER_TABLE_6)
    for name in TABLE_6:
        _, config = reproduce.load_experiment(name)
        pair = (config.model.importance_weight, config.model.load_weight)
        assert experiments.get_experiment(name).paper_value == PAPER_TABLE_6[pair]
    dropouts = {n: reproduce.load_experiment(n)[1].model.dropout for n in TABLE_7}
    assert dropouts["lm1b-moe-1024-h"] == dropouts["lm1b-moe-4096-h"] == 0.2
    assert dropouts["lm1b-moe-32"] == 0.1


def test_translation_configs_follow_app_e():
    for name in WMT:
        experiment, config = reproduce.load_experiment(name)
        d, m, t = config.data, config.model, config.train
        pair = "fr" if "enfr" in name else "de"
        assert (d.source_language, d.target_language, d.vocab_size) == ("en", pair, 32000)
        assert [p.tfds for p in d.train] == [f"wmt14_translate/{pair}-en"]
        assert [(p.tfds, p.split) for p in d.test] == [(f"wmt14_translate/{pair}-en", "test")]
        assert "newstest2012" in d.valid[0].source and d.valid[1].split == "validation"
        assert d.batch_tokens / experiment.hardware["gpus"] == 16000
        assert (m.dropout, m.importance_weight, m.load_weight) == (0.4, 0.01, 0.01)
        assert (t.warmup_steps, t.hold_steps, t.decay) == (2000, 8000, "inverse_sqrt")
        assert config.decode.beam_width > 1
        assert m.preset == ("gnmt-moe-2048-h" if "moe" in name else "gnmt-baseline")


@pytest.mark.parametrize("name", TABLE_7 + TABLE_6)
def test_plan_matches_table_7_within_two_percent(name):
    result = reproduce.plan(name, measure=False)
    assert result["agrees"]
    checks = {c["figure"]: c for c in result["checks"]}
    row = "lm1b-moe-256" if name in TABLE_6 else name
    ops, params = PAPER_TABLE_7[row]
    assert abs(checks["ops_per_timestep"]["ours"] / (ops * 1e6) - 1) <= 0.02
    assert abs(checks["params"]["ours"] / (params * 1e6) - 1) <= 0.02
    assert checks["ops_per_timestep"]["within"] == checks["params"]["within"] == "2%"
    # The same counts as the preset formulas, embedding and softmax excluded.
    preset = reproduce.load_experiment(name)[1].model.preset
    assert checks["params"]["ours"] == presets.costs(preset)["params_without_biases"]
    assert checks["total_params"]["ok"]


def test_plan_of_tables_2_and_3_uses_the_translation_formulas():
    for name in WMT:
        experiment, config = reproduce.load_experiment(name)
        result = reproduce.plan(name, measure=False)
        arguments = reproduce.model_arguments(experiment, config)
        cost = translation_presets.costs(arguments, vocab_size=32000)
        assert result["costs"]["ops_per_timestep"] == (
            cost["ops_per_timestep"] + cost["softmax_ops_per_timestep"])
        assert result["costs"]["total_params"] == cost["total_params"]
        if "moe" in name:
            # Tables 2-3 print 85M ops/timestep and 8.7B parameters for MoE-2048.
            assert [c["figure"] for c in result["checks"]] == ["ops_per_timestep", "total_params"]
            assert result["agrees"]
            assert round(result["costs"]["ops_per_timestep"] / 1e6) == 85
            assert round(result["costs"]["total_params"] / 1e9, 1) == 8.7
            # 8.7B float32 parameters with Adam do not fit one replica; with
            # expert parallelism (the configuration's) each of the 8 GPUs
            # holds everything but 7/8 of the experts.
            memory = result["memory"]
            assert memory["expert_parallel"] and memory["fits"]
            experts = reproduce.expert_parameters(experiment, arguments)
            assert 0.95 * cost["total_params"] < experts < cost["total_params"]
            assert memory["weights_gb"] == pytest.approx(
                (cost["total_params"] - experts * 7 / 8) * 4 / 1e9)
            data_parallel = reproduce.plan(name, measure=False,
                                           overrides=["train.expert_parallel=false"])
            assert not data_parallel["memory"]["fits"]
            assert data_parallel["memory"]["weights_gb"] == pytest.approx(
                cost["total_params"] * 4 / 1e9)
        else:
            # The GNMT row's 214M / 278M describe Wu et al.'s model, not this baseline.
            assert experiment.figures["ops_per_timestep"] == "214M"
            assert result["checks"] == [] and result["agrees"]
            assert result["costs"]["total_params"] < 100e6


def test_plan_fails_when_counts_disagree(monkeypatch, capsys):
    monkeypatch.setitem(presets.PRESETS, "moe-32", dict(presets.PRESETS["moe-32"], num_experts=64))
    result = reproduce.plan("lm1b-moe-32", measure=False)
    assert not result["agrees"]
    with pytest.raises(reproduce.CostMismatchError, match=r"params: ours .* 37\.8M"):
        reproduce.check_plan(result)
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")
    assert cli.main(["reproduce", "plan", "lm1b-moe-32", "--no-measure"]) == 2
    out, err = capsys.readouterr()
    assert "DISAGREES" in out
    assert "keras-moe reproduce plan: error: lm1b-moe-32: our counts disagree" in err
    monkeypatch.undo()
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")
    assert cli.main(["reproduce", "plan", "lm1b-moe-32", "--no-measure", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agrees"]


def test_plan_batch_memory_and_steps():
    result = reproduce.plan("lm1b-moe-32", measure=False)
    b = result["batch"]
    assert (b["tokens_per_step"], b["devices"], b["tokens_per_device"]) == (300_000, 8, 37_500)
    assert b["tokens_per_expert"] == 4 * 37_500 * 8 / 32  # k * b * d / n
    # Hierarchical: 2 groups x 2 experts per position; more devices, smaller b.
    b = reproduce.plan("lm1b-moe-4096-h", gpus=16, measure=False)["batch"]
    assert (b["experts_per_position"], b["tokens_per_device"]) == (4, 300_000 / 16)
    assert b["tokens_per_expert"] == pytest.approx(4 * 300_000 / 4096)
    assert reproduce.plan("lm1b-4xlstm-512", measure=False)["batch"]["tokens_per_expert"] is None
    assert reproduce.plan("lm1b-moe-1-wide", measure=False)["batch"]["tokens_per_expert"] == 300_000
    m = reproduce.plan("lm1b-moe-4096-h", measure=False)
    memory = m["memory"]
    assert memory["weights_gb"] == pytest.approx(m["costs"]["total_params"] * 4 / 1e9)
    assert memory["adam_slots_gb"] == 2 * memory["weights_gb"]
    assert memory["total_gb"] > 80 and memory["fits"] and memory["device_gb"] == 141
    assert m["steps"] == 27_650 and 10 <= m["epochs"] < 10.01
    text = reproduce.format_plan(m)
    assert "k*b*d/n = 4*37,500*8/4096 = 293 tokens" in text
    assert "time: not measured" in text


def test_plan_measures_a_scaled_down_copy():
    result = reproduce.plan("lm1b-moe-256-h", measure=True, steps=1)
    estimate = result["estimate"]
    assert estimate["scaled_model"]["model_dim"] == 64
    assert estimate["scaled_model"]["num_experts"] <= 16
    assert estimate["seconds_per_step"] > 0 and estimate["ops_per_second"] > 0
    per_token = result["costs"]["ops_per_timestep"] + result["costs"]["softmax_ops_per_token"]
    assert estimate["full_step_ops"] == 3 * per_token * 300_000
    assert estimate["seconds_this_machine"] == pytest.approx(
        result["steps"] * estimate["full_step_ops"] / estimate["ops_per_second"])
    assert "EXTRAPOLATION" in reproduce.format_plan(result)


def test_run_appends_a_complete_ledger_line(cli_run):
    run_dir = cli_run["run_dir"]
    path = ledger.default_path(run_dir)
    assert path == str(cli_run["root"] / "runs" / "ledger.jsonl")
    (entry,) = ledger.read(path)
    assert json.loads(cli_run["stdout"]) == entry
    results = json.loads((run_dir / "results.json").read_text())
    expected_keys = {
        "experiment", "table", "paper_row", "metric", "value", "paper_value", "difference",
        "relative_difference", "config_hash", "overrides", "hardware", "wall_seconds",
        "train_seconds", "steps", "git_commit", "git_dirty", "timestamp", "run_dir", "extra",
    }
    assert set(entry) == expected_keys
    assert (entry["experiment"], entry["table"], entry["paper_row"]) == (
        "lm1b-moe-256-ablation-0.1-0.1", "Table 6", "w_importance 0.1, w_load 0.1")
    assert entry["metric"] == "test_perplexity"
    assert entry["value"] == results["test"]["perplexity"] and math.isfinite(entry["value"])
    assert entry["paper_value"] == 35.6
    assert entry["difference"] == pytest.approx(entry["value"] - 35.6)
    assert entry["relative_difference"] == pytest.approx(entry["difference"] / 35.6)
    saved = (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert entry["config_hash"] == hashlib.sha256(saved.encode("utf-8")).hexdigest()
    assert entry["overrides"] == cli_run["overrides"]
    hw = entry["hardware"]
    assert hw["replicas"] == 1 and hw["gpus"] == [] and hw["cpu_cores"] == os.cpu_count()
    assert hw["description"].startswith("CPU only") and hw["cpu"]
    assert entry["steps"] == 2 == results["steps"]
    assert entry["wall_seconds"] >= entry["train_seconds"] == results["train_seconds"]
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None
    assert entry["git_commit"] == head
    assert isinstance(entry["git_dirty"], bool) or head is None
    stamp = datetime.datetime.fromisoformat(entry["timestamp"])
    assert cli_run["before"] - datetime.timedelta(seconds=1) <= stamp
    assert stamp <= datetime.datetime.now(datetime.timezone.utc)
    assert entry["run_dir"] == str(run_dir)
    routing = entry["extra"]["routing_valid"]["moe"]
    assert routing["batch_cv_load"] == results["routing_valid"]["moe"]["batch_cv_load"]
    assert entry["extra"]["valid_perplexity"] == results["valid"]["perplexity"]


def test_report_renders_ours_beside_the_paper(cli_run, tmp_path, monkeypatch, capsys):
    (entry,) = ledger.read(ledger.default_path(cli_run["run_dir"]))
    # A second experiment (BLEU), as a translation run would write it.
    other = dict(entry, experiment="wmt14-enfr-moe-2048-h", table="Table 2",
                 paper_row="MoE with 2048 Experts", metric="test_bleu", value=38.5,
                 paper_value=40.35, difference=38.5 - 40.35, overrides=[])
    path = tmp_path / "ledger.jsonl"
    for e in (entry, other):
        ledger.append(str(path), e)
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")
    out = tmp_path / "out" / "report.md"
    assert cli.main(["reproduce", "report", "--ledger", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert text in printed
    row = next(line for line in text.splitlines() if line.startswith("| wmt14-enfr"))
    assert "| 38.50 | 40.35 | -1.85 |" in row
    ours = f"{entry['value']:.2f}"
    assert f"| {ours} | 35.60 |" in text
    assert "lm1b-moe-256-ablation-0.1-0.1 †" in text and "† trained with `--set`" in text
    assert "| 0.1 | 0.1 |" in text and " / 0.05 |" in text  # Table 6's CV(Load)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "src=" not in page  # self-contained
    svg = page[page.index("<svg"): page.index("</svg>") + len("</svg>")]
    tree = ET.fromstring(svg)
    texts = [t.text for t in tree.iter("{http://www.w3.org/2000/svg}text")]
    bars = list(tree.iter("{http://www.w3.org/2000/svg}rect"))
    assert "38.50" in texts and "40.35" in texts and ours in texts and "35.60" in texts
    assert len(bars) == 2 + 4  # legend + two bars per experiment
    assert "wmt14-enfr-moe-2048-h" in texts and "<table>" in page


def test_ledger_entry_of_a_translation_run_and_of_a_run_without_test_set(tmp_path):
    experiment, config = reproduce.load_experiment("wmt14-ende-moe-2048-h")
    scores = {"bleu": 25.1, "bleu_signature": "nrefs:1|...", "bleu_tokenized": 25.6,
              "perplexity": 4.9}
    results = {"valid": dict(scores, bleu_tokenized=22.0), "test": scores, "steps": 7,
               "train_seconds": 1.5}
    entry = ledger.make_entry(experiment, config, results, 2.0, tmp_path / "run")
    assert (entry["metric"], entry["value"], entry["paper_value"]) == ("test_bleu", 25.6, 26.03)
    assert entry["difference"] == pytest.approx(25.6 - 26.03)
    assert entry["extra"] == {"bleu_sacrebleu": 25.1, "bleu_signature": "nrefs:1|...",
                              "perplexity": 4.9, "valid_bleu": 22.0}
    assert entry["config_hash"] == ledger.config_hash(config) and entry["overrides"] == []
    experiment, config = reproduce.load_experiment("lm1b-moe-32")
    results = {"valid": {"perplexity": float("inf")}, "steps": 1, "train_seconds": 1.0}
    entry = ledger.make_entry(experiment, config, results, 2.0, tmp_path / "run")
    assert (entry["metric"], entry["value"], entry["difference"]) == ("valid_perplexity", None,
                                                                     None)
    ledger.append(str(tmp_path / "l.jsonl"), entry)  # strict JSON: no NaN or Infinity
    assert ledger.read(str(tmp_path / "l.jsonl")) == [json.loads(json.dumps(entry))]


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ledger not found"):
        ledger.read(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON line"):
        ledger.read(str(bad))


def test_list_prints_every_experiment(monkeypatch, capsys):
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")
    assert cli.main(["reproduce", "list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        experiment = experiments.get_experiment(name)
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert experiment.figures[experiment.metric] in line
        for figure in ("ops_per_timestep", "params", "total_params"):
            if figure in experiment.figures:
                assert experiment.figures[figure] in line
    assert out.count("published: 12-16 hours (App. C.1); 16 K40 GPUs") == 9
    assert "published: 3 days; 64 K40 GPUs" in out and "time not published" in out


def test_unknown_experiment():
    with pytest.raises(ValueError, match=r"Unknown experiment 'lm1b-moe-7'\. Known experiments: "
                                         r"lm1b-4xlstm-512, "):
        reproduce.plan("lm1b-moe-7", measure=False)


@pytest.mark.parametrize("module", [experiments, reproduce, ledger])
def test_docstring_examples(module):
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, module.__name__, globs=dict(vars(module)))
             if t.examples and t.filename == module.__file__]
    assert tests
    report = io.StringIO()
    runner = doctest.DocTestRunner(verbose=False)
    for test in tests:
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()
