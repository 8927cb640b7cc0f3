"""Plan, run and report the paper's experiments: the library behind `keras-moe reproduce`.

- `plan(name)`: resolve the shipped configuration, count its parameters and
  ops/timestep with the preset cost formulas (no weights are allocated),
  check them against the paper's columns, and work out the batch per step,
  per device and per expert, the memory per device, the length of the run
  and, from a few timed steps of a scaled-down copy, an extrapolated time.
- `run(name, run_dir)`: train with `lm_train` or `translate_train` and
  append one line to the ledger (`keras_moe.pipelines.reproduce.ledger`).
- `list_experiments()` / `format_list()`: every experiment with the
  paper's figures, training time and hardware.

The experiments themselves (configuration, figures, assumed hardware and
strategy) are in `keras_moe.pipelines.reproduce.experiments`.

Example:

>>> result = plan("lm1b-moe-32", measure=False)
>>> [(c["figure"], c["ok"]) for c in result["checks"]]
[('ops_per_timestep', True), ('params', True), ('total_params', True)]
>>> result["batch"]["tokens_per_expert"]  # k * b * d / n = 4 * 37500 * 8 / 32
37500.0
"""

import contextlib
import decimal
import time

from keras_moe.models import presets, translation_presets
from keras_moe.pipelines.config import load_config
from keras_moe.pipelines.reproduce import experiments as experiments_lib
from keras_moe.pipelines.reproduce import ledger as ledger_lib

TOLERANCE = 0.02  # relative; or the figure's printed precision, if coarser
BYTES = 4  # float32 weights, gradients, Adam slots and activations
_SCALES = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}


class CostMismatchError(ValueError):
    """A configuration's parameters or ops/timestep disagree with the paper's."""


def load_experiment(name, overrides=()):
    """`(Experiment, config)`: the experiment and its shipped configuration with `overrides`."""
    from keras_moe.pipelines.lm.config import LMConfig
    from keras_moe.pipelines.translate.config import TranslateConfig

    experiment = experiments_lib.get_experiment(name)
    cls = LMConfig if experiment.task == "lm" else TranslateConfig
    return experiment, load_config(cls, experiment.config_path, overrides)


def _registry(experiment):
    return (presets if experiment.task == "lm" else translation_presets).REGISTRY


def model_arguments(experiment, config):
    """Every model argument of `config`: the preset's, its overrides, the defaults."""
    registry = _registry(experiment)
    return registry.resolve({**registry.get(config.model.preset), **config.model.overrides()})


def model_costs(experiment, arguments, vocab_size):
    """Our counts in the paper's conventions (ints).

    `ops_per_timestep`: language models, embedding and softmax excluded
    (Table 7); translation, one source and one target token with the
    softmax (Tables 2-3). `params`: without embedding, softmax and biases
    (Table 7's column). `total_params`: everything, biases included.
    `softmax_ops_per_token` is the training softmax (the sampled one when
    `num_sampled` is set); it enters the time estimate, not the checks.
    """
    d = arguments["model_dim"]
    if experiment.task == "lm":
        c = presets.costs(arguments)
        sampled = arguments["num_sampled"]
        return {
            "ops_per_timestep": c["ops_per_timestep"],
            "params": c["params_without_biases"],
            # Embedding V x d, softmax kernel V x d and bias V.
            "total_params": c["params"] + 2 * vocab_size * d + vocab_size,
            "softmax_ops_per_token": (sampled + 1) * d if sampled else vocab_size * d,
        }
    c = translation_presets.costs(arguments, vocab_size=vocab_size)
    return {
        "ops_per_timestep": c["ops_per_timestep"] + c["softmax_ops_per_timestep"],
        "params": c["params_without_biases"],
        "total_params": c["total_params"],
        "softmax_ops_per_token": c["softmax_ops_per_timestep"],
    }


def ops_per_training_token(experiment, costs):
    """Forward multiply-adds per training token: ops/timestep plus the training softmax.

    A language model's ops/timestep exclude the softmax; a translation
    model's already hold it (one source and one target token).
    """
    softmax = costs["softmax_ops_per_token"] if experiment.task == "lm" else 0
    return costs["ops_per_timestep"] + softmax


