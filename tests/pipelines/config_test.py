"""Tests of keras_moe.pipelines.config and keras_moe.pipelines.lm.config.

Configurations are written as small YAML files in `tmp_path`; every expected
value is written out by hand.
"""

import dataclasses
import re
import typing

import pytest
import yaml

from keras_moe.pipelines.config import (
    ConfigError,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from keras_moe.pipelines.lm.config import (
    FORMATS,
    DataConfig,
    LMConfig,
    ModelConfig,
    TrainConfig,
)

# ---------------------------------------------------------------------------
# A generic configuration tree exercising every supported annotation.


@dataclasses.dataclass
class Inner:
    rate: float = 0.5
    name: str = "x"
    flag: bool = False

    def __post_init__(self):
        if self.rate > 10:
            raise ValueError(f"`rate` must be <= 10. Received: rate={self.rate}")


@dataclasses.dataclass
class Outer:
    count: int = 1
    inner: Inner = dataclasses.field(default_factory=Inner)
    maybe: int | None = None
    either: int | str = 0
    legacy: typing.Optional[float] = 1.0  # noqa: UP045 (typing.Union spelling on purpose)
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    pair: tuple[float, ...] = (0.5, 1.0)
    mode: typing.Literal["a", "b"] = "a"
    anything: typing.Any = None


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------
# from_dict


@pytest.mark.parametrize("data", [None, {}])
def test_from_dict_missing_keys_keep_defaults(data):
    assert from_dict(Outer, data) == Outer()


def test_from_dict_sets_nested_values():
    config = from_dict(
        Outer,
        {"count": 7, "inner": {"rate": 2.5, "flag": True}, "maybe": 3, "either": "word",
         "legacy": None, "sizes": [4, 5, 6], "pair": [1.5, 2], "mode": "b",
         "anything": {"k": [1]}},
    )
    assert config == Outer(
        count=7, inner=Inner(rate=2.5, name="x", flag=True), maybe=3, either="word",
        legacy=None, sizes=[4, 5, 6], pair=(1.5, 2.0), mode="b", anything={"k": [1]},
    )
    # A list for a tuple field becomes a tuple, its int item a float.
    assert type(config.pair) is tuple and type(config.pair[1]) is float
    assert type(config.sizes) is list


def test_ints_are_accepted_for_floats_and_become_floats():
    config = from_dict(Outer, {"inner": {"rate": 3}, "legacy": 2})
    assert config.inner.rate == 3.0 and type(config.inner.rate) is float
    assert config.legacy == 2.0 and type(config.legacy) is float


@pytest.mark.parametrize(
    "data, key",
    [
        ({"count": True}, "count"),  # bool is an int subclass, still rejected
        ({"count": 1.5}, "count"),
        ({"count": "3"}, "count"),
        ({"count": None}, "count"),
        ({"inner": {"rate": True}}, "inner.rate"),
        ({"inner": {"rate": "0.5"}}, "inner.rate"),
        ({"inner": {"name": 5}}, "inner.name"),
        ({"inner": {"flag": 1}}, "inner.flag"),
        ({"inner": {"flag": "yes"}}, "inner.flag"),
        ({"maybe": "x"}, "maybe"),
        ({"maybe": False}, "maybe"),
        ({"either": 1.5}, "either"),
        ({"either": None}, "either"),  # a union without None does not take null
        ({"legacy": "high"}, "legacy"),
        ({"sizes": 3}, "sizes"),
        ({"sizes": [1, "two"]}, "sizes[1]"),
        ({"pair": [0.5, None]}, "pair[1]"),
        ({"mode": "c"}, "mode"),
    ],
)
def test_wrong_types_are_rejected_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=rf"`{re.escape(key)}`") as info:
        from_dict(Outer, data)
    assert "Received" in str(info.value)


def test_union_tries_each_option():
    assert from_dict(Outer, {"either": 4}).either == 4
    assert from_dict(Outer, {"either": "four"}).either == "four"
    assert from_dict(Outer, {"maybe": None}).maybe is None


