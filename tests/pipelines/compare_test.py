"""Tests of keras_moe.pipelines.compare on run directories written by hand.

Every expected figure is worked out by hand from the files the tests write:
steps from `steps_per_eval`, `elapsed.json` and `results.json`; group means
and sample standard deviations from three made-up seeds.
"""

import csv
import json
import math

import pytest
import yaml

from keras_moe.pipelines import cli
from keras_moe.pipelines.compare import compare, higher_is_better, markdown, read_run


def write_run(path, rows, steps_per_eval=500, config=None, elapsed=None, results=None):
    """A run directory: `history.csv` from `rows` (epoch added), config, elapsed, results."""
    path.mkdir(parents=True)
    columns = ["epoch"] + sorted({key for row in rows for key in row})
    with open(path / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for epoch, row in enumerate(rows):
            writer.writerow({"epoch": epoch, **row})
    data = {"train": {"steps_per_eval": steps_per_eval}}
    for key, value in (config or {}).items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    (path / "config.yaml").write_text(yaml.safe_dump(data))
    if elapsed is not None:
        (path / "elapsed.json").write_text(json.dumps(elapsed))
    if results is not None:
        (path / "results.json").write_text(json.dumps(results))
    return str(path)


def steps_of(run_dir):
    return [e["step"] for e in read_run(run_dir).evaluations]


def test_each_row_gets_its_optimizer_step(tmp_path):
    rows = [{"val_bleu": 5.0}, {"val_bleu": 11.0}, {"val_bleu": 14.0}]
    # Stopped by the time limit at step 1,234, inside the third 500-step epoch:
    # elapsed.json noted that step.
    clocked = write_run(tmp_path / "clocked", rows,
                        elapsed={"500": 600.0, "1000": 1200.0, "1234": 1500.0})
    # No elapsed.json (a run older than the clock): results.json's step count.
    finished = write_run(tmp_path / "finished", rows, results={"steps": 1100})
    # Neither: every row is a full epoch.
    running = write_run(tmp_path / "running", rows)
    assert steps_of(clocked) == [500, 1000, 1234]
    assert steps_of(finished) == [500, 1000, 1100]
    assert steps_of(running) == [500, 1000, 1500]
    # The minutes come from elapsed.json when history.csv has no column for them.
    assert [e["elapsed_minutes"] for e in read_run(clocked).evaluations] == [10.0, 20.0, 25.0]
    assert [e["elapsed_minutes"] for e in read_run(running).evaluations] == [None] * 3


def test_a_step_column_wins_over_the_epoch(tmp_path):
    # A run stopped by its time limit at step 1,234 (in epoch 2) and continued
    # from there: the continuation restarts epoch 2, so its evaluations come
    # 500 steps on (1,734, epoch 2 again) and at its end (2,000, epoch 3),
    # where the epochs alone would give 1,500 and 2,000. The first row is
    # older than the `step` column and still gets its step from the epoch.
    run = write_run(tmp_path / "continued", [], results={"steps": 2000},
                    elapsed={"500": 60.0, "1000": 120.0, "1234": 150.0, "1734": 210.0})
    (tmp_path / "continued" / "history.csv").write_text(
        "epoch,val_bleu,step\n0,5.0,\n1,11.0,1000\n2,14.0,1234\n2,15.0,1734\n3,16.0,2000\n")
    record = read_run(run)
    assert [e["step"] for e in record.evaluations] == [500, 1000, 1234, 1734, 2000]
    assert [e["val_bleu"] for e in record.evaluations] == [5.0, 11.0, 14.0, 15.0, 16.0]
    assert [e["elapsed_minutes"] for e in record.evaluations] == [1.0, 2.0, 2.5, 3.5, None]


def test_history_minutes_win_and_label_defaults_to_directory_name(tmp_path):
    run = write_run(tmp_path / "m30k-moe", [{"val_bleu": 1.0, "elapsed_minutes": 16.5}],
                    elapsed={"500": 60.0})
    record = read_run(run)
    assert record.label == "m30k-moe"
    assert record.evaluations == [{"step": 500, "elapsed_minutes": 16.5, "val_bleu": 1.0}]
    assert read_run(f"moe={run}").label == "moe"


@pytest.fixture
def seeds_and_dense(tmp_path):
    """Three seeds of an MoE configuration and one dense run, hand-made."""
    moe = []
    for seed, (bleu, ppl) in enumerate([((20.0, 24.0), (15.0, 12.0)),
                                         ((22.0, 21.0), (14.0, 13.0)),
                                         ((27.0, 30.0), (11.0, 10.0))], start=1):
        rows = [{"val_bleu": b, "val_perplexity": p} for b, p in zip(bleu, ppl, strict=True)]
        results = {"steps": 1000, "elapsed_minutes": 30.0 + seed, "resumed": False,
                   "test": {"bleu": bleu[-1] + 1.0, "bleu_signature": "nrefs:1|...", "chrf": 50.0}}
        moe.append(write_run(tmp_path / f"moe-{seed}", rows, results=results,
                             config={"train.seed": seed, "model.dropout": 0.3}))
    dense = write_run(tmp_path / "dense", [{"val_bleu": 25.0, "val_perplexity": 11.5}],
                      results={"steps": 500, "train_seconds": 600.0, "resumed": False,
                               "test": {"bleu": 26.0}},
                      config={"train.seed": 1})
    return [f"moe={run}" for run in moe] + [f"dense={dense}"]


def test_groups_are_mean_sample_std_and_count(seeds_and_dense):
    comparison = compare(seeds_and_dense)
    assert comparison["labels"] == ["moe", "dense"]
    assert comparison["metrics"] == ["val_bleu", "val_perplexity"]
    at_500, at_1000 = comparison["curves"]["val_bleu"]
    # 20, 22, 27: mean 23, squared deviations 9 + 1 + 16 = 26, / (3 - 1) = 13.
    assert at_500["step"] == 500
    assert at_500["moe"]["mean"] == pytest.approx(23.0)
    assert at_500["moe"]["std"] == pytest.approx(math.sqrt(13.0))
    assert at_500["moe"]["n"] == 3
    assert at_500["dense"] == {"mean": 25.0, "std": None, "n": 1}
    # 24, 21, 30: mean 25, squared deviations 1 + 16 + 25 = 42, / 2 = 21.
    assert at_1000["moe"]["std"] == pytest.approx(math.sqrt(21.0))
    assert at_1000["dense"] is None


def test_best_takes_each_metrics_direction(seeds_and_dense):
    best = compare(seeds_and_dense)["best"]
    # BLEU: the largest of each seed: 24 (step 1,000), 22 (500), 30 (1,000).
    assert best["val_bleu"]["moe"]["steps"] == [1000, 500, 1000]
    assert best["val_bleu"]["moe"]["mean"] == pytest.approx(76.0 / 3)
    # Deviations -4/3, -10/3, 14/3: squares sum to 312/9, / 2 = 52/3.
    assert best["val_bleu"]["moe"]["std"] == pytest.approx(math.sqrt(52.0 / 3))
    # Perplexity: the smallest: 12 (1,000), 13 (1,000), 10 (1,000).
    assert best["val_perplexity"]["moe"]["mean"] == pytest.approx(35.0 / 3)
    assert best["val_perplexity"]["moe"]["steps"] == [1000, 1000, 1000]
    assert best["val_perplexity"]["dense"]["steps"] == [500]
    assert higher_is_better("val_chrf") and not higher_is_better("val_loss")


def test_final_scores_and_training_minutes(seeds_and_dense, tmp_path):
    final = compare(seeds_and_dense)["final"]
    assert final["test_bleu"]["moe"]["mean"] == pytest.approx((25.0 + 22.0 + 31.0) / 3)
    assert final["test_bleu"]["dense"]["mean"] == 26.0
    assert final["test_chrf"]["dense"] is None  # the dense run has no chrF
    assert "test_bleu_signature" not in final  # strings are not scores
    assert final["training_minutes"]["moe"]["mean"] == pytest.approx(32.0)  # 31, 32, 33
    assert final["training_minutes"]["dense"]["mean"] == 10.0  # 600 s in one sitting
    # A resumed run older than the clock: its train_seconds are the last
    # sitting's only, so no training time is claimed for it.
    resumed = write_run(tmp_path / "resumed", [{"val_bleu": 1.0}],
                        results={"steps": 500, "train_seconds": 60.0, "resumed": True})
    assert "training_minutes" not in compare([resumed])["final"]


def test_configuration_differences_are_named(seeds_and_dense):
    differences = compare(seeds_and_dense)["differences"]
    assert set(differences) == {"train.seed", "model.dropout"}
    assert [v["value"] for v in differences["train.seed"]] == [1, 2, 3, 1]
    # The dense run's configuration has no dropout key at all.
    assert [v["value"] for v in differences["model.dropout"]] == [0.3, 0.3, 0.3, "(absent)"]


def test_markdown_tables(seeds_and_dense):
    text = markdown(compare(seeds_and_dense))
    assert "| `train.seed` | 1 / 2 / 3 | 1 |" in text
    assert "| `model.dropout` | 0.3 | (absent) |" in text
    assert "| 500 | 23.00 ± 3.61 (n=3) | 25.00 |" in text
    assert "| 1,000 | 25.00 ± 4.58 (n=3) |  |" in text
    assert "| val_bleu | 25.33 ± 4.16 (n=3) (1,000, 500, 1,000) | 25.00 (500) |" in text
    assert "| steps | 1000 ± 0 (n=3) | 500 |" in text


def test_elapsed_minutes_is_a_curve_without_a_best(tmp_path):
    run = write_run(tmp_path / "r", [{"val_bleu": 1.0}, {"val_bleu": 2.0}],
                    elapsed={"500": 90.0, "1000": 180.0})
    comparison = compare([run], metrics=["elapsed_minutes", "val_bleu"])
    assert [row["r"]["mean"] for row in comparison["curves"]["elapsed_minutes"]] == [1.5, 3.0]
    assert list(comparison["best"]) == ["val_bleu"]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_run(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="history.csv"):
        read_run(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="Empty label"):
        read_run(f"={tmp_path / 'empty'}")
    run = write_run(tmp_path / "r", [{"val_bleu": 1.0}, {"val_bleu": 2.0}])
    with open(f"{run}/history.csv", "a") as f:
        f.write("2,n/a\n")
    with pytest.raises(ValueError, match=r"history.csv:4: column `val_bleu` holds 'n/a'"):
        read_run(run)
    good = write_run(tmp_path / "g", [{"val_bleu": 1.0}])
    with pytest.raises(ValueError, match=r"No run logged metric 'bleu'. Logged: val_bleu"):
        compare([good], metrics=["bleu"])
    with pytest.raises(ValueError, match="at least one run"):
        compare([])


def test_command_line(seeds_and_dense, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")
    assert cli.main(["compare", *seeds_and_dense, "--metric", "val_bleu"]) == 0
    text = capsys.readouterr().out
    assert "## val_bleu by step" in text and "val_perplexity by step" not in text
    assert cli.main(["compare", "--json", *seeds_and_dense]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(compare(seeds_and_dense)))
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
    assert "keras-moe compare: error:" in capsys.readouterr().err
