"""Named language models of the paper (App. C.1, Table 7) and their cost accounting.

Table 7 of Shazeer et al. (2017) compares, at about 8M multiply-adds per
timestep, models that differ only in the middle of the stack: 4 and 32 to
4096 experts (flat or hierarchical) against dense baselines of the same
compute (a wide or a deep single expert, four LSTMs, a projected LSTM).
`PRESETS` holds them as `LanguageModel` arguments, next to small `cpu-*`
models for runs on a laptop. `costs` counts their multiply-adds per
timestep and parameters the way the paper does (embedding and softmax
excluded).

Example:

>>> sorted(PRESETS)[:3]
['4xlstm-512', 'cpu-2xlstm', 'cpu-4xlstm']
>>> round(costs("moe-32")["params_without_biases"] / 1e6, 1)
37.8
"""

from keras_moe.models.registry import PresetRegistry

# The paper's 1B Word models (App. C.1): model width 512, experts of one
# ReLU hidden layer of 1024, "2M ops/timestep" per LSTM and "1M" per expert.
_PAPER = dict(model_dim=512, expert_hidden_dim=1024, dropout=0.1)
# A laptop-sized stack with the same shape, and its compute-matched baselines.
_CPU = dict(model_dim=256, expert_hidden_dim=256, dropout=0.2)

# The one-pass Gutenberg experiment (issue 26): two LSTMs of `_GUTENBERG_DIM`
# and a middle block of `_GUTENBERG_BLOCK` hidden units' worth of multiply-adds
# per token. See `_gutenberg_presets`.
_GUTENBERG_DIM = 128
_GUTENBERG_BLOCK = 1024
# No dropout: in one pass nothing is seen twice, so there is nothing to memorise.
_GUTENBERG = dict(model_dim=_GUTENBERG_DIM, dropout=0.0)


def _gutenberg_presets():
    """The Gutenberg presets, matched on multiply-adds per timestep.

    A dense middle block of `f` ReLU units costs `2 d f` multiply-adds per
    position. A flat MoE with noisy top-k gating costs `2 d (k h + E)`: its
    `k` experts of `h` hidden units and its `w_gate` and `w_noise` (`d x E`
    each); a hierarchical one `2 d (k^2 h + G + k E / G)` (`costs`). So each
    MoE gets the expert width `h` that makes its block cost the dense
    block's exactly: `h = (f - E) / k` flat, `(f - G - k E / G) / k^2`
    hierarchical. More experts leave less compute for each (the gate grows
    with E), as in the paper, whose MoE-256 spends 3% of its 8.6M
    ops/timestep on gating (Table 7).
    """
    f, out = _GUTENBERG_BLOCK, {}
    out["gutenberg-dense"] = dict(_GUTENBERG, blocks=("lstm", "ffn", "lstm"), ffn_hidden_dim=f)
    for e in (16, 64, 256):
        out[f"gutenberg-moe-{e}"] = dict(
            _GUTENBERG, num_experts=e, k=4, expert_hidden_dim=(f - e) // 4
        )
    groups, per_group, k = 32, 32, 2
    out["gutenberg-moe-1024-h"] = dict(
        _GUTENBERG, num_experts=groups * per_group, num_groups=groups, k=k,
        expert_hidden_dim=(f - groups - k * per_group) // (k * k),
    )
    # The floor: the same two LSTMs, no middle block.
    out["gutenberg-2xlstm"] = dict(_GUTENBERG, blocks=("lstm", "lstm"))
    return out


# The compute-matched Gutenberg presets (the floor, `gutenberg-2xlstm`, aside).
GUTENBERG_MATCHED = ("gutenberg-dense", "gutenberg-moe-16", "gutenberg-moe-64",
                     "gutenberg-moe-256", "gutenberg-moe-1024-h")

PRESETS = {
    # Flat MoE between two LSTMs, k=4 of E experts (Table 7, MoE-4..MoE-256).
    "moe-4": dict(_PAPER, num_experts=4, k=4),
    "moe-32": dict(_PAPER, num_experts=32, k=4),
    "moe-256": dict(_PAPER, num_experts=256, k=4),
    # Hierarchical MoE (App. B): 16 groups, 2 groups x 2 experts per position.
    "moe-256-h": dict(_PAPER, num_experts=256, num_groups=16, k=2),
    "moe-1024-h": dict(_PAPER, num_experts=1024, num_groups=16, k=2),
    "moe-4096-h": dict(_PAPER, num_experts=4096, num_groups=16, k=2),
    # Compute-matched dense baselines.
    "lstm-2048-512": dict(_PAPER, blocks=("lstm",), lstm_units=2048, lstm_projection=512),
    "4xlstm-512": dict(_PAPER, blocks=("lstm",) * 4),
    "moe-1-wide": dict(_PAPER, num_experts=1, expert_hidden_dim=4096, k=1),
    "moe-1-deep": dict(_PAPER, num_experts=1, expert_hidden_layers=4, k=1),
    # Laptop presets.
    "cpu-moe-32": dict(_CPU, num_experts=32, k=4),
    # Same per-token multiply-adds as cpu-moe-32 up to its gating matrices:
    # one ReLU layer of k * expert hidden = 4 * 256 units.
    "cpu-dense": dict(_CPU, blocks=("lstm", "ffn", "lstm"), ffn_hidden_dim=1024, k=4),
    # The paper's MoE-1-Wide at laptop size: the same per-token compute as
    # one expert of 4 * 256 units, behind the same gate and sigmoid as the MoE.
    "cpu-moe-1-wide": dict(_CPU, num_experts=1, expert_hidden_dim=1024, k=1),
    "cpu-moe-32-h": dict(_CPU, num_experts=32, num_groups=4, k=2),
    "cpu-4xlstm": dict(_CPU, blocks=("lstm",) * 4),
    # The laptop stack without its middle block: what the MoE and the dense
    # block are measured against when asking how much the block can add.
    "cpu-2xlstm": dict(_CPU, blocks=("lstm", "lstm")),
    **{name: dict(arguments) for name, arguments in _gutenberg_presets().items()},
}


