"""Document pools from a configuration to a trained language model (issue 27).

`model.pool_size` / `model.pool_size_range` reach the LM's MoE layer with one
document per batch row; the modularity experiment's two configurations; and
`lm train` -> `experts select` -> `lm evaluate --k` on a tiny pooled run.
"""

import json

import keras
import numpy as np
import pytest
import yaml

from keras_moe.models import presets
from keras_moe.models.lm import LanguageModel
from keras_moe.monitoring import find_moe_layers
from keras_moe.pipelines.cli import main
from keras_moe.pipelines.config import ConfigError, load_config, to_dict
from keras_moe.pipelines.lm import train as lm_train
from keras_moe.pipelines.lm.config import LMConfig, tokens_per_step
from keras_moe.pipelines.training import guards
from keras_moe.pipelines.translate.config import TranslateConfig
from tests.conftest import REPO_ROOT
from tests.pipelines.lm.train_test import TINY, write_corpus

CONFIGS = REPO_ROOT / "pipelines" / "configs" / "lm"
POOL_KEYS = ("pool_size", "pool_size_range")


@pytest.fixture(scope="module", autouse=True)
def in_process():
    """`cli.main` runs here instead of re-executing itself with its environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_MOE_NO_REEXEC", "1")
        yield


# ------------------------------------------------------------- the keys ---


def test_the_pool_keys_reach_the_moe_layer_with_one_document_per_row():
    config = load_config(LMConfig, None, [*TINY, "model.num_experts=6", "model.pool_size=4",
                                          "model.pool_size_range=[2, 4]"])
    assert config.model.overrides()["pool_size_range"] == [2, 4]
    model = presets.build_language_model(config.model.preset, 40, **config.model.overrides())
    moe = find_moe_layers(model)[0]
    assert (moe.pool_size, moe.pool_size_range, moe.pool_by) == (4, (2, 4), "row")
    tokens = np.random.default_rng(0).integers(1, 40, size=(3, 5)).astype("int32")
    _, routing = model(tokens, return_routing=True)
    assert routing["moe"].pools.shape == (3, 4)  # a pool of 4 per row at inference
    np.testing.assert_array_equal(routing["moe"].document_index, np.repeat([[0], [1], [2]], 5, 1))
    for row in range(3):  # every token routes inside its row's pool
        assert set(routing["moe"].expert_indices.numpy()[row].ravel()) <= set(
            routing["moe"].pools.numpy()[row])
    # Without the keys nothing changes: no pools, as before.
    plain = load_config(LMConfig, None, TINY).model
    assert plain.pool_size is None and "pool_size" not in plain.overrides()


def test_a_pooled_language_model_round_trips_its_config_and_reloads(tmp_path):
    model = LanguageModel(30, model_dim=8, num_experts=6, expert_hidden_dim=4, k=2, seed=0,
                          pool_size=3, pool_size_range=(2, 5))
    config = model.get_config()
    assert (config["pool_size"], config["pool_size_range"]) == (3, [2, 5])
    assert LanguageModel.from_config(config).get_config() == config
    tokens = np.random.default_rng(1).integers(1, 30, size=(2, 6)).astype("int32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert find_moe_layers(loaded)[0].pool_size_range == (2, 5)
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-6)
    # An old model's config (no pool keys) still loads, without pools.
    old = {k: v for k, v in config.items() if k not in POOL_KEYS}
    assert find_moe_layers(LanguageModel.from_config(old))[0].pool_size is None


@pytest.mark.parametrize("overrides, fragment", [
    (["model.pool_size=0"], "`pool_size` must be > 0. Received: pool_size=0"),
    (["model.pool_size_range=[2, 4]"], "needs `pool_size`"),
    (["model.pool_size=4", "model.pool_size_range=[4, 2]"],
     "Received: pool_size_range=[4, 2]"),
    (["model.pool_size=4", "model.pool_size_range=[2, 3, 4]"],
     "Received: pool_size_range=[2, 3, 4]"),
    (["model.pool_size=5"], "at most num_experts=4 (a pool is made of the layer's experts). "
                            "Received: pool_size=5"),
    (["model.pool_size=1"], "at least k=2 (each token routes to k experts of its pool). "
                            "Received: pool_size=1"),
    (["model.pool_size=4", "model.pool_size_range=[1, 4]"], "Received: pool_size_range=[1, 4]"),
    (["model.pool_size=4", "model.pool_size_range=[2, 6]"],
     "at most num_experts=4 (a pool is made of the layer's experts). "
     "Received: pool_size_range=[2, 6]"),
    (["model.pool_size=big"], "`model.pool_size` must be int or None"),
])
def test_bad_pool_keys_are_refused_naming_the_key_and_value(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(LMConfig, None, [*TINY, *overrides])
    assert fragment in str(error.value)


def test_keys_checked_against_the_preset_fail_before_any_file_is_written(tmp_path):
    # num_experts and k come from the preset (cpu-moe-32: 32 experts, k=4),
    # so only the model's constructor can tell.
    train = write_corpus(tmp_path / "train.txt", 20, 0)
    for overrides, fragment in ((["model.pool_size=40"], "pool_size=40"),
                                (["model.pool_size=2"], "pool_size=2"),
                                (["model.pool_size=8", "model.pool_size_range=[2, 8]"],
                                 "pool_size_range=(2, 8)")):
        config = load_config(LMConfig, None, [f"data.train={train}", f"data.valid={train}",
                                              "model.preset=cpu-moe-32", *overrides])
        run_dir = tmp_path / "run"
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            lm_train.train(config, run_dir)
        assert not run_dir.exists()
    dense = load_config(LMConfig, None, [f"data.train={train}", f"data.valid={train}",
                                         "model.preset=cpu-dense", "model.pool_size=4"])
    with pytest.raises(ValueError, match="needs an 'moe' block"):
        lm_train.train(dense, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_translation_configs_refuse_pools_clearly():
    with pytest.raises(ConfigError, match="language models .* only.*pool_size=4"):
        load_config(TranslateConfig, None, ["model.pool_size=4"])
    assert load_config(TranslateConfig, None, []).model.pool_size is None


# ---------------------------------------------- the experiment's configs ---


def load_experiment(name):
    return load_config(LMConfig, CONFIGS / f"{name}.yaml")


def test_the_two_experiment_configs_load_and_differ_only_in_the_pools():
    texts = {name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
             for name in ("domains-moe-64", "domains-moe-64-pooled")}
    standard, pooled = texts["domains-moe-64"], texts["domains-moe-64-pooled"]
    assert {k: v for k, v in pooled["model"].items() if k not in POOL_KEYS} == standard["model"]
    assert {k: v for k, v in pooled.items() if k != "model"} == {
        k: v for k, v in standard.items() if k != "model"}
    assert (pooled["model"]["pool_size"], pooled["model"]["pool_size_range"]) == (64, [8, 32])
    assert standard["data"]["document_rows"] is True
    configs = {name: load_experiment(name) for name in texts}
    a, b = to_dict(configs["domains-moe-64"]), to_dict(configs["domains-moe-64-pooled"])
    assert a["data"] == b["data"] and a["train"] == b["train"]
    assert {k: v for k, v in b["model"].items() if k not in POOL_KEYS} == {
        k: v for k, v in a["model"].items() if k not in POOL_KEYS}
    config = configs["domains-moe-64-pooled"]
    assert tokens_per_step(config.data) == 5120
    # `data.document_rows` refuses a token budget (padding would count): steps.
    assert config.train.steps == 1200 and config.train.max_tokens is None
    assert config.data.train == "runs/domains/train.txt"
    for loaded in configs.values():  # the models they name are valid (no weights made)
        guards.check_model_arguments(presets.REGISTRY, loaded.model.preset,
                                     loaded.data.vocab_size, **loaded.model.overrides())
    arguments = presets.get_preset(config.model.preset)
    assert (arguments["num_experts"], arguments["k"], arguments["model_dim"]) == (64, 4, 128)


# ------------------------------------------------------- the whole path ---


def test_cli_trains_a_pooled_lm_selects_half_its_experts_and_evaluates_at_k_1(tmp_path, capsys):
    train = write_corpus(tmp_path / "train.txt", 200, 0)
    valid = write_corpus(tmp_path / "valid.txt", 30, 1)
    run_dir, subset = tmp_path / "run", tmp_path / "subset"
    settings = [*TINY, "model.num_experts=6", "model.pool_size=4",
                "model.pool_size_range=[2, 4]", f"data.train={train}", f"data.valid={valid}"]
    argv = ["lm", "train", "--run-dir", str(run_dir)]
    for setting in settings:
        argv += ["--set", setting]
    assert main(argv) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert (saved["pool_size"], saved["pool_size_range"]) == (4, [2, 4])
    assert main(["experts", "select", "--run-dir", str(run_dir), "--data", valid, "--keep",
                 "0.5", "--out", str(subset), "--max-documents", "20"]) == 0
    report = json.loads((subset / "experts.json").read_text())
    assert report["after"]["experts"] == {"moe": 3}
    # 3 experts left: the pool size 4 and the range's top shrink to 3.
    saved = yaml.safe_load((subset / "config.yaml").read_text())["model"]
    assert (saved["num_experts"], saved["pool_size"], saved["pool_size_range"]) == (3, 3, [2, 3])
    config, _, model, _ = lm_train.load_run(str(subset))
    assert (config.model.pool_size, tuple(config.model.pool_size_range)) == (3, (2, 3))
    assert find_moe_layers(model)[0].pool_size == 3
    capsys.readouterr()
    assert main(["lm", "evaluate", "--run-dir", str(subset), "--data", valid, "--k", "1"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["k"] == 1 and np.isfinite(evaluated["perplexity"])
    # A k' above the (clamped) pool: exit 2, one line naming both.
    assert main(["lm", "evaluate", "--run-dir", str(subset), "--data", valid, "--k", "4"]) == 2
    error = capsys.readouterr().err.strip()
    assert "pool_size=3). Received: k=4" in error and len(error.splitlines()) == 1


def test_docstring_examples():
    import doctest

    from keras_moe.pipelines.training import config as training_config

    assert doctest.testmod(training_config).failed == 0