def parse_figure(text):
    """`(value, half a unit of the last printed digit)` of a figure such as `"8.4M"`.

    >>> parse_figure("8.4M"), parse_figure("85M"), parse_figure("0.06")
    ((8400000.0, 50000.0), (85000000.0, 500000.0), (0.06, 0.005))
    """
    suffix = text[-1] if text[-1] in _SCALES else ""
    number = decimal.Decimal(text[: len(text) - len(suffix)])
    scale = _SCALES[suffix]
    half = decimal.Decimal(5).scaleb(number.as_tuple().exponent - 1)
    return float(number) * scale, float(half) * scale


def check_costs(experiment, ours):
    """One row per figure in `experiment.checked`: ours against the paper's.

    A figure agrees when ours is within 2% of it, or within its printed
    precision when that is coarser (Table 7's "0.8B" total is 0.75-0.85B).
    """
    rows = []
    for figure in experiment.checked:
        paper, half = parse_figure(experiment.figures[figure])
        off = abs(ours[figure] - paper)
        rows.append({
            "figure": figure, "ours": ours[figure], "paper": experiment.figures[figure],
            "relative_difference": (ours[figure] - paper) / paper,
            "ok": off <= max(TOLERANCE * paper, half),
            "within": "2%" if off <= TOLERANCE * paper else "printed precision",
        })
    return rows


def _experts_per_position(a):
    """Experts each position is sent to (k, or k x k hierarchical); None without MoE."""
    has_moe = a.get("middle_block", "moe") == "moe" and "moe" in a.get("blocks", ("moe",))
    if not has_moe:
        return None
    return a["k"] * a["k"] if a["num_groups"] else a["k"]


def batch_plan(experiment, config, arguments, gpus):
    """Tokens per step, per device (`b`) and per expert (`k * b * d / n`, Section 3.1)."""
    c = config.data
    if experiment.task == "lm" and c.mode == "stream":
        tokens = c.batch_size * c.seq_len
    else:
        tokens = c.batch_tokens  # a token budget, padding included (per side for translation)
    per_device = tokens / gpus
    k = _experts_per_position(arguments)
    return {
        "tokens_per_step": tokens,
        "devices": gpus,
        "tokens_per_device": per_device,
        "experts_per_position": k,
        "num_experts": arguments["num_experts"] if k else None,
        "tokens_per_expert": k * per_device * gpus / arguments["num_experts"] if k else None,
    }