def test_unknown_top_level_key_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown key `cuont`") as info:
        from_dict(Outer, {"cuont": 3})
    # The message lists the keys that are known there.
    assert "count" in str(info.value) and "inner" in str(info.value)


def test_unknown_nested_key_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"unknown key `inner\.rat`") as info:
        from_dict(Outer, {"inner": {"rat": 1.0}})
    assert "inner.rate" in str(info.value)


@pytest.mark.parametrize("value", [3, "text", [1, 2]])
def test_a_section_must_be_a_mapping(value):
    with pytest.raises(ConfigError, match=r"`inner` must be a mapping"):
        from_dict(Outer, {"inner": value})


def test_post_init_value_error_becomes_config_error_naming_the_section():
    with pytest.raises(ConfigError, match=r"inner: `rate` must be <= 10"):
        from_dict(Outer, {"inner": {"rate": 11}})


def test_to_dict_is_plain_data():
    data = to_dict(Outer(pair=(1.0, 2.0), inner=Inner(name="n")))
    assert data == {
        "count": 1, "inner": {"rate": 0.5, "name": "n", "flag": False}, "maybe": None,
        "either": 0, "legacy": 1.0, "sizes": [1, 2], "pair": [1.0, 2.0], "mode": "a",
        "anything": None,
    }


# ---------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("train.steps=5", ["train", "steps"], 5),
        ("data.train=foo.txt", ["data", "train"], "foo.txt"),
        (" train.learning_rate = 0.5 ", ["train", "learning_rate"], 0.5),
        ("model.unroll=true", ["model", "unroll"], True),
        ("model.dropout=null", ["model", "dropout"], None),
        ("data.train=", ["data", "train"], ""),
        ("data.train=a=b", ["data", "train"], "a=b"),
        ("count=[1, 2]", ["count"], [1, 2]),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["train.steps", "=5", "  =5", ""])
def test_malformed_override_is_rejected(text):
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override(text)


def test_apply_overrides_copies_and_creates_sections():
    data = {"train": {"steps": 3}}
    out = apply_overrides(data, ["train.seed=9", "model.k=2", "train.steps=4"])
    assert out == {"train": {"steps": 4, "seed": 9}, "model": {"k": 2}}
    assert data == {"train": {"steps": 3}}  # the input is left alone


def test_override_below_a_value_is_rejected():
    with pytest.raises(ConfigError, match=r"`steps` is a value, not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


# ---------------------------------------------------------------------------
# load_config: YAML file, then overrides

RUN_YAML = """\
data:
  format: ptb
  train: corpus/train.txt
  vocab_size: 500
model:
  preset: cpu-dense
  dropout: 0.25
  unroll: true
train:
  steps: 40
  learning_rate: 0.01
"""


def test_load_config_from_file(tmp_path):
    config = load_config(LMConfig, write(tmp_path, RUN_YAML))
    assert config == LMConfig(
        data=DataConfig(format="ptb", train="corpus/train.txt", vocab_size=500),
        model=ModelConfig(preset="cpu-dense", dropout=0.25, unroll=True),
        train=TrainConfig(steps=40, learning_rate=0.01),
    )


def test_overrides_win_over_the_file(tmp_path):
    config = load_config(
        LMConfig, write(tmp_path, RUN_YAML),
        ["train.steps=5", "data.train=foo.txt", "model.k=2", "train.learning_rate=1"],
    )
    assert config.train.steps == 5 and type(config.train.steps) is int
    assert config.data.train == "foo.txt"
    assert config.model.k == 2
    assert config.train.learning_rate == 1.0 and type(config.train.learning_rate) is float
    # Untouched keys keep the file's values.
    assert config.data.vocab_size == 500 and config.model.dropout == 0.25


def test_overrides_without_a_file():
    config = load_config(LMConfig, None, ["data.seq_len=12", "data.mode=sentences"])
    assert config == LMConfig(data=DataConfig(seq_len=12, mode="sentences"))


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_gives_defaults(tmp_path, text):
    assert load_config(LMConfig, write(tmp_path, text)) == LMConfig()


def test_override_with_a_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"`train\.steps` must be an integer") as info:
        load_config(LMConfig, None, ["train.steps=abc"])
    assert "'abc'" in str(info.value) and "--set" in str(info.value)


