"""Named translation models of the paper (Section 5.3, App. E) and their cost accounting.

App. E of Shazeer et al. (2017) trains the GNMT model reduced to 3 encoder
and 2 decoder LSTM layers, all layers 512 wide, LSTMs of 2048 units with a
512-dimensional output projection, an MoE layer in the encoder and one in
the decoder, each expert a ReLU layer of 2048 units (2M parameters), k = 4
experts per position (flat; hierarchical: k = 2 per level), dropout 0.4,
balancing weights 0.01, the strictly balanced (batchwise, App. F) gating,
and a baseline "that had no MoE layers". `PRESETS` holds these as
`TranslationModel` arguments, next to small `cpu-*` models that train on a
laptop. `costs` counts multiply-adds per timestep and parameters.

Assumptions where App. E is silent or our library differs:
- The group structure of the hierarchical MoEs is not given: we take 16
  groups of 32 experts (512-h) and 32 groups of 64 (2048-h).
- `keras_moe.HierarchicalMoE` has noisy top-k gating only, so the
  hierarchical presets use it instead of App. F's batchwise gating; the
  flat `gnmt-moe-32` uses `gating="batchwise"`.
- The first encoder LSTM is bidirectional (GNMT) and the attention context
  also feeds the upper decoder LSTM (GNMT). The paper's 85M ops/timestep
  for its 2048-expert model (Table 2) is reproduced only without both
  (`bidirectional_encoder=False, upper_context=False`, plus a 32k softmax);
  see tests/models/translation_presets_test.py.

Example:

>>> preset_names()[:3]
['cpu-gnmt-dense', 'cpu-gnmt-moe-1-wide', 'cpu-gnmt-moe-16']
>>> cost = costs("cpu-gnmt-moe-16")
>>> cost["ops_per_timestep"] == cost["encoder_ops_per_timestep"] + cost["decoder_ops_per_timestep"]
True
"""

from keras_moe.models.presets import _moe_costs
from keras_moe.models.registry import PresetRegistry

# App. E: widths 512, LSTMs 2048 -> 512, experts 512 -> 2048 -> 512,
# dropout 0.4, w_importance = w_load = 0.01, App. G's attention function.
_PAPER = dict(
    model_dim=512, lstm_units=2048, lstm_projection=512, expert_hidden_dim=2048, dropout=0.4,
    importance_weight=0.01, load_weight=0.01, attention="multiplicative_tanh",
)
# Laptop size: 256 wide, plain LSTMs (no projection), experts of 256.
_CPU = dict(
    model_dim=256, expert_hidden_dim=256, dropout=0.3, importance_weight=0.01,
    load_weight=0.01, attention="multiplicative_tanh",
)

PRESETS = {
    # Flat, 32 experts, k=4, App. F's batchwise gating (single-pair models).
    "gnmt-moe-32": dict(_PAPER, num_experts=32, k=4, gating="batchwise"),
    # Hierarchical, k=2 groups x k=2 experts: 4 experts per position.
    "gnmt-moe-512-h": dict(_PAPER, num_experts=512, num_groups=16, k=2),
    "gnmt-moe-2048-h": dict(_PAPER, num_experts=2048, num_groups=32, k=2),
    # App. E's baseline "that had no MoE layers": the 3 + 2 LSTM model.
    "gnmt-baseline": dict(_PAPER, middle_block="none"),
    "cpu-gnmt-moe-16": dict(_CPU, num_experts=16, k=4),
    # Same per-token multiply-adds as cpu-gnmt-moe-16 up to its gating
    # matrices: one ReLU layer of k * expert hidden = 4 * 256 units.
    "cpu-gnmt-dense": dict(_CPU, middle_block="ffn", ffn_hidden_dim=1024, k=4),
    # The paper's MoE-1-Wide shape at laptop size: one expert of 4 * 256
    # units behind the MoE's gate and sigmoid (same compute as the dense twin).
    "cpu-gnmt-moe-1-wide": dict(_CPU, num_experts=1, expert_hidden_dim=1024, k=1),
}


REGISTRY = PresetRegistry(PRESETS, "keras_moe.models.seq2seq:TranslationModel")


def preset_names():
    """The preset names, sorted."""
    return REGISTRY.names()


def get_preset(name):
    """A copy of preset `name`'s `TranslationModel` arguments (without `vocab_size`)."""
    return REGISTRY.get(name)


def build_translation_model(preset, vocab_size, **overrides):
    """`TranslationModel(vocab_size, **preset arguments, **overrides)`.

    Args:
        preset: a preset name (see `preset_names()`).
        vocab_size: int, the shared vocabulary including padding id 0.
        **overrides: `TranslationModel` keyword arguments that replace the
            preset's (e.g. `dropout=0.2`, `seed=1`).

    Returns:
        A `keras_moe.models.seq2seq.TranslationModel` (built).
    """
    return REGISTRY.build(preset, vocab_size, **overrides)