def _moe_floats(a):
    """Floats one position keeps in an MoE block for the backward pass."""
    n, g, d = a["num_experts"], a["num_groups"], a["model_dim"]
    # Gate logits, noise scales and noisy logits; experts' hidden layers and outputs.
    gating = 3 * g + a["k"] * 3 * (n // g) if g else 3 * n
    hidden = a.get("expert_hidden_layers", 1) * a["expert_hidden_dim"]
    return gating + _experts_per_position(a) * (hidden + d)


def activation_floats_per_token(experiment, a, vocab_size):
    """A rough count of the floats one token keeps for the backward pass.

    Per block: an LSTM's gates, cell and output (`6u + p`), an MoE's gating
    vectors and its `k` experts' hidden layers and outputs, a dense block's
    hidden layer, each block's dropout and residual (`2d`); the training
    softmax's logits and their gradient. Translation counts one source and
    one target token, with attention scores over 64 source positions.
    """
    d = a["model_dim"]
    u = a.get("lstm_units") or d
    lstm = 6 * u + (a.get("lstm_projection") or 0) + 2 * d
    if experiment.task == "lm":
        floats = 2 * d
        for block in a["blocks"]:
            if block == "lstm":
                floats += lstm
            elif block == "ffn":
                floats += (a["ffn_hidden_dim"] or a["k"] * a["expert_hidden_dim"]) + 3 * d
            else:
                floats += _moe_floats(a) + 3 * d
        sampled = a["num_sampled"]
        return floats + 2 * ((sampled + 1) if sampled else vocab_size)
    if a["middle_block"] == "none":
        block = 0
    elif a["middle_block"] == "ffn":
        block = (a["ffn_hidden_dim"] or a["k"] * a["expert_hidden_dim"]) + 3 * d
    else:
        block = _moe_floats(a) + 3 * d
    source = 2 * d + 3 * lstm + block + (a.get("attention_units") or d)
    target = 2 * d + 2 * lstm + block + d + 64 + 2 * vocab_size
    return source + target


def expert_parameters(experiment, arguments):
    """Parameters of all experts of all MoE blocks: what expert parallelism splits."""
    a = arguments
    if _experts_per_position(a) is None:
        return 0
    d, h = a["model_dim"], a["expert_hidden_dim"]
    extra = a.get("expert_hidden_layers", 1) - 1
    per_expert = d * h + h + h * d + d + extra * (h * h + h)
    if experiment.task == "lm":
        blocks = sum(1 for block in a["blocks"] if block == "moe")
    else:
        blocks = 2  # one MoE layer in the encoder, one in the decoder (App. E)
    return blocks * a["num_experts"] * per_expert


def memory_plan(experiment, arguments, costs, batch, vocab_size, expert_parallel=False):
    """Memory per device under MirroredStrategy, in GB.

    Every replica holds every weight, except with `expert_parallel`: then
    each of the `batch["devices"]` replicas holds `1 / devices` of the
    experts (and of their gradients and Adam slots).
    """
    gb = 1e9
    params = costs["total_params"]
    if expert_parallel:
        experts = expert_parameters(experiment, arguments)
        params = params - experts + experts / batch["devices"]
    weights = params * BYTES / gb
    activations = (activation_floats_per_token(experiment, arguments, vocab_size) * BYTES
                   * batch["tokens_per_device"] / gb)
    total = 4 * weights + activations
    device = experiment.hardware["gpu_memory_gb"]
    return {
        "weights_gb": weights, "gradients_gb": weights, "adam_slots_gb": 2 * weights,
        "activations_gb": activations, "total_gb": total, "device_gb": device,
        "fits": total <= 0.9 * device,
        "expert_parallel": bool(expert_parallel),
        "assumptions": (
            ("float32; every replica holds every non-expert weight and 1/devices of the "
             "experts (expert parallel), " if expert_parallel else
             "float32; every replica holds every weight, ") +
            "its gradient and Adam's two slots "
            "(16 bytes per parameter, embedding and softmax included); activations kept for "
            "the backward pass as counted by activation_floats_per_token (rough, within a "
            "factor of 2); fits if the total is under 90% of the device"
        ),
    }


def _scaled_arguments(experiment, a, width=64, max_experts=16):
    """The same stack at `width` (all widths scaled alike) with at most `max_experts` experts."""
    f = width / a["model_dim"]
    s = dict(a, model_dim=width, seed=1,
             expert_hidden_dim=max(8, round(a["expert_hidden_dim"] * f)))
    for key in ("lstm_units", "lstm_projection", "ffn_hidden_dim", "attention_units"):
        if s.get(key):
            s[key] = max(8, round(s[key] * f))
    if a["num_groups"]:
        s["num_groups"] = min(a["num_groups"], 4)
        s["num_experts"] = s["num_groups"] * min(a["num_experts"] // a["num_groups"], 4)
    else:
        s["num_experts"] = min(a["num_experts"], max_experts)
    if experiment.task == "lm" and a["num_sampled"]:
        s["num_sampled"] = 64
    return s


def measure_rate(experiment, arguments, steps=3, vocab_size=512, rows=8, length=32):
    """Multiply-adds per second of training steps on a scaled-down copy, on this machine.

    The copy is 64 wide (every width scaled alike) with at most 16 experts
    and a `vocab_size` softmax, trained on random tokens for `steps` timed
    steps after two untimed ones. A training step is counted as three
    times the forward multiply-adds.
    """
    import keras
    import numpy as np

    scaled = _scaled_arguments(experiment, arguments)
    model = _registry(experiment).model_class(vocab_size, **scaled)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab_size, (rows, length + 1)).astype("int32")
    if experiment.task == "lm":
        x, y = tokens[:, :-1], tokens[:, 1:]
    else:
        x, y = {"source": tokens[:, :-1], "target_in": tokens[:, :-1]}, tokens[:, 1:]
    weights = np.ones(y.shape, "float32")
    for _ in range(2):
        model.train_on_batch(x, y, sample_weight=weights)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y, sample_weight=weights)
    seconds = (time.perf_counter() - start) / steps
    cost = model_costs(experiment, _registry(experiment).resolve(scaled), vocab_size)
    per_token = ops_per_training_token(experiment, cost)
    return {
        "scaled_model": {k: scaled[k] for k in ("model_dim", "num_experts", "num_groups",
                                                "expert_hidden_dim")},
        "tokens_per_step": rows * length,
        "seconds_per_step": seconds,
        "ops_per_second": 3 * per_token * rows * length / seconds,
    }


