"""`keras-moe lm train` / `translate train` with `--strategy` and `--expert-parallel`.

Runs that need a strategy are real `keras-moe` processes: `--cpu-devices 2`
splits the CPU into two logical devices before TensorFlow starts (only
possible in a new process), so `mirrored` has 2 replicas here; the
`multi_worker` run is two processes joined by `TF_CONFIG` on 127.0.0.1
(ports picked at run time, killed in `finally`). Errors that arise before
any strategy exists are checked in this process through `cli.main`.
"""

import json
import math
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_moe.models  # noqa: F401 - registers the model classes for load_model
from keras_moe.models.lm import LanguageModel
from keras_moe.pipelines import cli
from keras_moe.pipelines.training import distribution
from tests.conftest import patient
from tests.pipelines.lm.train_test import write_corpus
from tests.pipelines.training.multi_worker_test import free_ports, kill, tf_config
from tests.pipelines.translate.train_test import write_pairs

# A hang guard for one training process (or a worker pair): typically 10-20 s,
# the slow translate test's 35-60 s.
TIMEOUT = patient(60)

LM_TINY = [
    "model.preset=cpu-moe-32", "model.model_dim=16", "model.num_experts=4",
    "model.expert_hidden_dim=8", "model.k=2", "data.seq_len=8", "data.batch_size=4",
    "data.vocab_size=40", "data.shuffle_buffer=8", "train.steps=2", "train.steps_per_eval=1",
    "train.warmup_steps=1", "train.monitor_every_n_steps=1", "train.verbose=0",
]
TRANSLATE_TINY = [
    "model.preset=cpu-gnmt-moe-16", "model.model_dim=16", "model.num_experts=4",
    "model.expert_hidden_dim=8", "model.k=2", "model.dropout=0.0", "data.vocab_size=120",
    "data.batch_tokens=256", "data.max_pieces=32", "data.shuffle_buffer=16", "train.steps=1",
    "train.steps_per_eval=1", "train.warmup_steps=1", "train.hold_steps=0",
    "train.monitor_every_n_steps=1", "train.keep_checkpoints=1", "train.verbose=0",
    "decode.beam_width=2",
]


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


def env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", **extra}


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "keras_moe.pipelines.cli", *args], capture_output=True,
        text=True, env=env(), timeout=TIMEOUT,
    )


@pytest.fixture
def lm_data(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 200, 0)
    valid = write_corpus(tmp_path / "valid.txt", 30, 1)
    return sets([f"data.train={train}", f"data.valid={valid}", *LM_TINY]), valid


@pytest.fixture
def cli_in_process(monkeypatch):
    monkeypatch.setenv("KERAS_MOE_NO_REEXEC", "1")
    return cli.main


def experts_w_in(model, layer):
    return tuple(model.get_layer(layer).experts.w_in.shape)


