"""Tests of keras_moe.models.translation_presets: real parameter counts and the paper's figures."""

import numpy as np
import pytest

import keras_moe
from keras_moe.models import translation_presets as presets
from keras_moe.models.seq2seq import TranslationModel

VOCAB = 10
# The paper-size presets are too large to build in a test (GBs for 2048
# experts); their structure is checked on copies with narrow layers but the
# same experts, groups, k, gating and blocks.
PAPER_SIZE = ("gnmt-baseline", "gnmt-moe-32", "gnmt-moe-512-h", "gnmt-moe-2048-h")
NARROW = dict(model_dim=16, lstm_units=24, lstm_projection=16, expert_hidden_dim=8)


def _real_params(model):
    # TranslationModel builds every weight at construction; no call is needed.
    assert model.built
    return sum(
        layer.count_params() for layer in model.layers if layer.name not in ("embedding", "softmax")
    )


@pytest.mark.parametrize("name", [n for n in presets.preset_names() if n not in PAPER_SIZE])
def test_costs_equal_the_built_cpu_model(name):
    model = presets.build_translation_model(name, VOCAB)
    cost = presets.costs(name, vocab_size=VOCAB)
    assert cost["params"] == _real_params(model)
    assert cost["total_params"] == model.count_params()


@pytest.mark.parametrize("name", PAPER_SIZE)
def test_costs_equal_a_narrow_copy_of_a_paper_preset(name):
    kwargs = {**presets.get_preset(name), **NARROW}
    model = TranslationModel(VOCAB, **kwargs)
    if name != "gnmt-baseline":
        moe = model.get_layer("decoder_moe")
        assert moe.num_experts == kwargs["num_experts"]
    assert presets.costs(kwargs)["params"] == _real_params(model)
    # The same with GNMT's options off, and with the other attention.
    for extra in (dict(bidirectional_encoder=False, upper_context=False),
                  dict(attention="additive", attention_units=5)):
        variant = {**kwargs, **extra}
        assert presets.costs(variant)["params"] == _real_params(TranslationModel(VOCAB, **variant))


def test_paper_presets_have_the_paper_structure():
    for name in PAPER_SIZE:
        preset = presets.get_preset(name)
        assert (preset["model_dim"], preset["lstm_units"], preset["lstm_projection"]) == (
            512, 2048, 512)
        assert (preset["dropout"], preset["importance_weight"], preset["load_weight"]) == (
            0.4, 0.01, 0.01)
    assert presets.get_preset("gnmt-moe-32")["gating"] == "batchwise"
    for name, experts in (("gnmt-moe-512-h", 512), ("gnmt-moe-2048-h", 2048)):
        model = TranslationModel(VOCAB, **{**presets.get_preset(name), **NARROW})
        moe = model.get_layer("encoder_moe")
        assert isinstance(moe, keras_moe.HierarchicalMoE)
        assert moe.num_experts == experts and moe.k == 4  # 2 groups x 2 experts
    baseline = TranslationModel(VOCAB, **{**presets.get_preset("gnmt-baseline"), **NARROW})
    assert not any(isinstance(layer, keras_moe.MoE) for layer in baseline.layers)


def test_paper_building_blocks():
    # App. E: "each expert contains [512 * 2048] + [2048 * 512] = 2M
    # parameters"; a flat k=4 layer runs 4 experts, a hierarchical one 2 x 2.
    expert = 512 * 2048 + 2048 * 512
    base = presets.costs("gnmt-baseline")
    for name, gating_ops in (("gnmt-moe-32", 512 * 32),  # batchwise: w_gate only
                             ("gnmt-moe-2048-h", 2 * 512 * 32 + 2 * 2 * 512 * 64)):
        moe = presets.costs(name)
        assert moe["encoder_ops_per_timestep"] - base["encoder_ops_per_timestep"] == (
            4 * expert + gating_ops)
        assert moe["decoder_ops_per_timestep"] - base["decoder_ops_per_timestep"] == (
            4 * expert + gating_ops)
    # A 2048 -> 512 projected LSTM reading 512: 4*2048*(512+512) + 2048*512.
    uni = presets.costs({**presets.get_preset("gnmt-baseline"), "bidirectional_encoder": False})
    assert base["encoder_ops_per_timestep"] - uni["encoder_ops_per_timestep"] == (
        2 * (4 * 2048 * (512 + 256) + 2048 * 256) - (4 * 2048 * 1024 + 2048 * 512))


