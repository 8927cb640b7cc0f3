"""Tests of keras_moe.models.presets: Table 7's figures and real parameter counts."""

import keras
import numpy as np
import pytest

from keras_moe.models import presets
from keras_moe.models.lm import LanguageModel

# Table 7 of Shazeer et al. 2017, in millions: (ops/timestep, #params
# excluding embedding & softmax). Independent of our formulas.
TABLE_7 = {
    "4xlstm-512": (8.4, 8.4),
    "lstm-2048-512": (9.4, 9.4),
    "moe-1-wide": (8.4, 8.4),
    "moe-1-deep": (8.4, 8.4),
    "moe-4": (8.4, 8.4),
    "moe-32": (8.4, 37.8),
    "moe-256": (8.6, 272.9),
    "moe-256-h": (8.4, 272.9),
    "moe-1024-h": (8.5, 1079.0),
    "moe-4096-h": (8.9, 4303.4),
}

# The one figure our count does not round to. MoE-256's ops/timestep are
# 2 LSTMs (2 * 4*512*1024) + 4 experts (4 * 2*512*1024) + w_gate and w_noise
# (2*512*256) = 8,650,752, which rounds to 8.7, not Table 7's 8.6. The same
# count reproduces every other row, including the gating terms of MoE-32
# and the hierarchical rows; counting w_gate alone would give 8.52 (8.5) and
# no gating 8.39 (8.4), so no other reading gives 8.6 either. The total is
# 0.0008M past the rounding boundary; adding the parts rounded to two
# decimals (4.19 + 4.19 + 0.26 = 8.64) would give the paper's 8.6.
OUR_ROUNDING = {("moe-256", "ops"): 8.7}

# Too large to build in a test (GBs of weights): their structure is checked
# on a copy with narrow layers but the same experts, groups and k.
LARGE = ("moe-256", "moe-256-h", "moe-1024-h", "moe-4096-h", "gutenberg-moe-256",
         "gutenberg-moe-1024-h")
NARROW = dict(model_dim=16, expert_hidden_dim=8)
TOKENS = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0]], np.int32)
VOCAB = 10


def millions(n):
    return round(n / 1e6, 1)


@pytest.mark.parametrize("name", sorted(TABLE_7))
def test_costs_reproduce_table_7(name):
    cost = presets.costs(name)
    table_ops, table_params = TABLE_7[name]
    assert millions(cost["ops_per_timestep"]) == OUR_ROUNDING.get((name, "ops"), table_ops)
    assert millions(cost["params_without_biases"]) == table_params
    assert cost["params"] > cost["params_without_biases"]


def test_paper_building_blocks():
    # App. C: each expert has 512*1024 + 1024*512 = 1M parameters, each LSTM
    # costs 2M ops per timestep, and the MoE-4 model "8M" in all.
    one_lstm = presets.costs({"blocks": ("lstm",)})["params_without_biases"]
    assert one_lstm == 4 * 512 * (512 + 512) == 2 * 2**20
    moe_4 = presets.costs("moe-4")
    assert moe_4["ops_per_timestep"] == 2 * one_lstm + 4 * 2**20 + 2 * 512 * 4
    assert presets.costs("moe-256")["ops_per_timestep"] == 8_650_752


def test_cpu_dense_is_compute_matched_up_to_the_gating():
    moe, dense = presets.costs("cpu-moe-32"), presets.costs("cpu-dense")
    assert moe["ops_per_timestep"] - dense["ops_per_timestep"] == 2 * 256 * 32


def test_cpu_moe_1_wide_is_the_dense_block_behind_a_one_expert_gate():
    # MoE-1-Wide (Table 7) at laptop size: the dense block's multiply-adds and
    # parameters plus a 256 x 1 gate and noise matrix and the expert's biases.
    wide, dense = presets.costs("cpu-moe-1-wide"), presets.costs("cpu-dense")
    assert wide["ops_per_timestep"] - dense["ops_per_timestep"] == 2 * 256 * 1
    assert wide["params"] - dense["params"] == 2 * 256 * 1


def test_cpu_2xlstm_is_the_dense_stack_without_its_middle_block():
    # Two LSTMs of 256 units (4 gates from [x, h], 256 + 256 wide), and
    # cpu-dense is the same plus one 256 -> 1024 -> 256 ReLU block.
    bare, dense = presets.costs("cpu-2xlstm"), presets.costs("cpu-dense")
    assert bare["ops_per_timestep"] == 2 * 4 * 256 * (256 + 256) == 1_048_576
    assert dense["ops_per_timestep"] - bare["ops_per_timestep"] == 2 * 256 * 1024
    assert dense["params"] - bare["params"] == 2 * 256 * 1024 + 1024 + 256