def plan(name, gpus=None, overrides=(), measure=True, steps=3):
    """Everything `keras-moe reproduce plan` prints, as a dict (see the module docstring).

    Raises nothing on a cost mismatch: `result["agrees"]` is False and
    `check_plan` raises.
    """
    experiment, config = load_experiment(name, overrides)
    gpus = gpus or experiment.hardware["gpus"]
    arguments = model_arguments(experiment, config)
    vocab = config.data.vocab_size
    costs = model_costs(experiment, arguments, vocab)
    checks = check_costs(experiment, costs)
    batch = batch_plan(experiment, config, arguments, gpus)
    # `fit` runs whole evaluation periods: steps rounded up to steps_per_eval.
    t = config.train
    train_steps = -(-t.steps // t.steps_per_eval) * t.steps_per_eval
    result = {
        "experiment": name, "config": experiment.config_path, "overrides": list(overrides),
        "costs": costs, "checks": checks, "agrees": all(c["ok"] for c in checks),
        "batch": batch,
        "memory": memory_plan(experiment, arguments, costs, batch, vocab,
                              expert_parallel=t.expert_parallel),
        "steps": train_steps, "epochs": None, "estimate": None,
    }
    if experiment.task == "lm" and config.data.format in ("1b", "tfds"):
        words = experiments_lib.ONE_BILLION_WORD_TOKENS
        result["epochs"] = train_steps * batch["tokens_per_step"] / words
    if measure:
        rate = measure_rate(experiment, arguments, steps=steps)
        step_ops = 3 * ops_per_training_token(experiment, costs) * batch["tokens_per_step"]
        seconds = train_steps * step_ops / rate["ops_per_second"]
        result["estimate"] = {
            **rate, "full_step_ops": step_ops, "seconds_this_machine": seconds,
            "seconds_on_devices_linear": seconds / gpus,
            "label": (
                "EXTRAPOLATION: multiply-adds per second measured on a scaled-down copy on "
                "this machine, applied to the full model's step; the per-device figure "
                "assumes each of the devices runs at this machine's rate and scales linearly"
            ),
        }
    return result


def check_plan(result):
    """Raise `CostMismatchError` naming every figure of `result` that disagrees."""
    bad = [c for c in result["checks"] if not c["ok"]]
    if bad:
        details = "; ".join(
            f"{c['figure']}: ours {c['ours']:,} vs the paper's {c['paper']} "
            f"({c['relative_difference']:+.1%})" for c in bad)
        raise CostMismatchError(
            f"{result['experiment']}: our counts disagree with the paper by more than "
            f"{TOLERANCE:.0%}: {details}")


def _like(n, printed):
    """`n` in the unit of the printed figure, with one more decimal."""
    suffix = printed[-1] if printed[-1] in _SCALES else ""
    decimals = max(0, -decimal.Decimal(printed.rstrip(suffix)).as_tuple().exponent) + 1
    return f"{n / _SCALES[suffix]:.{decimals}f}{suffix}"


def _human(n, unit=""):
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def _duration(seconds):
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / 3600:.1f} hours" if seconds >= 3600 else f"{seconds:.0f} s"


