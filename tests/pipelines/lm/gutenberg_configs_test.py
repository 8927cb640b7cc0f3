"""The one-pass Gutenberg experiment's configurations (pipelines/configs/lm/gutenberg-*.yaml).

Issue 26: every model trained on the same data, in the same order, with the
same schedule and batch, matched on ops per timestep, for one pass of 60M
training tokens, evaluated at least at 5M, 15M, 30M and 60M tokens.
"""

import glob
import os

import pytest

from keras_moe.models import presets
from keras_moe.pipelines.config import load_config, to_dict
from keras_moe.pipelines.data import lm_corpora
from keras_moe.pipelines.lm.config import LMConfig, tokens_per_step
from keras_moe.pipelines.training.budget import budget_steps
from tests.conftest import REPO_ROOT, require_shared_data

CONFIGS = sorted(glob.glob(str(REPO_ROOT / "pipelines" / "configs" / "lm" / "gutenberg-*.yaml")))
NAMES = [os.path.basename(path)[: -len(".yaml")] for path in CONFIGS]


def load(name):
    return load_config(LMConfig, REPO_ROOT / "pipelines" / "configs" / "lm" / f"{name}.yaml")


def test_every_model_of_the_experiment_has_its_file():
    assert set(NAMES) == {
        "gutenberg-dense", "gutenberg-moe-16", "gutenberg-moe-64", "gutenberg-moe-256",
        "gutenberg-moe-1024-h", "gutenberg-2xlstm", "gutenberg-moe-256-no-balance",
        "gutenberg-dense-seed-2", "gutenberg-moe-256-seed-2",
    }
    for name in NAMES:
        preset = load(name).model.preset
        assert preset in presets.PRESETS and name.startswith(preset)


def test_same_data_order_schedule_batch_and_budget():
    base = to_dict(load("gutenberg-dense"))
    for name in NAMES:
        config = to_dict(load(name))
        assert config["data"] == base["data"], name
        seed = 2 if name.endswith("seed-2") else 1
        assert config["train"] == {**base["train"], "seed": seed}, name
        model = {k: v for k, v in config["model"].items() if k != "preset"}
        ablation = {"importance_weight": 0.0, "load_weight": 0.0}
        base_model = {k: v for k, v in base["model"].items() if k != "preset"}
        assert model == ({**base_model, **ablation} if "no-balance" in name else base_model)


def test_budget_evaluations_and_validation_slice():
    config = load("gutenberg-dense")
    data, train = config.data, config.train
    per_step = tokens_per_step(data)
    assert train.max_tokens == 60_000_000
    assert train.steps == budget_steps(train.max_tokens, per_step)  # the budget ends the run
    evaluations = {step * per_step for step in range(train.steps_per_eval, train.steps + 1,
                                                     train.steps_per_eval)}
    assert {5_000_000, 15_000_000, 30_000_000, 60_000_000} <= evaluations
    assert data.valid_max_words == 200_000 and train.time_limit_minutes
    assert data.vocab_learner == "tokenizers" and data.interleave_block_lines > 0
    assert data.vocab_order == "frequency"  # the sampled softmax's proposal assumes it
    assert config.model.num_sampled and config.model.num_sampled < data.vocab_size


def test_compute_matched_within_two_percent():
    ops = {name: presets.costs(load(name).model.preset)["ops_per_timestep"]
           for name in NAMES if "2xlstm" not in name}
    assert max(ops.values()) <= 1.02 * min(ops.values()), ops


def test_the_data_files_are_the_shared_corpus():
    require_shared_data("gutenberg", "valid.txt.gz")
    data = load("gutenberg-dense").data
    old = os.getcwd()
    os.chdir(REPO_ROOT)  # the configs name ../shared/data from the repository root
    try:
        train = lm_corpora.resolve_files(data.train)
        valid = lm_corpora.resolve_files(data.valid)
    finally:
        os.chdir(old)
    assert [os.path.basename(p) for p in train] == [f"train-{i:05d}.txt.gz" for i in range(12)]
    assert [os.path.basename(p) for p in valid] == ["valid.txt.gz"]


@pytest.mark.parametrize("name", ["gutenberg-dense", "gutenberg-moe-1024-h"])
def test_presets_build_at_their_vocabulary(name):
    # The largest and the baseline, built at a small vocabulary: the
    # configured preset and overrides are a valid LanguageModel.
    config = load(name)
    model = presets.build_language_model(config.model.preset, 1200, **config.model.overrides())
    assert model.num_sampled == config.model.num_sampled