REGISTRY = PresetRegistry(PRESETS, "keras_moe.models.lm:LanguageModel")


def preset_names():
    """The preset names, sorted."""
    return REGISTRY.names()


def get_preset(name):
    """A copy of preset `name`'s `LanguageModel` arguments (without `vocab_size`)."""
    return REGISTRY.get(name)


def build_language_model(preset, vocab_size, **overrides):
    """`LanguageModel(vocab_size, **preset arguments, **overrides)`.

    Args:
        preset: a preset name (see `preset_names()`).
        vocab_size: int, including padding id 0 and `<eos>`.
        **overrides: `LanguageModel` keyword arguments that replace the
            preset's (e.g. `num_sampled=8192`, `seed=1`; `pool_size=32,
            pool_size_range=(8, 32)` gives the MoE block document pools,
            one document per batch row: `keras_moe.pools`).

    Returns:
        An unbuilt `keras_moe.models.lm.LanguageModel`.
    """
    return REGISTRY.build(preset, vocab_size, **overrides)


def costs(preset_or_kwargs):
    """Multiply-adds per timestep and parameters, embedding and softmax excluded.

    Counted as in the paper (App. C, Table 7): the multiply-adds of the
    weight matrices one position goes through, i.e. each LSTM's, the `k`
    experts it is sent to (`k * k` for a hierarchical MoE, `k` groups times
    `k` experts), the gating matrices it is scored by (`w_gate`, and
    `w_noise` for the noisy gate), and a dense block's; parameters count
    every expert and every gating matrix.

    Args:
        preset_or_kwargs: a preset name, or a dict of `LanguageModel`
            arguments (`vocab_size` is ignored; missing ones take
            `LanguageModel`'s defaults).

    Returns:
        dict with int `ops_per_timestep`, `params` (biases included, as the
        model has them) and `params_without_biases` (as the paper counts).
    """
    a = REGISTRY.resolve(preset_or_kwargs)
    d = a["model_dim"]
    ops = weights = biases = 0
    for block in a["blocks"]:
        if block == "lstm":
            u = a["lstm_units"] or d
            p = a["lstm_projection"]
            recurrent = p or u
            # Four gates from [x_t, r_{t-1}] (widths d and p or u), plus
            # LSTMP's projection u x p (no bias); one bias per gate unit.
            matrices = 4 * u * (d + recurrent) + (u * p if p else 0)
            ops += matrices
            weights += matrices
            biases += 4 * u
        elif block == "ffn":
            f = a["ffn_hidden_dim"] or a["k"] * a["expert_hidden_dim"]
            # d -> f -> d, biases f and d.
            ops += 2 * d * f
            weights += 2 * d * f
            biases += f + d
        else:
            block_ops, block_weights, block_biases = _moe_costs(a)
            ops += block_ops
            weights += block_weights
            biases += block_biases
    return {
        "ops_per_timestep": ops,
        "params": weights + biases,
        "params_without_biases": weights,
    }


def _moe_costs(a):
    """`(ops, weights, biases)` of one MoE block; see `costs`."""
    d, h, layers = a["model_dim"], a["expert_hidden_dim"], a["expert_hidden_layers"]
    e, k, groups = a["num_experts"], a["k"], a["num_groups"]
    # One expert: d x h, (layers - 1) h x h, h x d; biases h per hidden
    # layer and d at the output. The paper's: 512*1024 + 1024*512 = 1M.
    expert = d * h + (layers - 1) * h * h + h * d
    expert_biases = layers * h + d
    # Scoring matrices evaluated per position: w_gate, plus w_noise for the
    # noisy gate (evaluated in training, which is what the paper counts).
    scored = 2 if a["gating"] == "noisy_top_k" else 1
    if groups:
        per_group = e // groups
        # Primary gate d x G, then the secondary gates d x E/G of the k
        # chosen groups; k experts in each of those k groups.
        ops = k * k * expert + scored * d * groups + k * scored * d * per_group
        # Every gate: primary w_gate, w_noise [d, G]; secondary [G, d, E/G] each.
        gating_weights, gating_biases = 2 * d * groups + 2 * d * e, 0
    else:
        ops = k * expert + scored * d * e
        if a["gating"] == "batchwise":
            # w_gate [d, E] and one learned threshold per expert (App. F).
            gating_weights, gating_biases = d * e, e
        else:
            # w_gate [d, E], and w_noise [d, E] for NoisyTopKGating (both of
            # its types, used or not); SwitchGating and SoftmaxGating have none.
            noise = d * e if a["gating"] in ("noisy_top_k", "top_k") else 0
            gating_weights, gating_biases = d * e + noise, 0
    return ops, e * expert + gating_weights, e * expert_biases + gating_biases