def format_plan(result):
    """The plan as text, one fact per line."""
    e = experiments_lib.get_experiment(result["experiment"])
    b, m = result["batch"], result["memory"]
    overrides = f" with {result['overrides']}" if result["overrides"] else ""
    lines = [f"{e.name}: {e.table}, {e.paper_row} ({experiments_lib.PAPER})",
             f"config: {result['config']}{overrides}"]
    for c in result["checks"]:
        mark = f"ok (within {c['within']})" if c["ok"] else "DISAGREES"
        lines.append(f"  {c['figure']:17s} ours {_like(c['ours'], c['paper']):>9s}  paper "
                     f"{c['paper']:>8s}  {c['relative_difference']:+.2%}  {mark}")
    if not result["checks"]:
        lines.append("  no cost figure of the paper describes this model: " + e.notes)
    lines.append(f"batch: {b['tokens_per_step']:,} tokens per step on {b['devices']} devices, "
                 f"b = {b['tokens_per_device']:,.0f} per device")
    if b["experts_per_position"]:
        lines.append(f"per expert: k*b*d/n = {b['experts_per_position']}*"
                     f"{b['tokens_per_device']:,.0f}*{b['devices']}/{b['num_experts']} = "
                     f"{b['tokens_per_expert']:,.0f} tokens")
    lines.append(f"memory per device: {m['total_gb']:.1f} GB of {m['device_gb']} GB "
                 f"({'fits' if m['fits'] else 'DOES NOT FIT'}): weights {m['weights_gb']:.1f}, "
                 f"gradients {m['gradients_gb']:.1f}, Adam {m['adam_slots_gb']:.1f}, "
                 f"activations {m['activations_gb']:.1f}")
    lines.append(f"  assumptions: {m['assumptions']}")
    epochs = result["epochs"]
    epochs = f" (~{epochs:.1f} epochs of the 1B Word training set)" if epochs else ""
    lines.append(f"steps: {result['steps']:,}{epochs}")
    lines.append(f"strategy: {e.strategy}; assumed hardware: {e.hardware['gpus']} x "
                 f"{e.hardware['gpu']} ({e.hardware['gpu_memory_gb']} GB)")
    lines.append(f"paper: {e.paper_time or 'time not published'} on {e.paper_hardware}")
    est = result["estimate"]
    if est:
        lines.append(f"time ({est['label']}): {_human(est['ops_per_second'], ' multiply-adds/s')}"
                     f" measured, {est['seconds_per_step']:.3f} s per scaled step; full run "
                     f"{_duration(est['seconds_this_machine'])} on this machine, "
                     f"{_duration(est['seconds_on_devices_linear'])} on {b['devices']} "
                     "such devices")
    else:
        lines.append("time: not measured (--no-measure)")
    return "\n".join(lines)


def list_experiments():
    """One dict per experiment: the paper's figures (as printed), time and hardware."""
    rows = []
    for e in experiments_lib.EXPERIMENTS.values():
        f = e.figures
        rows.append({
            "experiment": e.name, "table": e.table, "row": e.paper_row, "metric": e.metric,
            "paper_value": f[e.metric], "ops_per_timestep": f.get("ops_per_timestep"),
            "params": f.get("params"), "total_params": f.get("total_params"),
            "time": e.paper_time, "hardware": e.paper_hardware,
        })
    return rows


def format_list():
    """`list_experiments()` as text: two lines per experiment."""
    lines = [f"{'experiment':32s} {'table, row':36s} {'metric':>16s} {'ops/ts':>7s} "
             f"{'params':>8s} {'total':>6s}"]
    for r in list_experiments():
        metric = ("BLEU " if r["metric"].endswith("bleu") else "ppl ") + r["paper_value"]
        lines.append(f"{r['experiment']:32s} {r['table'] + ', ' + r['row']:36s} {metric:>16s} "
                     f"{r['ops_per_timestep'] or '-':>7s} {r['params'] or '-':>8s} "
                     f"{r['total_params'] or '-':>6s}")
        lines.append(f"{'':32s} published: {r['time'] or 'time not published'}; {r['hardware']}")
    return "\n".join(lines)


def distribution(experiment):
    """`(strategy, scope)`: MirroredStrategy over the local GPUs when there are several."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if experiment.strategy == experiments_lib.MIRRORED and len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        return strategy, strategy.scope()
    return tf.distribute.get_strategy(), contextlib.nullcontext()


def run(name, run_dir, overrides=(), ledger=None):
    """Train experiment `name` into `run_dir`, then append its line to the ledger.

    Args:
        name: an experiment name (`experiments.experiment_names()`).
        run_dir: the run directory (`lm_train.train` / `translate_train.train`).
        overrides: `section.key=value` strings applied to the shipped configuration.
        ledger: the JSON-lines file (default: `ledger.jsonl` beside `run_dir`).

    Returns:
        The ledger entry (a dict).
    """
    experiment, config = load_experiment(name, overrides)
    if experiment.task == "lm":
        from keras_moe.pipelines.lm.train import train
    else:
        from keras_moe.pipelines.translate.train import train
    if config.train.strategy == "default":
        strategy, scope = distribution(experiment)
    else:
        # The configuration's own strategy (e.g. expert parallel); no outer scope.
        from keras_moe.pipelines.training import distribution as distribution_lib

        strategy = distribution_lib.make_strategy(config.train.strategy)
        scope = contextlib.nullcontext()
    start = time.time()
    with scope:
        results = train(config, run_dir, strategy)
    wall = time.time() - start
    entry = ledger_lib.make_entry(
        experiment, config, results, wall, run_dir, overrides,
        replicas=strategy.num_replicas_in_sync,
    )
    ledger_lib.append(ledger or ledger_lib.default_path(run_dir), entry)
    return entry