def test_table_2_figures_of_the_2048_expert_model():
    # Table 2 (WMT'14 En->Fr) reports for "MoE with 2048 Experts" 85M
    # ops/timestep and 8.7B parameters (all of them). Counting ops like
    # GNMT's row of the same table (its 214M = 8 + 8 LSTM layers of 1024
    # plus a 32k softmax per timestep), with a 32000-word softmax:
    paper = dict(presets.get_preset("gnmt-moe-2048-h"), bidirectional_encoder=False,
                 upper_context=False)
    cost = presets.costs(paper, vocab_size=32000)
    ops = cost["ops_per_timestep"] + cost["softmax_ops_per_timestep"]
    assert round(ops / 1e6) == 85
    assert round(cost["total_params"] / 1e9, 1) == 8.7
    # Our preset keeps GNMT's bidirectional first layer and context to the
    # upper decoder LSTM, two widened LSTM inputs (4 * 2048 * 512 more
    # each way): 8.4M ops more than the paper's count.
    ours = presets.costs("gnmt-moe-2048-h", vocab_size=32000)
    extra = ours["ops_per_timestep"] - cost["ops_per_timestep"]
    assert extra == 2 * 4 * 2048 * 512
    assert round(ours["total_params"] / 1e9, 1) == 8.7


def test_cpu_dense_is_compute_matched_up_to_the_gating():
    moe, dense = presets.costs("cpu-gnmt-moe-16"), presets.costs("cpu-gnmt-dense")
    # Two middle blocks, each with w_gate and w_noise [256, 16].
    assert moe["ops_per_timestep"] - dense["ops_per_timestep"] == 2 * 2 * 256 * 16


def test_cpu_moe_1_wide_is_the_dense_twin_behind_a_one_expert_gate():
    wide, dense = presets.costs("cpu-gnmt-moe-1-wide"), presets.costs("cpu-gnmt-dense")
    # Two middle blocks, each with w_gate and w_noise [256, 1].
    assert wide["ops_per_timestep"] - dense["ops_per_timestep"] == 2 * 2 * 256 * 1
    model = presets.build_translation_model("cpu-gnmt-moe-1-wide", VOCAB)
    assert model.get_layer("encoder_moe").num_experts == 1


def test_preset_names_unknown_and_overrides():
    assert presets.preset_names() == sorted(presets.PRESETS)
    assert {"gnmt-moe-32", "gnmt-moe-512-h", "gnmt-moe-2048-h", "gnmt-baseline",
            "cpu-gnmt-moe-16", "cpu-gnmt-dense", "cpu-gnmt-moe-1-wide"} == set(presets.PRESETS)
    with pytest.raises(ValueError, match=r"Unknown preset 'gnmt-7'\. Known presets: cpu-gnmt"):
        presets.get_preset("gnmt-7")
    with pytest.raises(ValueError, match="gnmt-7"):
        presets.build_translation_model("gnmt-7", VOCAB)
    with pytest.raises(ValueError, match="gnmt-7"):
        presets.costs("gnmt-7")
    copy = presets.get_preset("gnmt-moe-32")
    copy["num_experts"] = 1
    assert presets.PRESETS["gnmt-moe-32"]["num_experts"] == 32
    model = presets.build_translation_model("cpu-gnmt-moe-16", VOCAB, num_experts=8, seed=3)
    assert (model.num_experts, model.seed, model.model_dim) == (8, 3, 256)
    with pytest.raises(ValueError, match="'num_expert'"):
        presets.build_translation_model("cpu-gnmt-moe-16", VOCAB, num_expert=8)
    with pytest.raises(ValueError, match="'colour'"):
        presets.costs({"colour": 1})


def test_cpu_preset_runs():
    model = presets.build_translation_model("cpu-gnmt-moe-16", VOCAB, seed=1)
    source = np.array([[3, 4, 5, 2], [6, 2, 0, 0]], np.int32)
    target = np.array([[1, 7, 8], [1, 9, 0]], np.int32)
    logits = model((source, target), training=False)
    assert tuple(logits.shape) == (2, 3, VOCAB)
    assert np.isfinite(np.asarray(logits)).all()
