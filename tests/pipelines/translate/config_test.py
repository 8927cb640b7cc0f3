"""The translation configuration: corpus parts, validation, shipped YAML files."""

import glob
import os

import pytest

from keras_moe.pipelines import config as config_lib
from keras_moe.pipelines.lm.config import LMConfig
from keras_moe.pipelines.translate.config import CorpusConfig, TranslateConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_yaml_with_several_parts_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n"
        "  train:\n"
        "    - {source: a.en.gz, target: a.de.gz}\n"
        "    - {tsv: b.tsv, source_column: 2, target_column: 3}\n"
        "    - {tfds: wmt14_translate/de-en, split: 'train[:1%]', data_dir: /data}\n"
        "    - {gettext: de, split: train}\n"
        "  valid: [{source: v.en.sgm, target: v.de.sgm}]\n"
        "model: {preset: gnmt-moe-32, gating: batchwise}\n"
        "train: {warmup_steps: 2000, hold_steps: 8000}\n"
    )
    config = config_lib.load_config(TranslateConfig, path, ["decode.beam_width=6"])
    parts = config.data.train
    assert [p.describe() for p in parts] == [
        "a.en.gz + a.de.gz", "b.tsv", "tfds:wmt14_translate/de-en[train[:1%]]", "gettext:de[train]"]
    assert parts[1].source_column == 2 and parts[2].data_dir == "/data"
    assert config.model.overrides() == {"gating": "batchwise"}
    assert config.decode.beam_width == 6
    saved = tmp_path / "saved.yaml"
    config_lib.save_config(config, saved)
    assert config_lib.load_config(TranslateConfig, saved) == config


@pytest.mark.parametrize(
    "part, message",
    [
        ({}, "exactly one"),
        ({"source": "a.en"}, "`target` is missing"),
        ({"target": "a.de"}, "`source` is missing"),
        ({"tsv": "a.tsv", "gettext": "de"}, "Received: tsv, gettext"),
        ({"gettext": "de", "split": "validation"}, "split=.validation."),
        ({"tsv": "a.tsv", "source_column": -1}, "source_column=-1"),
    ],
)
def test_bad_parts_name_the_problem(part, message):
    with pytest.raises(ValueError, match=message):
        CorpusConfig(**part)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_ratio=0.5", "max_ratio=0.5"),
        ("data.batch_tokens=16", "batch_tokens=16"),
        ("data.vocab_size=3", "vocab_size=3"),
        ("train.hold_steps=-5", "hold_steps=-5"),
        ("train.keep_checkpoints=0", "keep_checkpoints=0"),
        ("decode.beam_width=0", "beam_width=0"),
        ("decode.alpha=-1", "alpha=-1"),
        ("model.attention_units=big", "attention_units"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_config(TranslateConfig, None, [override])


def test_translation_training_defaults_follow_appendix_e():
    train = TranslateConfig().train
    assert (train.warmup_steps, train.hold_steps, train.decay) == (2000, 8000, "inverse_sqrt")


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(REPO, "pipelines", "configs", "*", "*.yaml"))))
def test_shipped_configs_load(path):
    translation = (os.sep + "translate" + os.sep in path
                   or os.path.basename(path).startswith("wmt"))
    cls = TranslateConfig if translation else LMConfig
    config = config_lib.load_config(cls, path)
    assert config.train.steps > 0


@pytest.mark.parametrize("preset, layer", [("cpu-gnmt-moe-16", "encoder_moe"),
                                           ("cpu-gnmt-dense", "encoder_ffn")])
def test_expert_dropout_override_reaches_the_model(preset, layer):
    from keras_moe.pipelines.translate import train as translate_train

    config = config_lib.load_config(
        TranslateConfig, None, [f"model.preset={preset}", "model.expert_dropout=0.3",
                                "model.model_dim=8", "model.expert_hidden_dim=4"])
    model = translate_train.build_model(config, vocab_size=20, compile=False)
    assert model.expert_dropout == 0.3
    block = model.get_layer(layer)
    rate = block.experts.dropout if preset.endswith("16") else block.get_layer("ffn_dropout").rate
    assert rate == 0.3
    with pytest.raises(config_lib.ConfigError, match="expert_dropout"):
        config_lib.load_config(TranslateConfig, None, ["model.expert_dropout=high"])
