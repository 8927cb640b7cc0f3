"""End-to-end tests of `keras-moe lm demo` (keras_moe.pipelines.lm.demo and .cli).

The demo trains a tiny MoE-LSTM for one epoch on a few hundred simple English
sentences written by the test (once, through the `keras-moe lm demo` command line,
which builds a `DemoConfig` and calls `run_demo`), then the tests read back
everything the run directory holds: results.json, vocab.json, model.keras and the TensorBoard
event files (with TensorBoard's own reader). Expected token counts are worked
out from the text with `str.split`, not with the pipeline's own code.
"""

import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import keras
import numpy as np
import pytest
from numpy.testing import assert_allclose

from keras_moe.pipelines.data import corpora
from keras_moe.pipelines.data.vocabulary import WordVocabulary
from keras_moe.pipelines.lm.demo import DemoConfig, choose_tokenizer, expert_load_table, run_demo
from keras_moe.pipelines.lm.inputs import stream_arrays
from tests.conftest import REPO_ROOT, require_shared_data

TINY = dict(
    epochs=1, model_dim=16, num_experts=4, expert_hidden_dim=8, k=2,
    vocab_size=200, seq_len=8, batch_size=8, max_train_tokens=2000,
)


def english_text(n_lines=300, seed=0):
    """Simple, real-looking English sentences, tokens separated by spaces."""
    rng = random.Random(seed)
    subjects = ["the cat", "the dog", "a small bird", "my sister", "the old man", "our teacher",
                "the children", "a farmer", "the doctor", "her friend"]
    verbs = ["saw", "liked", "found", "painted", "carried", "wanted", "visited", "heard"]
    objects = ["the red ball", "a green house", "the river", "an apple", "the new car",
               "a long letter", "the garden", "some bread", "the blue door", "a quiet song"]
    tails = ["", " yesterday", " in the morning", " after dinner", " near the park", " again"]
    lines = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)} ."
        for _ in range(n_lines)
    ]
    return "\n".join(lines) + "\n"