@pytest.mark.parametrize("text", ["train.steps=true", "train.steps=2.5"])
def test_override_bool_or_float_for_int_is_rejected(text):
    with pytest.raises(ConfigError, match=r"`train\.steps`"):
        load_config(LMConfig, None, [text])


def test_override_into_a_missing_section():
    with pytest.raises(ConfigError, match=r"unknown key `optim`"):
        load_config(LMConfig, None, ["optim.lr=0.1"])


def test_override_with_a_misspelled_nested_key():
    with pytest.raises(ConfigError, match=r"unknown key `model\.dropuot`"):
        load_config(LMConfig, None, ["model.dropuot=0.1"])


def test_malformed_override_in_load_config():
    with pytest.raises(ConfigError, match=r"section\.key=value.*'train\.steps'"):
        load_config(LMConfig, None, ["train.steps"])


def test_unknown_keys_in_a_file_name_the_file_and_the_key(tmp_path):
    top = write(tmp_path, "data: {}\nmodle: {preset: x}\n", "top.yaml")
    with pytest.raises(ConfigError, match=r"unknown key `modle`") as info:
        load_config(LMConfig, top)
    assert str(info.value).startswith(top)
    nested = write(tmp_path, "model:\n  dropuot: 0.1\n", "nested.yaml")
    with pytest.raises(ConfigError, match=r"unknown key `model\.dropuot`") as info:
        load_config(LMConfig, nested)
    assert str(info.value).startswith(nested)


def test_file_and_override_errors_say_both(tmp_path):
    path = write(tmp_path, RUN_YAML)
    with pytest.raises(ConfigError, match=r"`train\.steps` must be an integer") as info:
        load_config(LMConfig, path, ["train.steps=abc"])
    assert str(info.value).startswith(f"{path} (with --set overrides)")


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "data:\n  train: [unclosed\n  valid: x\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"not a valid YAML file") as info:
        load_config(LMConfig, path)
    assert path in str(info.value)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"data:\n  train: caf\xe9.txt\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(LMConfig, str(path))


def test_a_top_level_list_is_rejected(tmp_path):
    path = write(tmp_path, "- data\n- model\n")
    with pytest.raises(ConfigError, match=r"must be a mapping") as info:
        load_config(LMConfig, path)
    assert path in str(info.value)


# Regression: a non-mapping file plus an override once escaped as an
# AttributeError (a traceback from the CLI) instead of a ConfigError.
def test_a_top_level_list_with_an_override_is_a_config_error(tmp_path):
    path = write(tmp_path, "- data\n- model\n")
    with pytest.raises(ConfigError, match=r"mapping") as info:
        load_config(LMConfig, path, ["train.steps=5"])
    assert path in str(info.value)


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_config(LMConfig, missing)


def test_lm_validation_errors_name_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "data:\n  format: csv\n")
    with pytest.raises(ConfigError, match=r"data: `format` must be one of") as info:
        load_config(LMConfig, path)
    assert str(info.value).startswith(path) and "'csv'" in str(info.value)


# Regression: a section left empty in the file (`model:` parses to None) is
# "all defaults"; an override into it once failed as "not a section".
def test_override_into_a_section_left_empty_in_the_file(tmp_path):
    path = write(tmp_path, "data:\n  train: a.txt\nmodel:\n")
    assert load_config(LMConfig, path).model == ModelConfig()
    config = load_config(LMConfig, path, ["model.dropout=0.1"])
    assert config.model == ModelConfig(dropout=0.1)