def _lstm(a, input_width, output_width):
    """`(weights, biases)` of one LSTM direction reading `input_width` features.

    A projected LSTM (`lstm_projection` set) has `u = lstm_units` cells and
    outputs `output_width`; otherwise the cell is `output_width` wide. Four
    gates from `[x_t, r_{t-1}]`, plus LSTMP's projection `u x out` (no bias).
    """
    if a["lstm_projection"]:
        u = a["lstm_units"] or a["model_dim"]
        return 4 * u * (input_width + output_width) + u * output_width, 4 * u
    u = output_width
    return 4 * u * (input_width + u), 4 * u


def _middle(a):
    """`(ops, weights, biases)` of one middle block (MoE, dense or none)."""
    d = a["model_dim"]
    if a["middle_block"] == "none":
        return 0, 0, 0
    if a["middle_block"] == "ffn":
        f = a["ffn_hidden_dim"] or a["k"] * a["expert_hidden_dim"]
        # d -> f -> d, biases f and d.
        return 2 * d * f, 2 * d * f, f + d
    # The language models' MoE accounting (one copy): k experts per
    # position (k * k hierarchical), the gating matrices, every expert.
    return _moe_costs({**a, "expert_hidden_layers": 1})


def costs(preset_or_kwargs, vocab_size=None):
    """Multiply-adds per timestep and parameters, embedding and softmax excluded.

    Counted as for the language models (`keras_moe.models.presets.costs`):
    the multiply-adds of the weight matrices one position goes through.
    A source token goes through the encoder LSTMs (two directions of half
    width for a bidirectional first layer), the encoder MoE (`k` experts,
    `k * k` hierarchical, plus its gating matrices) and the attention's
    `U` (its source side is computed once per token); a target token
    through the bottom decoder LSTM (input `[embedding; context]`), the
    attention's `W`, the decoder MoE and the upper LSTM (input `[x;
    context]` with `upper_context`). The attention's scoring and averaging
    (`2 * s * units`-ish per target token, `s` the source length) are left
    out, as they depend on the sentence. `ops_per_timestep` adds the
    encoder's and the decoder's, one source and one target token, the way
    the paper's Table 2 reports "ops/timestep" (GNMT's 214M is its
    encoder, decoder and softmax per timestep).

    Args:
        preset_or_kwargs: a preset name, or a dict of `TranslationModel`
            arguments (`vocab_size` is ignored; missing ones take the
            model's defaults).
        vocab_size: optional int; adds `softmax_ops_per_timestep` and
            `total_params` (with the shared embedding and the softmax).

    Returns:
        dict of ints: `encoder_ops_per_timestep`, `decoder_ops_per_timestep`,
        `ops_per_timestep`, `params` (biases included, as the model has
        them), `params_without_biases`; with `vocab_size` also the two
        keys above.
    """
    a = REGISTRY.resolve(preset_or_kwargs)
    d = a["model_dim"]
    n = a["attention_units"] or d

    encoder = []  # (ops, weights, biases) per block
    if a["bidirectional_encoder"]:
        w, b = _lstm(a, d, d // 2)
        encoder.append((2 * w, 2 * w, 2 * b))
    else:
        w, b = _lstm(a, d, d)
        encoder.append((w, w, b))
    w, b = _lstm(a, d, d)
    encoder += [(w, w, b), _middle(a), (w, w, b)]
    # Attention U [d, n], applied once per source token.
    encoder.append((d * n, d * n, 0))

    decoder = []
    w, b = _lstm(a, 2 * d, d)  # bottom LSTM: [embedding; context]
    decoder.append((w, w, b))
    # Attention W [d, n] per target step; V [n] scores every source
    # position (left out of the ops, counted as a weight).
    decoder.append((d * n, d * n + n, 0))
    decoder.append(_middle(a))
    w, b = _lstm(a, 2 * d if a["upper_context"] else d, d)
    decoder.append((w, w, b))

    def total(blocks, i):
        return sum(block[i] for block in blocks)

    weights = total(encoder, 1) + total(decoder, 1)
    biases = total(encoder, 2) + total(decoder, 2)
    result = {
        "encoder_ops_per_timestep": total(encoder, 0),
        "decoder_ops_per_timestep": total(decoder, 0),
        "ops_per_timestep": total(encoder, 0) + total(decoder, 0),
        "params": weights + biases,
        "params_without_biases": weights,
    }
    if vocab_size is not None:
        # Softmax d x V per target token; parameters: the shared embedding
        # V x d, the softmax kernel V x d and its bias V.
        result["softmax_ops_per_timestep"] = vocab_size * d
        result["total_params"] = weights + biases + 2 * vocab_size * d + vocab_size
    return result