def start_cli(args):
    """`python -m keras_moe.pipelines.cli ARGS` in a subprocess (not waited for)."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_MOE_NO_REEXEC"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.Popen(
        [sys.executable, "-m", "keras_moe.pipelines.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
    )


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "sentences.txt"
    path.write_text(english_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cli_runs(text_file, tmp_path_factory):
    """The demo, run once through the command line, and a run with a missing file.

    The training run is `keras-moe lm demo --data FILE --run-dir DIR` with the
    tiny sizes of TINY as flags; the CLI turns them into a `DemoConfig` and
    calls `run_demo`, so the run directory it leaves is `run_demo`'s end to
    end. Both processes start at once: most of their time is TensorFlow's
    import and tracing, and overlapping them keeps this file fast.
    """
    base = tmp_path_factory.mktemp("cli")
    run_dir, missing = base / "demo", base / "missing.txt"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    ok = start_cli(["lm", "demo", "--data", str(text_file), "--run-dir", str(run_dir), *flags])
    bad = start_cli(["lm", "demo", "--data", str(missing), "--run-dir", str(base / "bad_run")])
    runs = {"ok": ok, "run_dir": run_dir, "bad": bad, "missing": missing,
            "bad_dir": base / "bad_run"}
    runs["ok_output"] = finish(ok)
    yield runs
    for proc in (ok, bad):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def demo_run(text_file, cli_runs):
    returncode, _, stderr = cli_runs["ok_output"]
    if returncode != 0:
        pytest.fail(f"keras-moe lm demo exited with {returncode}:\n{stderr[-3000:]}")
    run_dir = cli_runs["run_dir"]
    config = DemoConfig(data=str(text_file), run_dir=str(run_dir), **TINY)
    results = json.loads((run_dir / "results.json").read_text())
    return config, run_dir, results


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_run_directory_contents(demo_run):
    config, run_dir, results = demo_run
    for name in ("results.json", "vocab.json", "model.keras"):
        assert (run_dir / name).is_file(), name
    # Every flag reached the configuration (and nothing else changed).
    assert results["config"] == dataclasses.asdict(config)
    for split in ("valid", "test"):
        assert {"perplexity", "loss", "tokens", "words"} <= set(results[split])
        assert math.exp(results[split]["loss"]) == pytest.approx(results[split]["perplexity"])
    history = results["train_history"]
    assert len(history["loss"]) == 1 and math.isfinite(history["loss"][0])


def test_vocabulary_matches_the_text(demo_run, text_file):
    _, run_dir, _ = demo_run
    words = json.loads((run_dir / "vocab.json").read_text(encoding="utf-8"))
    assert words[:3] == ["<pad>", "<unk>", "<eos>"]
    # The text has fewer distinct words than vocab_size=200, so the vocabulary
    # is exactly the training lines' words, each once.
    train, _, _ = corpora.split_deterministic(corpora.read_lines(str(text_file)))
    train_words = {w for line in train for w in line.split()}
    assert len(words) == len(set(words)) == 3 + len(train_words)
    assert set(words[3:]) == train_words


def test_perplexity_is_finite_and_below_vocabulary_size(demo_run, text_file):
    _, run_dir, results = demo_run
    vocab_size = len(json.loads((run_dir / "vocab.json").read_text(encoding="utf-8")))
    for split in ("valid", "test"):
        ppl = results[split]["perplexity"]
        assert math.isfinite(ppl)
        # A model that learned nothing predicts uniformly: perplexity = vocab size.
        assert 1.0 < ppl < vocab_size
    # Counted independently: the held-out lines' words plus one <eos> each,
    # minus the first token of the stream, which is never predicted.
    _, valid, test = corpora.split_deterministic(corpora.read_lines(str(text_file)))
    for split, lines in (("valid", valid), ("test", test)):
        expected = sum(len(line.split()) + 1 for line in lines) - 1
        assert results[split]["tokens"] == expected
        assert results[split]["words"] == expected


def test_expert_shares_and_load_statistics(demo_run):
    config, _, results = demo_run
    share = np.array(results["expert_token_share"])
    assert share.shape == (config.num_experts,)
    assert (share >= 0).all()
    assert share.sum() == pytest.approx(1.0, abs=config.num_experts * 5e-5 + 1e-9)
    # CV and max/mean of the counts are those of the shares (same scale).
    assert results["cv_load"] == pytest.approx(share.std() / share.mean(), abs=1e-2)
    assert results["max_mean_load"] == pytest.approx(share.max() / share.mean(), abs=1e-2)
    assert results["unused_experts"] == int((share == 0).sum())


def test_saved_model_reproduces_the_reported_results(demo_run, text_file):
    config, run_dir, results = demo_run
    model = keras.saving.load_model(run_dir / "model.keras")
    vocab = WordVocabulary.load(str(run_dir / "vocab.json"))
    _, valid, test = corpora.split_deterministic(corpora.read_lines(str(text_file)))

    def windows(lines):
        return stream_arrays([vocab.encode(line.split()) for line in lines], config.seq_len)

    # Validation perplexity recomputed with a NumPy log-softmax.
    x, y, w = windows(valid)
    logp = np_log_softmax(model(x, training=False))
    nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    ppl = math.exp(float((nll * w).sum() / w.sum()))
    assert ppl == pytest.approx(results["valid"]["perplexity"], rel=1e-4)

    # Every non-padding test position is routed to exactly k experts.
    x, _, w = windows(test)
    counts = expert_load_table(model, x)
    assert counts.sum() == config.k * int((x != 0).sum())
    assert_allclose(counts / counts.sum(), results["expert_token_share"], atol=1e-4)


def read_event_scalars(log_dir):
    """{tag: [values]} of a TensorBoard run folder, read with TensorBoard's reader."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        str(log_dir),
        size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0},
    )
    acc.Reload()
    values = {}
    for tag in acc.Tags()["scalars"]:
        values[tag] = [e.value for e in acc.Scalars(tag)]
    for tag in acc.Tags()["tensors"]:
        arrays = [tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)]
        if all(a.shape == () and a.dtype.kind == "f" for a in arrays):
            values[tag] = [float(a) for a in arrays]
    return values