# The expert-parallel case runs in `make test`; the data-parallel one (about 11 s) is slow.
@pytest.mark.parametrize("expert_parallel", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["expert", "data"])
def test_lm_mirrored_expert_parallel_end_to_end(
    tmp_path, lm_data, cli_in_process, capsys, expert_parallel
):
    data_sets, valid = lm_data
    run_dir = tmp_path / "run"
    flags = ["--expert-parallel"] if expert_parallel else []
    done = run_cli("lm", "train", "--strategy", "mirrored", *flags,
                   "--cpu-devices", "2", *data_sets, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["strategy"], results["replicas"], results["steps"]) == ("mirrored", 2, 2)
    # Validation ran (on the one-device copy, if expert parallel) after each
    # of the 2 evaluations.
    assert len(results["history"]["val_perplexity"]) == 2
    flag = "true" if expert_parallel else "false"
    assert f"expert_parallel: {flag}" in (run_dir / "config.yaml").read_text()
    # Outside any strategy the saved model is one-device, with all 4 experts.
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    assert model.get_config()["expert_parallel"] is expert_parallel
    assert experts_w_in(model, "moe") == (4, 16, 8)
    capsys.readouterr()
    assert cli_in_process(["lm", "evaluate", "--run-dir", str(run_dir), "--data", valid]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert math.isfinite(evaluated["perplexity"]) and evaluated["perplexity"] > 1
    np.testing.assert_allclose(evaluated["perplexity"], results["valid"]["perplexity"], rtol=1e-4)


@pytest.mark.slow  # 35-55 s here: tracing a 2-replica seq2seq step, then decoding
def test_translate_mirrored_expert_parallel_end_to_end(tmp_path):
    corpus = {split: write_pairs(tmp_path, split, count, seed)
              for split, count, seed in (("train", 200, 0), ("valid", 4, 1))}
    data_sets = sets([
        f"data.{split}=[{{source: {corpus[split]['en']}, target: {corpus[split]['de']}}}]"
        for split in corpus
    ] + TRANSLATE_TINY)
    run_dir = tmp_path / "run"
    done = run_cli("translate", "train", "--strategy", "mirrored", "--expert-parallel",
                   "--cpu-devices", "2", *data_sets, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["strategy"], results["replicas"], results["steps"]) == ("mirrored", 2, 1)
    valid = results["valid"]
    assert 0.0 <= valid["bleu"] <= 100.0 and valid["bleu_signature"].startswith("nrefs:1")
    assert math.isfinite(valid["perplexity"]) and valid["perplexity"] > 1
    assert valid["sentences"] == 4 and valid["beam_width"] == 2
    assert len((run_dir / "translations" / "valid.hyp").read_text().splitlines()) == 4
    assert set(results["history"]) >= {"val_bleu", "val_perplexity"}
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    assert experts_w_in(model, "encoder_moe") == experts_w_in(model, "decoder_moe") == (4, 16, 8)


def test_lm_multi_worker_two_processes(tmp_path, lm_data):
    data_sets, _ = lm_data
    run_dir = tmp_path / "run"
    ports = free_ports(2)
    command = [sys.executable, "-m", "keras_moe.pipelines.cli", "lm", "train", "--strategy",
               "multi_worker", *data_sets, "--set", "train.steps=3", "--set",
               "train.steps_per_eval=2", "--run-dir", str(run_dir)]
    processes, logs = [], [tmp_path / f"worker-{i}.log" for i in range(2)]
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                processes.append(subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT,
                    env=env(TF_CONFIG=tf_config(ports, i)),
                ))
        deadline = time.monotonic() + TIMEOUT
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        kill(processes)
    tails = [log.read_text()[-3000:] for log in logs]
    assert [p.returncode for p in processes] == [0, 0], tails
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["strategy"], results["replicas"], results["steps"]) == ("multi_worker", 2, 3)
    assert results["history"]["step"] == [1, 2, 3]
    assert all(math.isfinite(x) for x in results["history"]["loss"])
    assert math.isfinite(results["valid"]["perplexity"])
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    assert experts_w_in(model, "moe") == (4, 16, 8)
    # The chief's loss curve and checkpoints; the other worker left nothing behind.
    assert list((run_dir / "tensorboard" / "train").iterdir())
    checkpoints = run_dir / "checkpoints" / "multi_worker"
    assert (checkpoints / "checkpoint").exists()
    assert not [p for p in run_dir.rglob("workertemp_*")]
    assert '"chief": false' in tails[1] and '"task": 1' in tails[1]


def test_expert_parallel_needs_experts_divisible_by_replicas(tmp_path, lm_data):
    data_sets, _ = lm_data
    done = run_cli("lm", "train", "--strategy", "mirrored", "--expert-parallel",
                   "--cpu-devices", "2", *data_sets, "--set", "model.num_experts=3",
                   "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "keras-moe lm train: error:" in done.stderr
    assert "num_experts=3" in done.stderr and "replica count 2" in done.stderr


def test_expert_parallel_needs_mirrored(tmp_path, lm_data, cli_in_process, capsys):
    data_sets, _ = lm_data
    code = cli_in_process(["lm", "train", "--strategy", "default", "--expert-parallel",
                           *data_sets, "--run-dir", str(tmp_path / "run")])
    assert code == 2
    error = capsys.readouterr().err
    assert "--expert-parallel" in error and "strategy='default'" in error
    assert not (tmp_path / "run").exists()


def test_strategy_key_is_validated(tmp_path, cli_in_process, capsys):
    code = cli_in_process(["translate", "train", "--set", "train.strategy=gpus",
                           "--run-dir", str(tmp_path / "run")])
    assert code == 2
    error = capsys.readouterr().err
    assert "strategy" in error and "'gpus'" in error and "'multi_worker'" in error


def test_unknown_strategy_flag_is_an_argparse_error(tmp_path, cli_in_process, capsys):
    with pytest.raises(SystemExit) as raised:
        cli_in_process(["lm", "train", "--strategy", "gpus", "--run-dir", str(tmp_path)])
    assert raised.value.code == 2
    assert "invalid choice: 'gpus'" in capsys.readouterr().err


def test_tpu_without_a_tpu_fails_fast(tmp_path, lm_data, cli_in_process, capsys):
    data_sets, _ = lm_data
    start = time.monotonic()
    code = cli_in_process(["lm", "train", "--strategy", "tpu", *data_sets,
                           "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "keras-moe lm train: error: no TPU found" in capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "run").exists()


def test_tpu_needs_a_capacity_factor():
    model = LanguageModel(20, model_dim=8, num_experts=4, expert_hidden_dim=4, k=2)
    with pytest.raises(ValueError, match=r"capacity_factor=None.*model\.capacity_factor"):
        distribution.check_model(model, "tpu")
    distribution.check_model(model, "mirrored")  # dropless is fine elsewhere
    capped = LanguageModel(20, model_dim=8, num_experts=4, expert_hidden_dim=4, k=2,
                           capacity_factor=1.25)
    distribution.check_model(capped, "tpu")
