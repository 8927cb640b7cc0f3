"""`train.max_tokens` (one pass, never repeated), tokens seen as the x-axis, and the
fixed validation slice `data.valid_max_words`, on small files written here.

Every expected count is worked out from the corpus by hand: with a word
vocabulary each word is one token, so the training stream of a pass is
`1 + sum(words + 1)` tokens (an `<eos>` in front, one after every line).
"""

import csv
import gzip
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_moe.pipelines.compare import compare, markdown
from keras_moe.pipelines.config import ConfigError, load_config
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig
from keras_moe.pipelines.training.budget import TokenBudget

WORDS = "the cat sat on a mat while dogs ran to the big red barn and slept".split()
SEQ_LEN, BATCH = 8, 4
TOKENS_PER_STEP = SEQ_LEN * BATCH
SEED = 1  # train.seed's default: the offset of pass 0 comes from it

TINY = [
    "model.preset=cpu-moe-32", "model.model_dim=16", "model.num_experts=4",
    "model.expert_hidden_dim=8", "model.k=2", f"data.seq_len={SEQ_LEN}",
    f"data.batch_size={BATCH}", "data.vocab_size=40", "train.warmup_steps=1",
    "train.monitor_every_n_steps=100", "train.verbose=0",
]


def write_lines(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def random_lines(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    train, valid = random_lines(60, 0), random_lines(30, 1)
    return {
        "train": write_lines(tmp_path / "train.txt", train),
        "valid": write_lines(tmp_path / "valid.txt", valid),
        "train_lines": train, "valid_lines": valid,
    }


def config(corpus, *extra):
    return load_config(
        LMConfig, None,
        [f"data.train={corpus['train']}", f"data.valid={corpus['valid']}", *TINY, *extra],
    )


def one_pass_steps(lines):
    # The stream of one pass, cut into windows after the pass's random offset
    # (`training_dataset`: rng([seed, pass]).integers(seq_len)); the last
    # window and the last batch are kept, partial.
    stream = 1 + sum(len(line.split()) + 1 for line in lines)
    offset = int(np.random.default_rng([SEED, 0]).integers(SEQ_LEN))
    windows = math.ceil((stream - offset - 1) / SEQ_LEN)
    return math.ceil(windows / BATCH)


def history(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_budget_stops_at_its_tokens_and_logs_them(tmp_path, corpus):
    from tensorboard.backend.event_processing import event_accumulator

    run_dir = tmp_path / "run"
    # 200 tokens at 32 a step: ceil(200 / 32) = 7 steps, well inside one pass.
    assert one_pass_steps(corpus["train_lines"]) > 7
    results = lm_train.train(
        config(corpus, "train.max_tokens=200", "train.steps=10", "train.steps_per_eval=3"),
        str(run_dir),
    )
    assert results["steps"] == 7
    rows = history(run_dir)
    assert [int(r["step"]) for r in rows] == [3, 6, 7]
    assert [int(float(r["tokens"])) for r in rows] == [96, 192, 224]
    acc = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard" / "by_tokens"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    events = acc.Tensors("tokens/val_perplexity")
    assert [e.step for e in events] == [96, 192, 224]
    logged = [float(r["val_perplexity"]) for r in rows]
    assert [float(tf.make_ndarray(e.tensor_proto)) for e in events] == pytest.approx(logged)
    # `keras-moe compare` shows the tokens next to the step.
    comparison = compare([f"budget={run_dir}"])
    curve = comparison["curves"]["val_perplexity"]
    assert [(r["step"], r["tokens"]) for r in curve] == [(3, 96), (6, 192), (7, 224)]
    assert "| step | tokens | budget |" in markdown(comparison)
    assert "| 6 | 192 | " in markdown(comparison)
    # Out of domain: `lm evaluate` on a gzip file of paragraphs, one per line,
    # as ../shared/data/wikipedia_extract/valid.txt.gz is.
    other = random_lines(7, 5)
    evaluated = lm_train.evaluate(str(run_dir), write_lines(tmp_path / "valid.txt.gz", other))
    assert evaluated["words"] == sum(len(line.split()) + 1 for line in other)
    assert math.isfinite(evaluated["perplexity"])


def test_one_pass_is_never_repeated(tmp_path, corpus, monkeypatch):
    # A budget larger than the data: the run trains on each batch of one
    # pass once, then stops (a repeating dataset would go on to train.steps).
    opened = []
    iter_lines = lm_train.lm_corpora.iter_lines

    def counting(spec, *args, **kwargs):
        if spec == corpus["train"]:
            opened.append(spec)
        return iter_lines(spec, *args, **kwargs)

    monkeypatch.setattr(lm_train.lm_corpora, "iter_lines", counting)
    run_dir = tmp_path / "run"
    steps = one_pass_steps(corpus["train_lines"])
    results = lm_train.train(
        config(corpus, "train.max_tokens=100000", "train.steps=3200",
               "train.steps_per_eval=5"),
        str(run_dir),
    )
    assert results["steps"] == steps
    assert int(float(history(run_dir)[-1]["tokens"])) == steps * TOKENS_PER_STEP
    # Read for the vocabulary, for check_inputs' first line, and once for training.
    assert len(opened) == 3, opened


def test_without_a_budget_the_data_repeats(tmp_path, corpus):
    steps = one_pass_steps(corpus["train_lines"]) + 3
    results = lm_train.train(
        config(corpus, f"train.steps={steps}", f"train.steps_per_eval={steps}"),
        str(tmp_path / "run"),
    )
    assert results["steps"] == steps
    assert int(float(history(tmp_path / "run")[-1]["tokens"])) == steps * TOKENS_PER_STEP


def test_a_stopped_budgeted_run_goes_on_without_reading_data_twice(tmp_path, corpus):
    run_dir = tmp_path / "run"
    steps = one_pass_steps(corpus["train_lines"])
    keys = ("train.max_tokens=100000", "train.steps=3200", "train.steps_per_eval=4")
    first = lm_train.train(config(corpus, *keys, "train.time_limit_minutes=0.0001"),
                           str(run_dir))
    assert first["steps"] == 1  # the time limit stopped it after one step
    more = lm_train.train(config(corpus, *keys, "train.time_limit_minutes=60"), str(run_dir))
    # On from step 1 past the batch it took, to the end of the one pass.
    assert more["resumed"] is True and more["steps"] == steps
    rows = history(run_dir)
    assert [int(float(r["tokens"])) for r in rows] == [
        int(r["step"]) * TOKENS_PER_STEP for r in rows
    ]
    assert int(rows[-1]["step"]) == steps


def test_validation_reads_the_fixed_slice_and_results_the_whole_file(tmp_path, corpus):
    valid = corpus["valid_lines"]
    counts = [len(line.split()) for line in valid]
    # The shortest prefix of whole lines with at least 40 words.
    n = next(i + 1 for i in range(len(valid)) if sum(counts[: i + 1]) >= 40)
    assert n < len(valid)
    seen = []

    class Recording(lm_train.ValidationPerplexity):
        def validate(self, model):
            seen.append(list(self.lines_factory()))
            return super().validate(model)

    cfg = config(corpus, "data.valid_max_words=40", "train.steps=2", "train.steps_per_eval=1")
    task = lm_train.LanguageModelTask()
    validation, _, _ = task.validation(cfg, None)
    assert list(validation.lines_factory()) == valid[:n]
    assert list(lm_train.first_words(lambda: iter(valid), 0)()) == valid

    monkeypatched = lm_train.ValidationPerplexity
    lm_train.ValidationPerplexity = Recording
    try:
        results = lm_train.train(cfg, str(tmp_path / "run"))
    finally:
        lm_train.ValidationPerplexity = monkeypatched
    assert seen == [valid[:n], valid[:n]]
    # The final evaluation: every word of the whole file, one <eos> per line.
    assert results["valid"]["words"] == sum(counts) + len(valid)


def test_budget_config_errors_name_the_key(corpus):
    with pytest.raises(ConfigError, match=r"train.steps` must be >= 7.*train.steps=6"):
        config(corpus, "train.max_tokens=200", "train.steps=6")
    with pytest.raises(ConfigError, match="needs `data.mode: stream`"):
        config(corpus, "train.max_tokens=200", "data.mode=sentences")
    with pytest.raises(ConfigError, match="max_tokens` must be > 0"):
        config(corpus, "train.max_tokens=0")
    with pytest.raises(ConfigError, match="valid_max_words` must be >= 0"):
        config(corpus, "data.valid_max_words=-1")


def test_budget_is_language_model_only():
    from keras_moe.pipelines.translate.config import TrainConfig as TranslateTrainConfig

    with pytest.raises(ValueError, match="language models.*max_tokens=5"):
        TranslateTrainConfig(max_tokens=5)


def test_sentences_mode_counts_no_tokens(corpus):
    cfg = config(corpus, "data.mode=sentences")
    assert lm_train.LanguageModelTask().extra_callbacks(cfg, None) == []
    stream = lm_train.LanguageModelTask().extra_callbacks(
        config(corpus, "train.max_tokens=64", "train.steps=2"),
        lm_train.RunDir.wrap(str(corpus["train"]) + "-run"),
    )
    assert len(stream) == 1 and isinstance(stream[0], TokenBudget)
    assert (stream[0].tokens_per_step, stream[0].max_tokens, stream[0].budget_steps) == (32, 64, 2)