def test_tensorboard_event_files_hold_loss_and_routing_metrics(demo_run):
    _, run_dir, results = demo_run
    log_dir = run_dir / "tensorboard"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir / "train"))
    train = read_event_scalars(log_dir / "train")
    valid = read_event_scalars(log_dir / "validation")
    history = results["train_history"]
    for values, prefix in ((train, ""), (valid, "val_")):
        for metric in ("loss", "moe_cv_load", "moe_cv_importance"):
            tag = f"epoch_{metric}"
            assert tag in values, sorted(values)
            assert len(values[tag]) == 1  # one epoch
            assert math.isfinite(values[tag][0])
            assert values[tag][0] == pytest.approx(history[prefix + metric][0], rel=1e-5)


def test_too_small_corpus_gives_an_error_naming_the_file(tmp_path):
    # Three lines: the 5 % validation and test splits come out empty (or
    # nearly), which must be reported against the user's file, not as an
    # anonymous "fewer than two tokens".
    path = tmp_path / "tiny.txt"
    path.write_text("the cat sat on the mat .\nthe dog ran .\na bird sang .\n", encoding="utf-8")
    config = DemoConfig(data=str(path), run_dir=str(tmp_path / "run"), **TINY)
    with pytest.raises(ValueError) as info:
        run_demo(config)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------
# The command line (the training run is the `cli_runs` fixture).


def test_cli_demo_output(demo_run, cli_runs):
    returncode, stdout, _ = cli_runs["ok_output"]
    assert returncode == 0
    assert "validation perplexity" in stdout
    _, _, results = demo_run
    assert f"validation perplexity {results['valid']['perplexity']:.1f}" in stdout


def test_cli_missing_data_file_fails_naming_the_path(cli_runs):
    returncode, _, stderr = finish(cli_runs["bad"])
    assert returncode != 0
    assert str(cli_runs["missing"]) in stderr
    assert not (cli_runs["bad_dir"] / "results.json").exists()


# ---------------------------------------------------------------------------
# The real Penn Treebank validation file (counts from ../shared/data/README.md).

PTB_LINES, PTB_WORDS = 3370, 70390


def test_ptb_valid_counts():
    path = str(require_shared_data("ptb", "ptb.valid.txt"))
    lines = corpora.read_lines(path)
    assert len(lines) == PTB_LINES
    assert sum(len(line.split()) for line in lines) == PTB_WORDS
    vocab = WordVocabulary.build([line.split() for line in lines])
    ids = [vocab.encode(line.split()) for line in lines]
    assert sum(len(i) for i in ids) == PTB_WORDS + PTB_LINES == 73760
    _, _, weights = stream_arrays(ids, 35)
    assert weights.sum() == 73760 - 1


def test_ptb_tokens_are_kept_whole_by_the_demo_tokenizer():
    # PTB is already tokenized ("'s", "mr.", "u.s." are single tokens); the
    # demo's default tokenizer for --data files splits on whitespace only.
    # Splitting them would change the token count and make perplexities
    # incomparable with the PTB literature.
    path = str(require_shared_data("ptb", "ptb.valid.txt"))
    lines = corpora.read_lines(path)
    tokenize = choose_tokenizer(DemoConfig(data=path))
    assert sum(len(tokenize(line)) for line in lines) == PTB_WORDS
    # The raw-text tokenizer would split them: the demo must not use it here.
    assert sum(len(corpora.tokenize(line)) for line in lines) != PTB_WORDS


def test_unknown_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="tokenizer='spaces'"):
        choose_tokenizer(DemoConfig(tokenizer="spaces"))