def _real_params(model):
    # LanguageModel builds every weight at construction; no call is needed.
    assert model.built
    return sum(
        layer.count_params() for layer in model.layers if layer.name not in ("embedding", "softmax")
    )


def _small_enough(name):
    return name not in LARGE


@pytest.mark.parametrize("name", [n for n in presets.preset_names() if _small_enough(n)])
def test_params_formula_equals_the_built_model(name):
    model = presets.build_language_model(name, VOCAB)
    assert {"embedding", "softmax"} <= {layer.name for layer in model.layers}
    assert presets.costs(name)["params"] == _real_params(model)


@pytest.mark.parametrize("name", LARGE)
def test_params_formula_equals_a_narrow_copy_of_a_large_preset(name):
    kwargs = {**presets.get_preset(name), **NARROW}
    model = LanguageModel(VOCAB, **kwargs)
    moe = model.get_layer("moe")
    assert moe.num_experts == kwargs["num_experts"]
    # The model is built at construction: every weight exists without a call.
    assert moe.experts.built
    assert presets.costs(kwargs)["params"] == _real_params(model)


def test_preset_contents():
    assert presets.preset_names() == sorted(presets.PRESETS)
    assert set(TABLE_7) < set(presets.PRESETS)
    assert presets.get_preset("moe-1024-h")["num_groups"] == 16
    copy = presets.get_preset("moe-32")
    copy["num_experts"] = 1
    assert presets.PRESETS["moe-32"]["num_experts"] == 32


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"Unknown preset 'moe-7'\. Known presets: 4xlstm-512, "):
        presets.get_preset("moe-7")
    with pytest.raises(ValueError, match="moe-7"):
        presets.build_language_model("moe-7", VOCAB)
    with pytest.raises(ValueError, match="moe-7"):
        presets.costs("moe-7")


def test_overrides():
    model = presets.build_language_model("cpu-moe-32", VOCAB, num_experts=8, seed=3)
    assert (model.num_experts, model.seed, model.model_dim) == (8, 3, 256)
    with pytest.raises(ValueError, match="'num_expert'"):
        presets.build_language_model("cpu-moe-32", VOCAB, num_expert=8)
    with pytest.raises(ValueError, match="'colour'"):
        presets.costs({"colour": 1})


def test_cpu_preset_runs_and_survives_keras_save(tmp_path):
    model = presets.build_language_model("cpu-moe-32-h", VOCAB, seed=1)
    logits = model(TOKENS, training=False)
    assert tuple(logits.shape) == (2, 5, VOCAB)
    assert np.isfinite(np.asarray(logits)).all()
    path = str(tmp_path / "cpu.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(
        np.asarray(loaded(TOKENS, training=False)), np.asarray(logits)
    )


def test_gutenberg_presets_are_matched_on_ops_per_timestep():
    # Issue 26: every model of the experiment within 2% of the others' ops
    # per timestep, counted by `costs` (the `keras-moe lm presets` column).
    ops = {name: presets.costs(name)["ops_per_timestep"] for name in presets.GUTENBERG_MATCHED}
    assert max(ops.values()) <= 1.02 * min(ops.values()), ops
    # By hand, width 128: two LSTMs 2 * 4*128*(128+128) = 262,144, plus
    # dense: one 128 -> 1024 -> 128 block, 2*128*1024 = 262,144;
    # flat MoE-E, k=4 of experts of h: 4 * 2*128*h + w_gate and w_noise 2*128*E;
    # hierarchical 32 x 32, k=2: 4 experts + primary 2*128*32 + 2 * secondary 2*128*32.
    lstms = 2 * 4 * 128 * 256
    assert ops["gutenberg-dense"] == lstms + 2 * 128 * 1024 == 524_288
    for e, h in ((16, 252), (64, 240), (256, 192)):
        assert ops[f"gutenberg-moe-{e}"] == lstms + 4 * 2 * 128 * h + 2 * 128 * e == 524_288
    assert ops["gutenberg-moe-1024-h"] == (
        lstms + 4 * 2 * 128 * 232 + 2 * 128 * 32 + 2 * 2 * 128 * 32
    ) == 524_288
    assert presets.costs("gutenberg-2xlstm")["ops_per_timestep"] == lstms
    moe = {name: presets.get_preset(name) for name in presets.GUTENBERG_MATCHED[1:]}
    assert [a["num_experts"] for a in moe.values()] == [16, 64, 256, 1024]
    assert all(a["model_dim"] == 128 for a in moe.values())
