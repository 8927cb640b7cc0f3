"""End-to-end tests of `keras-moe lm train` / `lm evaluate` on small files written here."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

from keras_moe.pipelines.config import ConfigError, load_config
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig

WORDS = "the cat sat on a mat while dogs ran to the big red barn and slept".split()


def write_corpus(path, lines=200, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            n = int(rng.integers(3, 12))
            f.write(" ".join(rng.choice(WORDS, n)) + "\n")
    return str(path)


TINY = [
    "model.preset=cpu-moe-32", "model.model_dim=16", "model.num_experts=4",
    "model.expert_hidden_dim=8", "model.k=2", "data.seq_len=8", "data.batch_size=4",
    "data.vocab_size=40", "train.steps=2", "train.steps_per_eval=1", "train.warmup_steps=1",
    "train.monitor_every_n_steps=1", "train.verbose=0",
]


@pytest.fixture
def corpus(tmp_path):
    return {
        "train": write_corpus(tmp_path / "train.txt", 200, 0),
        "valid": write_corpus(tmp_path / "valid.txt", 30, 1),
    }


def tiny_config(corpus, *extra):
    return load_config(
        LMConfig, None,
        [f"data.train={corpus['train']}", f"data.valid={corpus['valid']}", *TINY, *extra],
    )


def run_cli(*args, cwd=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "keras_moe.pipelines.cli", *args], capture_output=True,
        text=True, env=env, cwd=cwd, timeout=300,
    )


def test_cli_two_step_run_then_evaluate(tmp_path, corpus):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        yaml.safe_dump({"data": {"train": corpus["train"], "valid": corpus["valid"]}})
    )
    run_dir = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    done = run_cli("lm", "train", "--config", str(config_file), *sets, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    # The LSTMs' bool mask is transposed by Keras's RNN: oneDNN's notice
    # about it is filtered out (pipelines/command.py, NATIVE_NOISE).
    assert "DT_BOOL" not in done.stderr and "E0000" not in done.stderr, done.stderr[-3000:]
    for name in ("config.yaml", "vocab.json", "model.keras", "results.json", "history.csv",
                 "checkpoints/last.keras", "checkpoints/best.keras"):
        assert (run_dir / name).exists(), name
    saved = load_config(LMConfig, run_dir / "config.yaml")
    assert saved.train.steps == 2 and saved.model.num_experts == 4
    assert saved.data.train == corpus["train"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2
    # Every word plus one <eos> per line of the validation file.
    lines = open(corpus["valid"]).read().split("\n")
    words = sum(len(line.split()) + 1 for line in lines if line.strip())
    assert results["valid"]["words"] == words == results["valid"]["tokens"]
    # Two steps from a uniform start: perplexity near the vocabulary size.
    assert 5 < results["valid"]["perplexity"] < 60
    assert len(results["history"]["val_perplexity"]) == 2
    assert any(name.startswith("moe_") for name in results["history"])
    assert set(results["routing_valid"]) == {"moe"}
    assert results["costs"]["ops_per_timestep"] > 0

    done = run_cli("lm", "evaluate", "--run-dir", str(run_dir), "--data", corpus["valid"])
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads(done.stdout)
    for key in ("perplexity", "tokens", "words", "loss"):
        assert key in evaluated
    assert evaluated["perplexity"] == pytest.approx(results["valid"]["perplexity"], rel=1e-5)
    assert evaluated["loss"] == pytest.approx(math.log(evaluated["perplexity"]), rel=1e-9)
    assert "per word" in evaluated["convention"]
    shares = evaluated["routing"]["moe"].pop("set_load_share")
    assert shares == pytest.approx(results["routing_valid"]["moe"].pop("set_load_share"))
    assert sum(shares) == pytest.approx(1.0)
    assert evaluated["routing"]["moe"] == pytest.approx(results["routing_valid"]["moe"])


def test_tensorboard_has_loss_perplexity_learning_rate_and_routing(tmp_path, corpus):
    from tensorboard.backend.event_processing import event_accumulator

    run_dir = tmp_path / "run"
    lm_train.train(tiny_config(corpus), str(run_dir))
    tags = set()
    for root, _, files in os.walk(run_dir / "tensorboard"):
        if any(f.startswith("events.out") for f in files):
            acc = event_accumulator.EventAccumulator(root, size_guidance={"tensors": 0})
            acc.Reload()
            tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    for tag in ("epoch_loss", "epoch_perplexity", "epoch_learning_rate"):
        assert tag in tags, sorted(tags)
    assert any("val_perplexity" in tag or tag == "epoch_perplexity" for tag in tags)
    assert any(tag.startswith("moe") and "max_mean" in tag for tag in tags), sorted(tags)


def test_rerun_resumes_and_different_config_is_refused(tmp_path, corpus):
    run_dir = tmp_path / "run"
    config = tiny_config(corpus, "train.time_limit_minutes=0.0001")
    first = lm_train.train(config, str(run_dir))
    assert first["steps"] == 1  # the wall-clock limit stopped it after one step
    os.remove(run_dir / "model.keras")  # as if the process had been killed before the end
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "vocab.json")}

    changed = tiny_config(corpus, "train.time_limit_minutes=0.0001", "model.dropout=0.5")
    with pytest.raises(ValueError, match="different configuration"):
        lm_train.train(changed, str(run_dir))
    assert {p: (run_dir / p).read_bytes() for p in before} == before

    resumed = lm_train.train(tiny_config(corpus), str(run_dir))
    assert resumed["resumed"] is True
    assert resumed["steps"] == 2


def test_a_finished_run_goes_on_to_a_larger_train_steps(tmp_path, corpus):
    import csv

    run_dir = tmp_path / "run"
    first = lm_train.train(tiny_config(corpus), str(run_dir))
    assert first["steps"] == 2
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "results.json", "model.keras")}
    # Refused, and nothing touched: the same steps again, fewer, or another change.
    for extra in ([], ["train.steps=1"], ["train.steps=4", "model.dropout=0.5"]):
        with pytest.raises(ValueError, match="finished run.*train.steps=2"):
            lm_train.train(tiny_config(corpus, *extra), str(run_dir))
        assert {p: (run_dir / p).read_bytes() for p in before} == before
    assert not (run_dir / "backup").exists()

    more = lm_train.train(tiny_config(corpus, "train.steps=4"), str(run_dir))
    # The optimizer's step count went on from the finished run's: its state
    # (and the weights saved with it) was restored, not rebuilt.
    assert more["resumed"] is True and more["steps"] == 4
    assert (run_dir / "model-step-2.keras").read_bytes() == before["model.keras"]
    assert (run_dir / "results-step-2.json").read_bytes() == before["results.json"]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4
    assert "steps: 4" in (run_dir / "config.yaml").read_text()
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    # The training time counts on from the finished run's (runs_test.py has the arithmetic).
    minutes = [float(row["elapsed_minutes"]) for row in rows]
    assert minutes == sorted(minutes) and minutes[0] > 0
    assert json.loads((run_dir / "elapsed.json").read_text()).keys() == {"1", "2", "3", "4"}
    assert more["elapsed_minutes"] >= round(minutes[-1], 2)


def test_a_run_its_time_limit_stopped_goes_on_with_a_larger_limit(tmp_path, corpus):
    import csv

    run_dir = tmp_path / "run"
    # 4 steps in rounds of 2; the limit stops the run after its first step,
    # inside the first round, and the run finishes there (model.keras).
    timed = ("train.steps=4", "train.steps_per_eval=2")
    first = lm_train.train(tiny_config(corpus, *timed, "train.time_limit_minutes=0.0001"),
                           str(run_dir))
    assert first["steps"] == 1
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "results.json", "model.keras")}
    # The same limit would stop it again at once: refused, nothing touched.
    with pytest.raises(ValueError, match="time_limit_minutes=0.0001 is spent"):
        lm_train.train(tiny_config(corpus, *timed, "train.time_limit_minutes=0.0001"),
                       str(run_dir))
    assert {p: (run_dir / p).read_bytes() for p in before} == before

    more = lm_train.train(tiny_config(corpus, *timed, "train.time_limit_minutes=60"),
                          str(run_dir))
    # On from step 1 with its Adam state, to exactly train.steps: evaluated
    # 2 steps on (step 3), then cut at step 4 instead of running on to 5.
    assert more["resumed"] is True and more["steps"] == 4
    assert (run_dir / "model-step-1.keras").read_bytes() == before["model.keras"]
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(row["epoch"]), int(row["step"])) for row in rows] == [(0, 1), (0, 3), (1, 4)]
    assert json.loads((run_dir / "elapsed.json").read_text()).keys() == {"1", "3", "4"}
    # Finished at train.steps, it is refused again with the same settings.
    with pytest.raises(ValueError, match="finished run.*train.steps=4"):
        lm_train.train(tiny_config(corpus, *timed, "train.time_limit_minutes=60"),
                       str(run_dir))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train={missing}", "missing.txt"),
        ("data.valid={empty}", "empty.txt"),
        ("data.train={binary}", "binary.txt:2"),
        ("model.preset=moe-3", "moe-3"),
    ],
)
def test_bad_input_names_the_culprit_and_writes_nothing(tmp_path, corpus, override, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"good line\nbad \xff\xfe line\n")
    value = override.format(missing=tmp_path / "missing.txt", empty=empty, binary=binary)
    run_dir = tmp_path / "run"
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        lm_train.train(tiny_config(corpus, value), str(run_dir))
    assert not run_dir.exists()


def test_cli_reports_errors_with_exit_code_2(tmp_path, corpus):
    done = run_cli("lm", "train", "--set", "modle.k=2", "--run-dir", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "modle" in done.stderr
    done = run_cli("lm", "evaluate", "--run-dir", str(tmp_path / "nothing"), "--data", "x.txt")
    assert done.returncode == 2 and "config.yaml" in done.stderr


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train\.stepz"):
        load_config(LMConfig, bad)


# Slow (about 15 s: it trains a run to swap its vocabulary).
@pytest.mark.slow
def test_vocabulary_that_does_not_match_the_model_is_refused(tmp_path, corpus):
    run_dir = tmp_path / "run"
    lm_train.train(tiny_config(corpus), str(run_dir))
    vocab = json.loads((run_dir / "vocab.json").read_text())
    (run_dir / "vocab.json").write_text(json.dumps(vocab[:-1]))
    with pytest.raises(ValueError, match="vocabulary"):
        lm_train.evaluate(str(run_dir), corpus["valid"])
    assert (run_dir / "model.keras").exists()


def test_finished_model_reloads_without_custom_objects_in_a_new_process(tmp_path, corpus):
    run_dir = tmp_path / "run"
    lm_train.train(tiny_config(corpus), str(run_dir))
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    tokens = np.array([[3, 4, 5, 6]], np.int32)
    expected = np.asarray(model(tokens, training=False))
    np.save(tmp_path / "tokens.npy", tokens)
    code = (
        "import numpy as np, keras, keras_moe.models; "
        f"m = keras.saving.load_model({str(run_dir / 'model.keras')!r}); "
        f"np.save({str(tmp_path / 'out.npy')!r}, np.asarray(m(np.load("
        f"{str(tmp_path / 'tokens.npy')!r}), training=False)))"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_routing_report_on_a_router_that_sends_everything_to_two_experts(corpus):
    from keras_moe.models.lm import LanguageModel
    from keras_moe.pipelines.data.vocabulary import WordVocabulary
    from keras_moe.pipelines.lm.train import lines_factory, routing_report

    config = tiny_config(corpus)
    vocab = WordVocabulary.build([WORDS], 40)
    model = LanguageModel(len(vocab), model_dim=16, num_experts=4, expert_hidden_dim=8, k=2)
    # The gate starts at zero: every logit ties, top-k keeps experts 0 and 1,
    # each with gate 1/2. So over N positions: Load = [N, N, 0, 0] and
    # Importance = [N/2, N/2, 0, 0]; CV = std / mean = 0.5 / 0.5 = 1 for both,
    # max / mean Load = N / (N/2) = 2, and two experts get nothing.
    report = routing_report(model, lines_factory(config.data, "valid"), vocab, config.data)
    (name,) = report
    stats = report[name]
    assert stats["set_cv_load"] == pytest.approx(1.0)
    assert stats["set_cv_importance"] == pytest.approx(1.0)
    assert stats["set_max_mean_load"] == pytest.approx(2.0)
    assert stats["batch_max_mean_load"] == pytest.approx(2.0)
    assert stats["zero_experts"] == 2
    # Balanced by hand: gate weights that make each expert win on a quarter
    # of the inputs would give CV 0; here a random gate must at least leave
    # no expert unused on this corpus and lower the imbalance.
    gating = model.get_layer("moe").gating
    gating.w_gate.assign(np.random.default_rng(0).normal(size=gating.w_gate.shape) * 3.0)
    spread = routing_report(model, lines_factory(config.data, "valid"), vocab, config.data)[name]
    assert spread["set_max_mean_load"] < 2.0
    # Independently: counts from the chosen expert ids, importance from the gates.
    from keras_moe.pipelines.lm.inputs import evaluation_batches

    counts, importance = np.zeros(4), np.zeros(4)
    for inputs, _, _ in evaluation_batches(lines_factory(config.data, "valid")(), vocab,
                                           config.data):
        _, routings = model(inputs, training=False, return_routing=True)
        ids = np.asarray(routings[name].expert_indices).reshape(-1)
        gates = np.asarray(routings[name].gates).reshape(-1)
        real = ids >= 0
        counts += np.bincount(ids[real], minlength=4)
        np.add.at(importance, ids[real], gates[real])
    assert spread["set_cv_load"] == pytest.approx(counts.std() / counts.mean(), rel=1e-6)
    assert spread["set_cv_importance"] == pytest.approx(
        importance.std() / importance.mean(), rel=1e-5
    )
    assert spread["set_max_mean_load"] == pytest.approx(counts.max() / counts.mean(), rel=1e-6)
    assert spread["set_load_share"] == pytest.approx(counts / counts.sum(), rel=1e-6)
    assert routing_report(
        LanguageModel(len(vocab), model_dim=16, blocks=("lstm",)),
        lines_factory(config.data, "valid"), vocab, config.data,
    ) == {}


def test_wordpiece_sentences_and_sampled_softmax_run(tmp_path, corpus):
    # Sub-word vocabulary, one sentence per row batched by tokens, and a
    # sampled softmax in training: perplexity is still per word, on the full softmax.
    run_dir = tmp_path / "run"
    results = lm_train.train(
        tiny_config(
            corpus, "data.vocabulary=wordpiece", "data.vocab_size=45", "data.mode=sentences",
            "data.batch_tokens=64", "model.num_sampled=5",
        ),
        str(run_dir),
    )
    assert (run_dir / "wordpiece.txt").exists() and not (run_dir / "vocab.json").exists()
    lines = [line for line in open(corpus["valid"]).read().split("\n") if line.strip()]
    words = sum(len(line.split()) + 1 for line in lines)
    valid = results["valid"]
    assert valid["words"] == words
    # 45 entries hold the characters and only a few whole words: others are
    # split into pieces, so there are more predicted tokens than words, and
    # the loss is still divided by the words.
    assert valid["tokens"] > words
    assert valid["loss"] == pytest.approx(math.log(valid["perplexity"]))
    assert "perplexity" not in results["history"]  # no full-softmax metric in sampled training
    assert len(results["history"]["val_perplexity"]) == 2


def _start_until_first_backup(tmp_path, corpus, steps):
    """A `lm train` subprocess (evaluation every 10 steps), once its first evaluation is backed up.

    Returns `(process, cmd, env, run_dir)`; the process is still running.
    """
    import time

    run_dir = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    sets += ["--set", f"train.steps={steps}", "--set", "train.steps_per_eval=10"]
    args = [f"data.train={corpus['train']}", f"data.valid={corpus['valid']}"]
    sets += [a for item in args for a in ("--set", item)]
    cmd = [sys.executable, "-m", "keras_moe.pipelines.cli", "lm", "train", *sets,
           "--run-dir", str(run_dir)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    history = run_dir / "history.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if history.exists() and len(history.read_text().strip().splitlines()) >= 2:
            break
        time.sleep(0.2)
    if process.poll() is not None:
        pytest.fail("the run finished or failed before it could be stopped")
    return process, cmd, env, run_dir


def test_a_killed_run_resumes_where_it_stopped(tmp_path, corpus):
    import csv
    import signal
    import time

    process, cmd, env, run_dir = _start_until_first_backup(tmp_path, corpus, steps=40)
    history = run_dir / "history.csv"
    try:
        # Kill it (no clean shutdown) now that the first evaluation is backed up.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = time.time()
    assert not (run_dir / "model.keras").exists()
    # How many evaluation rounds (10 steps each) the backup holds: at least
    # the first; more if the run got further before the kill landed.
    backed_up = json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"]
    assert 1 <= backed_up < 4, backed_up
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed"] is True and results["steps"] == 40
    with open(history) as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    # Every evaluation once: the resumed run went on after what was backed up
    # instead of starting again at epoch 0.
    assert sorted(epochs) == sorted(set(epochs)) and epochs[-1] == 3, epochs
    # TensorBoard, read back with its own reader: the resumed sitting drew
    # its batch losses from the step after the backup to 40 (11-40 when it
    # resumed from the step-10 backup), not again from step 1 over the first
    # sitting's curve.
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard" / "train"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    resumed = [e.step for e in acc.Tensors("batch_loss") if e.wall_time > killed_at]
    assert resumed == list(range(10 * backed_up + 1, 41)), (backed_up, resumed)


def test_ctrl_c_ends_a_run_with_one_line_and_keeps_its_backup(tmp_path, corpus):
    import signal

    process, _, _, run_dir = _start_until_first_backup(tmp_path, corpus, steps=100000)
    try:
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("keras-moe lm train: interrupted; the same command resumes"), last
    assert str(run_dir) in last and "Traceback" not in stderr
    # Nothing a resume needs was lost or half-written: the backup of an
    # evaluation is there and no final model claims the run finished.
    backed_up = json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"]
    assert backed_up >= 1 and not (run_dir / "model.keras").exists()
