"""Tests of keras_moe.pipelines.training.rundir: the paths of a run directory."""

import json
import os
import pathlib

import pytest

from keras_moe.pipelines.data.vocabulary import WordVocabulary
from keras_moe.pipelines.training.rundir import RunDir, step_checkpoint, step_checkpoints

SPECIALS = ["<pad>", "<unk>", "<eos>"]


def test_every_path_of_the_documented_layout():
    run = RunDir("runs/a")
    expected = {
        "config_file": "runs/a/config.yaml",
        "word_vocabulary_file": "runs/a/vocab.json",
        "wordpiece_file": "runs/a/wordpiece.txt",
        "cleaning_file": "runs/a/cleaning.json",
        "tensorboard_dir": "runs/a/tensorboard",
        "tensorboard_train_dir": "runs/a/tensorboard/train",
        "tensorboard_validation_dir": "runs/a/tensorboard/validation",
        "checkpoints_dir": "runs/a/checkpoints",
        "last_checkpoint": "runs/a/checkpoints/last.keras",
        "best_checkpoint": "runs/a/checkpoints/best.keras",
        "backup_dir": "runs/a/backup",
        "history_file": "runs/a/history.csv",
        "elapsed_file": "runs/a/elapsed.json",
        "model_file": "runs/a/model.keras",
        "results_file": "runs/a/results.json",
        "translations_dir": "runs/a/translations",
        "eval_dir": "runs/a/eval",
        "inspect_report": "runs/a/inspect.html",
        "demo_data_dir": "runs/a/data",
    }
    assert {name: getattr(run, name) for name in expected} == expected
    assert run.step_checkpoint(1200) == "runs/a/checkpoints/step-00001200.weights.h5"
    assert run.eval_hypotheses("/data/newstest2014.en.sgm") == "runs/a/eval/newstest2014.en.sgm.hyp"


def test_wraps_strings_paths_and_itself():
    run = RunDir(pathlib.Path("runs") / "b")
    assert run.path == "runs/b" and str(run) == "runs/b" and os.fspath(run) == "runs/b"
    assert RunDir.wrap(run) is run
    assert RunDir.wrap("runs/b") == run and RunDir(run) == run
    assert RunDir("runs/c") != run
    assert os.path.join(run, "x") == "runs/b/x"  # an os.PathLike


def test_find_model_prefers_the_final_model(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.keras or checkpoints/last.keras"):
        run.find_model()
    os.makedirs(run.checkpoints_dir)
    open(run.last_checkpoint, "w").close()
    assert run.find_model() == str(tmp_path / "checkpoints" / "last.keras")
    open(run.model_file, "w").close()
    assert run.find_model() == str(tmp_path / "model.keras")


def test_is_run_and_finished(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.exists() and not run.is_run() and not run.is_finished()
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        run.check_is_run()
    run.makedirs()
    open(run.config_file, "w").close()
    assert run.exists() and run.is_run() and not run.is_finished()
    run.check_is_run()


def test_json_round_trip_and_errors(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_json(run.results_file) is None
    assert run.write_results({"steps": 3}) == {"steps": 3}
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        assert json.load(f) == {"steps": 3}
    assert run.read_json(run.results_file) == {"steps": 3}
    (tmp_path / "elapsed.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="elapsed.json: not valid JSON"):
        run.read_json(run.elapsed_file)


def test_save_and_load_vocabulary(tmp_path):
    run = RunDir(tmp_path / "run")
    words = WordVocabulary(SPECIALS + ["a", "b"])
    assert run.save_vocabulary(words) == run.word_vocabulary_file
    assert run.load_vocabulary() == words


def test_step_checkpoints_in_step_order(tmp_path):
    for step in (20, 3, 100):
        open(step_checkpoint(str(tmp_path), step), "w").close()
    (tmp_path / "step-x.weights.h5").write_text("")
    (tmp_path / "last.keras").write_text("")
    names = [os.path.basename(p) for p in step_checkpoints(str(tmp_path))]
    assert names == ["step-00000003.weights.h5", "step-00000020.weights.h5",
                     "step-00000100.weights.h5"]