# Regression: PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; the
# configuration loader reads numbers as YAML 1.2 does.
@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1E-3", 1e-3), ("2e+1", 20.0)])
def test_exponent_floats_without_a_dot_are_numbers(tmp_path, text, value):
    config = load_config(LMConfig, None, [f"train.learning_rate={text}"])
    assert config.train.learning_rate == pytest.approx(value)
    path = write(tmp_path, f"train:\n  learning_rate: {text}\n")
    assert load_config(LMConfig, path).train.learning_rate == pytest.approx(value)


# ---------------------------------------------------------------------------
# dump_config / save_config


def test_dump_is_yaml_in_definition_order():
    text = dump_config(LMConfig())
    assert [line for line in text.splitlines() if not line.startswith(" ")] == [
        "data:", "model:", "train:"
    ]
    data = yaml.safe_load(text)
    assert list(data["train"])[:3] == ["steps", "steps_per_eval", "learning_rate"]
    assert data["train"]["epsilon"] == 1e-7 and data["model"]["dropout"] is None


def test_save_load_round_trip(tmp_path):
    original = LMConfig(
        data=DataConfig(
            format="wikitext", train="dir/トレイン.txt", valid="1.5", test="null",
            tfds_data_dir="/tmp/tfds", mode="sentences", eval_seq_len=0, vocab_size=4,
        ),
        model=ModelConfig(dropout=0.0, unroll=False, k=1, capacity_factor=1.25),
        train=TrainConfig(
            learning_rate=3.5e-5, epsilon=1e-9, clipnorm=None, time_limit_minutes=2.5,
            warmup_steps=0, decay="constant", verbose=0,
        ),
    )
    path = tmp_path / "config.yaml"
    save_config(original, str(path))
    assert path.read_text(encoding="utf-8") == dump_config(original)
    reloaded = load_config(LMConfig, str(path))
    assert reloaded == original
    # Strings that look like other YAML scalars stay strings.
    assert reloaded.data.valid == "1.5" and reloaded.data.test == "null"


def test_round_trip_of_tuples_and_unions(tmp_path):
    original = Outer(
        count=0, inner=Inner(rate=1e-8, name="yes", flag=True), maybe=0, either="1",
        legacy=None, sizes=[], pair=(0.25,), mode="b", anything=[1, "a"],
    )
    path = tmp_path / "outer.yaml"
    save_config(original, str(path))
    reloaded = load_config(Outer, str(path))
    assert reloaded == original
    assert type(reloaded.pair) is tuple and reloaded.either == "1"


# ---------------------------------------------------------------------------
# lm_config validation


def test_defaults_are_valid():
    config = LMConfig()
    assert config.data.format == "text" and config.train.decay == "inverse_sqrt"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_accepted(fmt):
    assert DataConfig(format=fmt).format == fmt


def test_formats():
    assert FORMATS == ("text", "ptb", "wikitext", "1b", "tfds")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"format": "csv"}, "format"),
        ({"format": "PTB"}, "format"),
        ({"vocabulary": "bpe"}, "vocabulary"),
        ({"mode": "lines"}, "mode"),
        ({"vocab_size": 3}, "vocab_size"),
        ({"min_count": 0}, "min_count"),
        ({"vocab_max_lines": 0}, "vocab_max_lines"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": -5}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_tokens": 0}, "batch_tokens"),
        ({"max_sentence_len": 0}, "max_sentence_len"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"eval_seq_len": -1}, "eval_seq_len"),
    ],
)
def test_data_config_rejects(kwargs, name):
    with pytest.raises(ValueError, match=rf"`{name}`.*Received: {name}="):
        DataConfig(**kwargs)


def test_data_config_boundaries_that_are_allowed():
    config = DataConfig(vocab_size=4, eval_seq_len=0, seq_len=1, shuffle_buffer=1,
                        vocabulary="wordpiece", mode="sentences")
    assert (config.vocab_size, config.eval_seq_len, config.seq_len) == (4, 0, 1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"steps": 0}, "steps"),
        ({"steps_per_eval": 0}, "steps_per_eval"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"monitor_every_n_steps": 0}, "monitor_every_n_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"epsilon": -1e-7}, "epsilon"),
        ({"clipnorm": -1.0}, "clipnorm"),
        ({"time_limit_minutes": -0.5}, "time_limit_minutes"),
        ({"decay": "cosine"}, "decay"),
        ({"verbose": 3}, "verbose"),
        ({"verbose": -1}, "verbose"),
    ],
)
def test_train_config_rejects(kwargs, name):
    with pytest.raises(ValueError, match=rf"`{name}`.*Received: {name}="):
        TrainConfig(**kwargs)


def test_train_config_boundaries_that_are_allowed():
    config = TrainConfig(warmup_steps=0, clipnorm=None, time_limit_minutes=None, epsilon=0.0,
                         decay="constant", verbose=0, steps=1)
    assert (config.warmup_steps, config.clipnorm, config.decay) == (0, None, "constant")
    assert TrainConfig(clipnorm=0.0, time_limit_minutes=0.0).clipnorm == 0.0


def test_lm_validation_through_overrides_names_the_section():
    with pytest.raises(ConfigError, match=r"train: `decay` must be"):
        load_config(LMConfig, None, ["train.decay=linear"])
    with pytest.raises(ConfigError, match=r"data: `vocab_size` must be >= 4"):
        load_config(LMConfig, None, ["data.vocab_size=2"])
    with pytest.raises(ConfigError, match=r"data: `mode` must be"):
        load_config(LMConfig, None, ["data.mode=words"])


def test_model_overrides_are_the_keys_that_are_set():
    assert ModelConfig().overrides() == {}
    assert ModelConfig(preset="other").overrides() == {}  # the preset is not an argument
    # 0, 0.0 and False are values, only None means "keep the preset's".
    config = ModelConfig(k=2, dropout=0.0, unroll=False, num_sampled=0, gating="noisy_top_k")
    assert config.overrides() == {
        "k": 2, "dropout": 0.0, "unroll": False, "num_sampled": 0, "gating": "noisy_top_k"
    }


def test_model_overrides_from_a_file(tmp_path):
    path = write(tmp_path, "model:\n  preset: cpu-moe-32\n  num_experts: 8\n  dropout: 0.1\n")
    assert load_config(LMConfig, path).model.overrides() == {"num_experts": 8, "dropout": 0.1}


# ---------------------------------------------------------------------------
# check_positive and the shared sections


@pytest.mark.parametrize("value, allow_zero, message", [
    (0, False, "`steps` must be > 0. Received: steps=0"),
    (-1, True, "`steps` must be >= 0. Received: steps=-1"),
    (-0.5, False, "`steps` must be > 0. Received: steps=-0.5"),
])
def test_check_positive_names_the_key_and_the_value(value, allow_zero, message):
    from keras_moe.pipelines.config import check_positive

    with pytest.raises(ValueError, match=re.escape(message)):
        check_positive("steps", value, allow_zero=allow_zero)


@pytest.mark.parametrize("value, allow_zero", [(1, False), (0.1, False), (0, True), (None, False)])
def test_check_positive_passes(value, allow_zero):
    from keras_moe.pipelines.config import check_positive

    assert check_positive("steps", value, allow_zero=allow_zero) is None


def test_both_pipelines_share_the_train_section_and_the_moe_model_keys():
    from keras_moe.pipelines.training import config as training_config
    from keras_moe.pipelines.translate import config as translate_config

    assert TrainConfig is training_config.TrainConfig
    assert issubclass(translate_config.TrainConfig, training_config.TrainConfig)
    shared = {f.name for f in dataclasses.fields(training_config.MoEModelConfig)}
    for model in (ModelConfig, translate_config.ModelConfig):
        assert issubclass(model, training_config.MoEModelConfig)
        assert shared <= {f.name for f in dataclasses.fields(model)}
    assert ModelConfig().preset == "cpu-moe-32"
    assert translate_config.ModelConfig().preset == "cpu-gnmt-moe-16"
